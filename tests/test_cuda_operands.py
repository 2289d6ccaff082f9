"""The small operands around the melded layer's GEMMs (csrc/cuda/operands.cu), made by one launch
each instead of ATen ops: they must be the ATen ops' values bit for bit, since the layer's
numerics (and the CPU reference's) were defined with those.

- B in the activation dtype (torch.ops.falqon_bench.in_dtype) against Tensor.to, over values that
  exercise the rounding: ties, subnormals of the target, overflow to Inf, NaN, signed zeros; at
  every alignment of the source and length mod 4 (the kernel's vector and element paths);
- xa's contiguous copy: in the proxy mode y is a view of the forward's product, whose columns
  after y's are xa's, so the op's xa must equal them bitwise (ranks that are multiples of 8 take
  the kernel's 8-element vectors, rank 5 its element path);
- x's amax for a given quantisation (input_scale * 448) and the forward's GEMM with W''s scale
  repeated over its rows: test_cuda_row_scales.py and test_cuda_shared_quant.py check those.
"""

from __future__ import annotations

import pytest
import torch

import falqon
from falqon import ops
from cuda_testing import DEVICE, EMULATED, cuda_only

pytestmark = [cuda_only, pytest.mark.skipif(EMULATED, reason="the emulated path runs the reference")]

ACT = (torch.float32, torch.bfloat16, torch.float16)


def awkward_values(n: int, dtype: torch.dtype) -> torch.Tensor:
    """n values of `dtype` (on the GPU) that stress a conversion to another activation dtype."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-30, 20, (n,), generator=g).double())
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65520.0,
                            70000.0, 3.0e38, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -9, 2.0 ** -24,
                            2.0 ** -25, 3 * 2.0 ** -26, 1e-40], dtype=torch.float64)
    return torch.cat([special, wide]).to(dtype).to(DEVICE)


@pytest.mark.parametrize("src", ACT, ids=str)
@pytest.mark.parametrize("dst", ACT, ids=str)
def test_in_dtype_is_tensor_to_bitwise(src, dst):
    t = awkward_values(4099, src).reshape(-1, 1).expand(-1, 3).t()  # non-contiguous, 3 x 4114
    out = torch.ops.falqon_bench.in_dtype(t, dst)
    ref = t.to(dst).contiguous()
    assert out.is_contiguous() and out.dtype == dst and out.shape == t.shape
    assert torch.equal(out.view(torch.uint8 if dst != torch.float32 else torch.int32).cpu(),
                       ref.view(torch.uint8 if dst != torch.float32 else torch.int32).cpu())


@pytest.mark.parametrize("offset", [0, 1, 2, 3], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize("src", ACT, ids=str)
def test_in_dtype_any_alignment_and_length(src, offset):
    # The kernel converts 4-element vectors where both bases are aligned for them and the tail
    # (length % 4) one element at a time: a source starting 1-3 elements into its storage takes
    # the element path, the lengths 4k + 0..3 every tail.
    base = awkward_values(4 * 1031 + offset, src)
    for length in (4 * 1027, 4 * 1027 + 1, 4 * 1027 + 2, 4 * 1027 + 3):
        t = base[offset:offset + length]
        out = torch.ops.falqon_bench.in_dtype(t, torch.bfloat16)
        ref = t.to(torch.bfloat16)
        assert torch.equal(out.view(torch.uint8).cpu(), ref.view(torch.uint8).cpu())


@pytest.mark.parametrize("rank", [16, 64, 5])
def test_proxy_xa_is_the_products_columns(rank):
    K, N, M = 256, 384, 300
    lin = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
    layer = falqon.MeldedLinear.from_linear(lin, rank=rank, update_mode="proxy").to(DEVICE)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    y, xa, _ = torch.ops.falqon.melded_linear(x, layer.weight, layer.weight_scale, layer.lora_B)
    rows = layer.weight.shape[0]  # N + r16: the product's row stride
    assert y.stride() == (rows, 1)
    product = y.as_strided((M, rows), (rows, 1))
    assert xa.is_contiguous() and xa.shape == (M, rank)
    assert torch.equal(xa, product[:, N:N + rank])
