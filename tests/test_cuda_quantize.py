"""torch.ops.falqon's quantisation ops on the GPU against the CPU reference (csrc/reference.cpp),
bitwise: quantize (per tensor, current scaling), quantize_delayed and record_amax_ (delayed
scaling: the scale from an amax history), inputs drawn on the CPU over ~12 binades, views with odd
offsets, special values and CUDA-graph replays. quantize_rows is in test_cuda_row_scales.py, the
GEMMs in test_cuda_ops.py. Skipped without a CUDA GPU with FP8 (see cuda_testing for the CPU dry
run of these tests' code)."""

from __future__ import annotations

import math

import pytest
import torch

import falqon
from falqon import ops
from cuda_testing import (
    ACT_DTYPES as ACT, E4M3, FP8, VIEWS, assert_fp8_equal, check_quantize, cuda_only,
    delayed_history, emulation_subset, fp8_codes_sorted, gpu, short, to_dev, wide_range)

pytestmark = [pytest.mark.gpu, gpu]


# ---- quantize ---------------------------------------------------------------------------------

QUANT_SHAPES = [(0,), (1,), (7,), (3, 5, 7), (1023,), (4097, 3), (8192, 4096)]


@pytest.mark.parametrize("shape", emulation_subset(QUANT_SHAPES, lambda s: math.prod(s) < 1e6),
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("out", FP8, ids=short)
@pytest.mark.parametrize("inp", ACT, ids=short)
def test_quantize_matches_cpu(shape, out, inp):
    x = wide_range(shape, inp)
    check_quantize(to_dev(x), x, out, f"quantize {shape} {inp} -> {out}")


@pytest.mark.parametrize("view", VIEWS, ids=str)
@pytest.mark.parametrize("out", FP8, ids=short)
@pytest.mark.parametrize("inp", (torch.bfloat16, torch.float32), ids=short)
def test_quantize_views_match_cpu(view, out, inp):
    base = wide_range((1000, 333), inp)
    fn = VIEWS[view]
    # The same view of the same data on both devices (.to() would make a view contiguous).
    check_quantize(fn(to_dev(base)), fn(base), out, f"quantize {view} {inp} -> {out}")


@pytest.mark.parametrize("out", FP8, ids=short)
@pytest.mark.parametrize("inp", ACT, ids=short)
def test_quantize_rounds_ties_to_even(out, inp):
    # fmax itself makes amax / fmax exactly 1, so the kernel sees the midpoints between
    # neighbouring FP8 values unscaled: each must go to the neighbour with the even code.
    values = fp8_codes_sorted(out)            # codes 0, 1, 2, ... in ascending order
    mid = (values[:-1] + values[1:]) / 2
    x = torch.cat([values[-1:], mid, -mid])
    assert torch.equal(x.to(inp).float(), x), "midpoints not exact in the input dtype"
    q_d, s_d = check_quantize(to_dev(x.to(inp)), x.to(inp), out, f"ties {inp} -> {out}")
    assert s_d.item() == 1.0
    lo = torch.arange(len(mid), dtype=torch.int32)
    even = torch.where(lo % 2 == 0, lo, lo + 1)
    expected = torch.cat([torch.tensor([len(values) - 1], dtype=torch.int32), even, even | 0x80])
    assert torch.equal(q_d.cpu().view(torch.uint8).to(torch.int32), expected)


@pytest.mark.parametrize("out", FP8, ids=short)
@pytest.mark.parametrize("case", ["zeros", "underflow", "nan", "inf", "saturate_neg"])
def test_quantize_special_values_match_cpu(case, out):
    x = torch.randn(4099)
    if case == "zeros":
        x.zero_()
    elif case == "underflow":    # amax / fmax underflows to 0 in float32: scale 1, q = 0
        x = torch.full((4099,), 1e-45)
    elif case == "nan":
        x[1234] = float("nan")
    elif case == "inf":
        x[17] = float("inf")
    else:                        # the amax element negative, at the end
        x[-1] = -10 * x.abs().max()
    q, s = check_quantize(to_dev(x), x, out, f"quantize {case} -> {out}")
    if case in ("zeros", "underflow"):
        assert s.item() == 1.0 and not q.cpu().view(torch.uint8).any()
    if case == "nan":
        assert s.isnan() and q.cpu().float().isnan().all()
    if case == "saturate_neg":
        assert q.cpu()[-1].float().item() == -ops.FP8_MAX[out]


# ---- quantize_delayed ---------------------------------------------------------------------------

def check_quantize_delayed(x_dev, x_cpu, dtype, history, what):
    q_d, s_d, a_d = falqon.quantize_delayed(x_dev, dtype, to_dev(history))
    q_c, s_c, a_c = falqon.quantize_delayed(x_cpu, dtype, history)
    assert q_d.device == s_d.device == a_d.device == x_dev.device, what
    assert q_d.dtype == dtype and q_d.shape == x_dev.shape and q_d.is_contiguous(), what
    assert s_d.shape == a_d.shape == () and s_d.dtype == a_d.dtype == torch.float32, what
    assert_fp8_equal(q_d, q_c, what)
    # The scale is one correctly rounded division of the same amax on both; the amax an exact
    # maximum (NaN compares as NaN: its payload may differ).
    for name, d, c in (("scale", s_d.cpu(), s_c), ("amax", a_d.cpu(), a_c)):
        assert torch.equal(d, c) or (d.isnan() and c.isnan()), (what, name, d.item(), c.item())
    return q_d, s_d.cpu(), a_d.cpu()


@pytest.mark.parametrize("kind", ["empty", "below", "above", "nan"])
@pytest.mark.parametrize("shape", emulation_subset(QUANT_SHAPES, lambda s: math.prod(s) < 1e6),
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("out", FP8, ids=short)
@pytest.mark.parametrize("inp", ACT, ids=short)
def test_quantize_delayed_matches_cpu(kind, shape, out, inp):
    x = wide_range(shape, inp)
    amax = x.float().abs().amax().item() if x.numel() else 1.0
    history = delayed_history(kind, amax)
    q, s, a = check_quantize_delayed(to_dev(x), x, out, history,
                                     f"quantize_delayed {shape} {inp} -> {out}, {kind}")
    if x.numel():
        assert a.item() == amax
    if kind in ("empty", "nan"):   # nothing usable recorded: exactly current scaling
        q_cur, s_cur = falqon.quantize(to_dev(x), out)
        assert_fp8_equal(q, q_cur, "delayed with an empty history vs quantize")
        assert torch.equal(s, s_cur.cpu())
    if kind == "below" and x.numel():  # the history's max is under 3/4 of x's: the top saturates
        assert (q.cpu().float().abs() == ops.FP8_MAX[out]).sum() >= 1


@pytest.mark.parametrize("view", VIEWS, ids=str)
@pytest.mark.parametrize("out", FP8, ids=short)
@pytest.mark.parametrize("kind", ["empty", "below"])
def test_quantize_delayed_views_match_cpu(view, out, kind):
    base = wide_range((1000, 333), torch.bfloat16)
    fn = VIEWS[view]
    history = delayed_history(kind, base.float().abs().amax().item(), H=5)
    check_quantize_delayed(fn(to_dev(base)), fn(base), out, history,
                           f"quantize_delayed {view} -> {out}, {kind}")


@pytest.mark.parametrize("out", FP8, ids=short)
def test_quantize_delayed_special_values_match_cpu(out):
    x = torch.randn(4099)
    x[17] = float("inf")                   # Inf saturates at the delayed scale; amax is Inf
    check_quantize_delayed(to_dev(x), x, out, torch.tensor([0.5, 2.0, 0.0]), "inf input")
    x = torch.randn(4099)
    x[1234] = float("nan")                 # NaN stays NaN; amax is NaN (for the caller to see)
    _, _, a = check_quantize_delayed(to_dev(x), x, out, torch.tensor([1.0]), "nan input")
    assert a.isnan()
    check_quantize_delayed(to_dev(torch.zeros(4099)), torch.zeros(4099), out, torch.zeros(4),
                           "zeros, empty history")
    # A history of +Inf has nothing usable (as one holding a NaN): current scaling.
    check_quantize_delayed(to_dev(x), x, out, torch.tensor([float("inf")]), "inf history")


@pytest.mark.parametrize("out", FP8, ids=short)
def test_quantize_delayed_recorded_over_steps_matches_cpu(out):
    # The way a layer uses it: each call's amax recorded into the history for the next ones.
    h_d, h_c = to_dev(torch.zeros(4)), torch.zeros(4)
    for step, scale in enumerate((1.0, 8.0, 0.25, 2.0, 0.5, 1.0)):
        x = (torch.randn(777, 96) * scale).to(torch.bfloat16)
        check_quantize_delayed(to_dev(x), x, out, h_c, f"step {step}")
        q_d, s_d, a_d = falqon.quantize_delayed(to_dev(x), out, h_d)
        q_c, s_c, a_c = falqon.quantize_delayed(x, out, h_c)
        ops.record_amax_(h_d, a_d)
        ops.record_amax_(h_c, a_c)
        assert torch.equal(h_d.cpu(), h_c), step


@pytest.mark.parametrize("H", [1, 2, 16, 255, 256, 257, 1024, 1500])
def test_record_amax_matches_cpu(H):
    # One block shifts the history in chunks of 256 values: lengths around and past a chunk.
    h_c = torch.rand(2, H)
    h_d = to_dev(h_c).clone()
    for step in range(3):
        amax = torch.tensor(float(10 + step))
        ops.record_amax_(h_d[1], to_dev(amax))
        ops.record_amax_(h_c[1], amax)
        assert torch.equal(h_d.cpu(), h_c), (H, step)


@pytest.mark.parametrize("H", [1, 5, 300])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_record_amax_skips_non_finite_like_cpu(H, bad):
    # A NaN or Inf amax is never recorded (decided on the device), as in the reference; and a
    # history holding a NaN or +Inf has nothing usable: delayed = current scaling on both.
    h_c = torch.rand(H) + 0.5
    h_d = to_dev(h_c).clone()
    ops.record_amax_(h_d, to_dev(torch.tensor(bad)))
    ops.record_amax_(h_c, torch.tensor(bad))
    assert torch.equal(h_d.cpu(), h_c) and torch.isfinite(h_c).all()
    x = torch.randn(777, 96).to(torch.bfloat16)
    for out in FP8:
        poisoned = torch.cat([h_c[:-1], torch.tensor([abs(bad)])])
        q, s, _ = check_quantize_delayed(to_dev(x), x, out, poisoned, f"history with {bad}")
        assert torch.equal(s, falqon.quantize(x, out)[1])


@cuda_only
def test_quantize_delayed_decides_on_the_device_in_a_cuda_graph():
    # Captured once with an empty history, the graph must follow the history's contents at replay
    # (no host read decided the path at capture time).
    x = wide_range((4096, 64), torch.bfloat16).cuda()
    history = torch.zeros(8, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):   # raises if the op synchronises with the host
        q, s, a = falqon.quantize_delayed(x, E4M3, history)
    graph.replay()
    q_cur, s_cur = falqon.quantize(x, E4M3)
    assert_fp8_equal(q, q_cur, "replay with an empty history")
    assert torch.equal(s, s_cur) and a.item() == x.float().abs().max().item()
    history[2] = 0.5 * a           # now the history holds a value: delayed, the top saturates
    graph.replay()
    q_c, s_c, a_c = falqon.quantize_delayed(x.cpu(), E4M3, history.cpu())
    assert_fp8_equal(q, q_c, "replay with a recorded amax")
    assert torch.equal(s.cpu(), s_c) and torch.equal(a.cpu(), a_c)
    assert (q.cpu().float().abs() == 448).sum() > 1
