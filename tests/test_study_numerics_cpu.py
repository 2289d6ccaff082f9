"""CPU tests of the accuracy study's FP8 numerics (studies/methods.py): stochastic rounding to
E4M3, the stochastic top-k row update and the update-mass meter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import falqon
from studies.methods import (E4M3_MAX, UpdateMassMeter, e4m3_spacing, stochastic_round_e4m3,
                             stochastic_topk_update_)

E4M3 = torch.float8_e4m3fn


def e4m3_values() -> torch.Tensor:
    """Every finite non-negative E4M3 value, ascending (from all 256 bit patterns)."""
    v = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    return torch.unique(v[torch.isfinite(v) & (v >= 0)])


# ---- stochastic rounding ------------------------------------------------------------------------

def test_spacing_is_the_gap_to_the_next_e4m3_value():
    v = e4m3_values()
    gaps = v[1:] - v[:-1]
    assert torch.equal(e4m3_spacing(v[:-1]), gaps)


def test_values_on_the_grid_are_kept():
    v = e4m3_values()
    v = torch.cat([v, -v])
    assert torch.equal(stochastic_round_e4m3(v), v)


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    # Random values over the whole range: subnormals, every binade, both signs, near 448.
    x = torch.cat([torch.ldexp(torch.rand(96) + 1, torch.randint(-12, 9, (96,))),
                   torch.tensor([447.9, 440.0, 0.3, 1e-4, 2.0**-9 * 0.5])])
    x = x * torch.where(torch.rand(x.shape) < 0.5, -1.0, 1.0)
    x = x.clamp(-E4M3_MAX, E4M3_MAX)
    n = 4000
    samples = stochastic_round_e4m3(x.expand(n, -1).contiguous())
    step = e4m3_spacing(x.abs())
    # On the E4M3 grid (the cast is exact) and one of the two neighbours of x.
    assert torch.equal(samples.to(E4M3).float(), samples)
    assert ((samples - x).abs() < step).all()
    # E[SR(x)] = x: each sample is x's lower neighbour plus step * Bernoulli(p), whose standard
    # deviation is at most step / 2, so the mean of n samples is within 5 step / (2 sqrt n) of x
    # except with probability < 1e-6 per value (a bound that cannot pass for a biased rounding:
    # rounding to nearest would be off by up to step / 2, 30x this bound).
    assert ((samples.mean(0) - x).abs() <= 5 * step / (2 * math.sqrt(n))).all()


def test_stochastic_rounding_never_exceeds_448():
    x = torch.tensor([447.99, 448.0, 449.0, 1e6, float("inf"), -447.99, -1e6, -float("inf")])
    out = stochastic_round_e4m3(x.expand(2000, -1).contiguous())
    assert out.abs().max() <= E4M3_MAX
    assert torch.isfinite(out.to(E4M3).float()).all()


# ---- the stochastic row update ------------------------------------------------------------------

def _layer(keep_residual: bool, transposed_copy: bool = False) -> falqon.MeldedLinear:
    """A proxy-mode layer (the stochastic update and the meter are the proxy mode's)."""
    layer = falqon.MeldedLinear.from_linear(nn.Linear(64, 48, bias=False), rank=16, topk=5,
                                            alpha=32.0, keep_residual=keep_residual,
                                            transposed_copy=transposed_copy, svd="exact",
                                            update_mode="proxy")
    # Updates of about one FP8 step, so that both rounding directions happen.
    layer.lora_B.data = torch.randn(48, 16) * 3.0
    return layer


@pytest.mark.parametrize("keep_residual", [False, True])
def test_stochastic_update_changes_the_topk_rows_by_the_update_in_expectation(keep_residual):
    base = _layer(keep_residual, transposed_copy=True)
    idx = torch.topk(base.lora_B.abs().sum(1), 5).indices
    rows = base.weight[:48].float()
    exact = rows[idx] + (base.lora_B[idx] @ base.weight[48:64].float()) * base.scaling
    exact = exact.clamp(-E4M3_MAX, E4M3_MAX)
    others = torch.ones(48, dtype=torch.bool)
    others[idx] = False
    trials, total = 200, torch.zeros_like(exact)
    gen = torch.Generator().manual_seed(1)
    layer = _layer(keep_residual, transposed_copy=True)
    for _ in range(trials):
        layer.weight.data.copy_(base.weight.data)
        layer.weight_t.copy_(base.weight_t)
        layer.lora_B.data.copy_(base.lora_B.data)
        stochastic_topk_update_(layer, None, gen)
        w = layer.weight.float()
        # Rows outside the top k, the adapter rows and the padding are untouched, bitwise.
        assert torch.equal(layer.weight[:48][others].view(torch.uint8),
                           base.weight[:48][others].view(torch.uint8))
        assert torch.equal(layer.weight[48:].view(torch.uint8), base.weight[48:].view(torch.uint8))
        assert ((w[idx] - exact).abs() < e4m3_spacing(exact.abs())).all()
        assert torch.equal(layer.weight_t.view(torch.uint8),
                           layer.weight[:48].t().contiguous().view(torch.uint8))
        if keep_residual:
            assert (layer.lora_B[idx] == 0).all()
            assert torch.equal(layer.lora_B[others], base.lora_B[others])
        else:
            assert (layer.lora_B == 0).all()
        total += w[idx]
    step = e4m3_spacing(exact.abs())
    assert ((total / trials - exact).abs() <= 5 * step / (2 * math.sqrt(trials))).all()


def test_stochastic_update_selects_the_rows_of_topk_update():
    a, b = _layer(False), _layer(False)
    b.weight.data, b.lora_B.data = a.weight.data.clone(), a.lora_B.data.clone()
    before = a.weight.data.clone()
    selected = set(torch.topk(a.lora_B.abs().sum(1), 5).indices.tolist())
    a.proxy_update()  # the op: the same selection, round to nearest even
    stochastic_topk_update_(b)
    for layer in (a, b):
        changed = (layer.weight.view(torch.uint8) != before.view(torch.uint8)).any(1)
        assert 0 < changed.sum() and set(torch.nonzero(changed).flatten().tolist()) <= selected
    # Round to nearest and stochastic rounding both land on a neighbour of the same exact value.
    diff = (a.weight.float() - b.weight.float()).abs()
    assert (diff <= e4m3_spacing(torch.maximum(a.weight.float().abs(),
                                               b.weight.float().abs()))).all()


# ---- the update-mass meter ----------------------------------------------------------------------

def test_update_mass_meter_measures_the_formulas():
    layer = _layer(False)
    b = layer.lora_B.detach().clone()
    a_real = layer.adapter_A()
    w0 = layer.dequantized_weight()
    meter = UpdateMassMeter([layer], every=2)
    proposed = layer.scaling * b @ a_real
    idx = torch.topk(b.abs().sum(1), 5).indices
    meter.begin_step(0)
    layer.proxy_update(5)
    delta = layer.dequantized_weight() - w0
    meter.begin_step(1)  # not sampled: the update runs, nothing is measured
    layer.lora_B.data = torch.randn(48, 16)
    layer.proxy_update(5)
    s = meter.summary()
    assert s["mass_samples"] == 1 and meter.calls == 2
    total = proposed.abs().sum()
    torch.testing.assert_close(s["selected_mass_fraction"],
                               (proposed[idx].abs().sum() / total).item(), rtol=1e-5, atol=0)
    torch.testing.assert_close(s["update_mass_fraction"],
                               (delta.abs().sum() / total).item(), rtol=1e-5, atol=0)
    torch.testing.assert_close(s["update_projection"],
                               ((delta * proposed).sum() / proposed.square().sum()).item(),
                               rtol=1e-5, atol=1e-7)
    # Only the selected rows moved, and by about the proposed update (FP8 rounding aside).
    assert 0 < s["update_mass_fraction"] < 2 * s["selected_mass_fraction"]


def test_update_mass_meter_notices_when_it_is_never_called():
    meter = UpdateMassMeter([_layer(False)], every=1)
    with pytest.raises(RuntimeError, match="never called"):
        meter.summary()
