"""The quantisation ops' CPU kernels (the reference numerics) against their definitions:
quantize (per tensor) bit for bit, its error within half an FP8 step, zeros, subnormal scales,
non-finite and non-contiguous inputs; quantize_delayed (the scale from an amax history) and
record_amax_. quantize_rows is in test_row_scales_cpu.py, the GEMMs in test_ops_cpu.py."""

import math

import pytest
import torch

import falqon
from falqon import ops
from falqon_testing import fp8_bytes
from cpu_formulas import (E4M3, E5M2, FMAX, HISTORY_KINDS, MANTISSA, MIN_NORMAL_EXP, history_of,
                          quantize_delayed_formula, quantize_formula)


# ---- quantize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5, 33), (64, 128)])
def test_quantize_matches_definition(dtype, in_dtype, shape):
    x = (torch.randn(shape) * 3).to(in_dtype)
    q, s = ops.quantize(x, dtype)
    q_ref, s_ref = quantize_formula(x, dtype)
    assert q.dtype == dtype and q.shape == x.shape and s.shape == () and s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert torch.equal(fp8_bytes(q), fp8_bytes(q_ref))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_error_is_within_half_a_step(dtype):
    # Independent of the formula: the dequantised value is within half an FP8 step of x.
    x = torch.randn(4096) * torch.logspace(-4, 1, 4096)
    q, s = ops.quantize(x, dtype)
    err = (q.double() * s.double() - x.double()).abs()
    m, emin = MANTISSA[dtype], MIN_NORMAL_EXP[dtype]
    half_subnormal_step = s.double() * 2.0 ** (emin - m - 1)
    assert bool((err <= 2.0 ** -(m + 1) * x.double().abs() + half_subnormal_step).all())
    # The largest magnitude lands exactly on the format's largest value.
    assert q.float().abs().max().item() == FMAX[dtype]


def test_quantize_zero_gives_finite_unit_scale():
    q, s = ops.quantize(torch.zeros(5, 16), E4M3)
    assert s.item() == 1.0 and not q.float().any()


def test_quantize_subnormal_scale_stays_finite():
    # amax / 448 is subnormal in fp32, so 1 / scale overflows: capped at the largest float32, the
    # zeros stay zeros (not 0 * Inf = NaN) and the rest keep their signs and order.
    x = torch.tensor([0.0, 1e-37, -5e-38, 0.0])
    q, scale = falqon.quantize(x, E4M3)
    assert 0 < scale.item() < torch.finfo(torch.float32).tiny
    expected, _ = quantize_formula(x, E4M3)
    assert torch.equal(fp8_bytes(q), fp8_bytes(expected))
    values = q.float().tolist()
    assert values[0] == values[3] == 0.0 and values[1] > -values[2] > 0


def test_quantize_keeps_non_finite_inputs_visible():
    x = torch.randn(32)
    x[3] = float("nan")
    q, s = ops.quantize(x, E4M3)
    assert math.isnan(s.item()) and torch.isnan(q.float()).any()


def test_quantize_non_contiguous_input():
    x = torch.randn(16, 24).t()
    q, s = ops.quantize(x, E4M3)
    q_ref, s_ref = quantize_formula(x.contiguous(), E4M3)
    assert torch.equal(fp8_bytes(q), fp8_bytes(q_ref)) and torch.equal(s, s_ref)


def test_quantize_rejects_bad_dtypes():
    with pytest.raises(RuntimeError, match="float8_e4m3fn or torch.float8_e5m2"):
        ops.quantize(torch.randn(4), torch.bfloat16)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.quantize(torch.arange(4), E4M3)


# ---- quantize_delayed --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", HISTORY_KINDS)
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 33), (64, 128)])
def test_quantize_delayed_matches_definition(kind, dtype, in_dtype, shape):
    x = (torch.randn(shape) * 3).to(in_dtype)
    own = x.float().abs().amax()
    history = history_of(kind, own)
    q, s, amax = ops.quantize_delayed(x, dtype, history)
    q_ref, s_ref, amax_ref = quantize_delayed_formula(x, dtype, history)
    assert q.dtype == dtype and q.shape == x.shape
    assert s.shape == amax.shape == () and s.dtype == amax.dtype == torch.float32
    assert torch.equal(s, s_ref) and torch.equal(fp8_bytes(q), fp8_bytes(q_ref))
    assert torch.equal(amax, amax_ref) and amax.item() == own.item(), "x's own amax, exactly"
    if kind in ("empty", "nan", "nonpositive"):
        # Nothing usable recorded: exactly current scaling.
        q_cur, s_cur = ops.quantize(x, dtype)
        assert torch.equal(s, s_cur) and torch.equal(fp8_bytes(q), fp8_bytes(q_cur))
    else:
        assert s.item() == pytest.approx(history.max().item() / FMAX[dtype], rel=2**-23)


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_delayed_saturates_above_the_history_in_float64(dtype):
    # Independent of the formula: with the history's amax a, values up to a are within half an FP8
    # step of x after dequantisation (as current scaling), values beyond a saturate at +-fmax.
    x = torch.randn(4096) * torch.logspace(-4, 1, 4096)
    a = 0.1 * x.abs().max().item()
    history = torch.tensor([a * 0.5, a, 0.0, a * 0.25])
    q, s, amax = ops.quantize_delayed(x, dtype, history)
    assert s.double().item() == pytest.approx(a / FMAX[dtype], rel=2**-23)
    assert amax.item() == x.abs().max().item()
    xd, qd = x.double(), q.double()
    above = xd.abs() / s.double() >= FMAX[dtype]
    assert above.sum() > 20, "setup: values beyond the recorded amax"
    assert torch.equal(qd[above], torch.sign(xd[above]) * FMAX[dtype])
    err = (qd * s.double() - xd).abs()[~above]
    m, emin = MANTISSA[dtype], MIN_NORMAL_EXP[dtype]
    bound = 2.0 ** -(m + 1) * xd.abs()[~above] + s.double() * 2.0 ** (emin - m - 1)
    assert bool((err <= bound).all())


