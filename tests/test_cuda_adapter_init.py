"""The adapter mode's non-default A (FalqonConfig.adapter_init) melded on the GPU against the CPU:
W's FP8 rows and the scale bitwise (the meld_init op's), a random A equal up to rare one-step FP8
flips (the same CPU-drawn values, a rescale factor reduced on another device), a weight_svd A
spanning the same top singular subspace, the row norm and the cap. Skipped without an FP8 GPU
(FALQON_TEST_DEVICE=cpu: a dry run of the test code on the CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import falqon
from cuda_testing import DEVICE, E4M3, assert_fp8_equal, assert_fp8_nearly_equal, gpu
from falqon.modules import ADAPTER_ROW_NORM

pytestmark = [pytest.mark.gpu, gpu]

CASES = [(512, 1024, 16, "exact", torch.float32), (4096, 4096, 64, "randomized", torch.bfloat16)]


def planted_weight(n: int, k: int, r: int) -> torch.Tensor:
    """A LLaMA-sized weight (std ~0.02) with a gap after its r-th singular value, so that its
    top-r right singular subspace is well defined on any device."""
    gen = torch.Generator().manual_seed(n + k + r)
    u = torch.linalg.qr(torch.randn(n, r, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(k, r, generator=gen))[0]
    low = (u * torch.linspace(8, 4, r)) @ v.t()
    return low + torch.randn(n, k, generator=gen) * 0.02


def meld(w: torch.Tensor, device, r: int, svd: str, init: str) -> falqon.MeldedLinear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.to(device))
    return falqon.MeldedLinear.from_linear(lin, rank=r, svd=svd, seed=3, adapter_init=init)


@pytest.mark.parametrize("init", ["random", "weight_svd"])
@pytest.mark.parametrize("N,K,r,svd,dtype", CASES, ids=str)
def test_adapter_init_on_the_gpu_matches_the_cpu(N, K, r, svd, dtype, init):
    w = planted_weight(N, K, r).to(dtype)
    gpu_layer, cpu_layer = meld(w, DEVICE, r, svd, init), meld(w, "cpu", r, svd, init)
    q, s = falqon.quantize(w, E4M3)
    assert gpu_layer.weight_scale.item() == cpu_layer.weight_scale.item() == s.item()
    assert_fp8_equal(gpu_layer.weight[:N], q, "GPU weight rows")
    assert not gpu_layer.weight[N + r:].cpu().view(torch.uint8).any()
    a_gpu, a_cpu = gpu_layer.adapter_A().cpu(), cpu_layer.adapter_A()
    rms = a_gpu.square().sum(1).mean().sqrt().item()
    assert rms == pytest.approx(ADAPTER_ROW_NORM, rel=0.05)  # the cap does not bind here
    assert a_gpu.abs().max().item() <= w.float().abs().max().item()
    rows = slice(N, N + r)
    if init == "random":
        assert_fp8_nearly_equal(gpu_layer.weight[rows], cpu_layer.weight[rows], 1e-3, "random A")
    else:  # the same subspace: A's rows outside the CPU's span, relative (FP8 rounding ~3%)
        basis = torch.linalg.qr(a_cpu.double().t())[0]
        outside = a_gpu.double() - (a_gpu.double() @ basis) @ basis.t()
        assert (outside.norm() / a_gpu.norm()).item() < 0.05
