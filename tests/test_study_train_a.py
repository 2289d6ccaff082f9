"""CPU tests of the study's trained-A probe (studies/train_a.py, the method falqon_adapter_train_a):
LoRA's dA against float64, y, dx and dB left bit for bit, A's FP8 rows following the optimizer
and staying in range, and the method's place among the study's methods."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import falqon
from studies import train_a
from studies.methods import FAMILIES, LR_GRIDS, METHODS, resolve_methods

E4M3 = torch.float8_e4m3fn


def _adapter_layer(k=32, n=48, rank=4):
    torch.manual_seed(0)
    layer = falqon.MeldedLinear.from_linear(nn.Linear(k, n, bias=False), rank=rank,
                                            update_mode="adapter")
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trained_a_gets_loras_gradient_and_leaves_the_rest_bit_for_bit(dtype):
    layer = _adapter_layer()
    plain = copy.deepcopy(layer)
    (probe,) = train_a.install([layer])
    assert torch.equal(layer.probe_A, layer.adapter_A()) and layer.probe_A.requires_grad
    x = torch.randn(2, 3, 32, dtype=dtype)
    g = torch.randn(2, 3, 48, dtype=dtype)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y_plain, y = plain(xs[0]), layer(xs[1])
    assert y.dtype == y_plain.dtype and torch.equal(y, y_plain)  # the added term is zeros
    y_plain.backward(g)
    y.backward(g)
    assert torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(plain.lora_B.grad, layer.lora_B.grad)
    # LoRA's dA = scaling (g B)^T x, against float64 (the probe computes it in fp32).
    g64, x64 = g.reshape(-1, 48).double(), x.reshape(-1, 32).double()
    expect = layer.scaling * (g64 @ layer.lora_B.double()).t() @ x64
    err = (layer.probe_A.grad.double() - expect).abs().max() / expect.abs().max()
    assert err < 1e-5, err


def test_trained_a_rows_follow_the_optimizer_and_stay_in_range():
    layer = _adapter_layer()
    (probe,) = train_a.install([layer])
    s0 = layer.scaling
    before = layer.weight.detach().clone()
    opt = torch.optim.SGD([layer.probe_A], lr=0.05)
    layer.probe_A.grad = torch.randn_like(layer.probe_A)
    handle = train_a.sync_after_steps(opt, [probe])
    opt.step()
    n, r = layer.out_features, layer.rank
    # (the melded A sits at the weight's amax on this tiny layer, so a step may push it past)
    assert probe.c >= 1.0 and layer.scaling == s0 * probe.c
    want = (layer.probe_A.detach() / layer.weight_scale / probe.c).clamp(-448, 448).to(E4M3)
    assert torch.equal(layer.weight[n:n + r].view(torch.uint8), want.view(torch.uint8))
    assert not torch.equal(layer.weight[n:n + r].view(torch.uint8),
                           before[n:n + r].view(torch.uint8))
    assert torch.equal(layer.weight[:n].view(torch.uint8), before[:n].view(torch.uint8))
    assert torch.equal(layer.weight[n + r:].view(torch.uint8), before[n + r:].view(torch.uint8))
    # The forward's x A^T now comes from the trained A, to FP8 precision: half a step, 2^-4
    # relative, or half the smallest subnormal step (2^-9 of the scale) near zero.
    tol = dict(rtol=2 ** -4, atol=float(layer.weight_scale) * 2 ** -10)
    assert torch.allclose(layer.adapter_A() * probe.c, layer.probe_A.detach(), rtol=2 ** -4,
                          atol=tol["atol"] * probe.c)
    # An A past the weight's FP8 range: its rows hold A / c, the layer's scaling is s0 c, and the
    # layer computes what LoRA's A would (its effective A, scaling / s0 * rows, is A).
    with torch.no_grad():
        layer.probe_A.mul_(8 * 448 * float(layer.weight_scale) / layer.probe_A.abs().max())
    probe.sync()
    assert probe.c == pytest.approx(8.0) and layer.scaling == pytest.approx(s0 * 8.0)
    assert layer.weight[n:n + r].float().abs().max() == 448
    assert torch.allclose(layer.adapter_A() * (layer.scaling / s0), layer.probe_A.detach(),
                          rtol=2 ** -4, atol=8 * tol["atol"])
    x = torch.randn(5, 32)
    expect = x.double() @ layer.dequantized_weight().double()[:n].t() + s0 * (
        x.double() @ layer.probe_A.detach().double().t()) @ layer.lora_B.detach().double().t()
    assert (layer(x).double() - expect).abs().max() / expect.abs().max() < 0.08  # FP8 x and W
    assert train_a.RangeMeter([probe]).summary() == {"trained_A_max_c": pytest.approx(8.0)}
    handle.remove()
    with pytest.raises(ValueError, match="adapter mode"):
        train_a.TrainedA(falqon.MeldedLinear.from_linear(nn.Linear(32, 48), rank=4,
                                                         update_mode="proxy"))


def test_train_a_method_set():
    assert [m.name for m in resolve_methods(["train_a"])] == [
        "lora_bf16", "falqon_adapter", "falqon_adapter_train_a", "falqon_adapter_train_a_lib"]
    lib = METHODS["falqon_adapter_train_a_lib"]
    assert lib.adapter and lib.train_a_lib and not lib.train_a
    m = METHODS["falqon_adapter_train_a"]
    assert m.adapter and m.train_a and not METHODS["falqon_adapter"].train_a
    assert FAMILIES[m.family] == m.name and LR_GRIDS[m.family] == LR_GRIDS["falqon_adapter"]