def test_quantize_delayed_edge_cases():
    # An empty input: amax 0, the scale still from the history (or 1 with nothing recorded).
    q, s, amax = ops.quantize_delayed(torch.empty(0, 16), E4M3, torch.tensor([0.0, 4.48]))
    assert q.shape == (0, 16) and amax.item() == 0.0 and s.item() == pytest.approx(0.01)
    q, s, amax = ops.quantize_delayed(torch.empty(0), E4M3, torch.zeros(3))
    assert s.item() == 1.0 and amax.item() == 0.0
    # Zeros with an empty history: scale 1, q = 0, everything finite (as current scaling).
    q, s, amax = ops.quantize_delayed(torch.zeros(5, 16), E4M3, torch.zeros(1))
    assert s.item() == 1.0 and amax.item() == 0.0 and not q.float().any()
    # A history whose max / fmax underflows: scale 1 (the same rule as amax == 0).
    x = torch.randn(8) * 1e-3
    q, s, _ = ops.quantize_delayed(x, E4M3, torch.tensor([1e-44]))
    assert s.item() == 1.0 and torch.equal(fp8_bytes(q), fp8_bytes(x.clamp(-448, 448).to(E4M3)))
    # A non-contiguous input and a history of any shape.
    x = torch.randn(16, 24).t()
    h = torch.rand(2, 3)
    q, s, amax = ops.quantize_delayed(x, E5M2, h)
    q_ref, s_ref, a_ref = quantize_delayed_formula(x.contiguous(), E5M2, h)
    assert torch.equal(fp8_bytes(q), fp8_bytes(q_ref)) and torch.equal(s, s_ref)


def test_quantize_delayed_rejects_bad_arguments():
    x = torch.randn(4)
    with pytest.raises(RuntimeError, match="amax_history must be a float32 tensor of at least one"):
        ops.quantize_delayed(x, E4M3, torch.zeros(0))
    with pytest.raises(RuntimeError, match="amax_history must be a float32 tensor of at least one"):
        ops.quantize_delayed(x, E4M3, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="float8_e4m3fn or torch.float8_e5m2"):
        ops.quantize_delayed(x, torch.bfloat16, torch.zeros(3))


def test_record_amax_rolls_the_history():
    h = torch.tensor([3.0, 2.0, 1.0])
    ops.record_amax_(h, torch.tensor(7.0))
    assert h.tolist() == [7.0, 3.0, 2.0]
    one = torch.zeros(1)
    ops.record_amax_(one, torch.tensor(5.0))
    assert one.tolist() == [5.0]
    # A row of a (2, H) layer history, as the layers record into.
    layer_history = torch.arange(8.0).reshape(2, 4)
    ops.record_amax_(layer_history[1], torch.tensor(9.0))
    assert layer_history.tolist() == [[0.0, 1.0, 2.0, 3.0], [9.0, 4.0, 5.0, 6.0]]


def test_record_amax_rejects_bad_arguments():
    for history, amax, match in ((torch.zeros(2, 3), torch.tensor(1.0), "1-D float32"),
                                 (torch.zeros(0), torch.tensor(1.0), "at least one value"),
                                 (torch.zeros(4, dtype=torch.float64), torch.tensor(1.0), "float32"),
                                 (torch.zeros(8)[::2], torch.tensor(1.0), "contiguous"),
                                 (torch.zeros(4), torch.tensor([1.0, 2.0]), "one float32 value"),
                                 (torch.zeros(4), torch.tensor(1.0, dtype=torch.bfloat16),
                                  "one float32 value")):
        with pytest.raises(RuntimeError, match=match):
            ops.record_amax_(history, amax)
