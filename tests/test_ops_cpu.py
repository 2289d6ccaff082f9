"""The ops' CPU kernels (the reference numerics) against formulas written here in float64.

Tolerances:
- quantize is exact: the formula below is the definition, so q must match bit for bit.
- A product of FP8 operands is exact in float64 (each FP8 value has <= 4 significant bits), so
  the only errors of the op are its fp32 accumulation and the rounding of the result. For a sum
  of K terms in fp32, |fl(sum) - sum| <= gamma_K * sum|terms| with gamma_K = K u / (1 - K u),
  u = 2^-24 (Higham, Accuracy and Stability, 3.1); the final cast to bf16 adds at most half an
  ulp, 2^-8 relative (8 significant bits). `product_bound` adds those up, with a little room for the scale multiply.
"""

import math

import pytest
import torch

import falqon
from falqon import ops
from falqon_testing import fp8_bytes, opcheck, rel_err

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FMAX = {E4M3: 448.0, E5M2: 57344.0}
# Mantissa bits and the exponent of the smallest normal number of each format.
MANTISSA = {E4M3: 3, E5M2: 2}
MIN_NORMAL_EXP = {E4M3: -6, E5M2: -14}
# Unit roundoff 2^-p of each output format (p significant bits, the implicit one included).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def scale_formula(amax, dtype):
    """amax / fmax in fp32, 1 where that is 0."""
    scale = amax / FMAX[dtype]
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def cast_formula(xf, scale, dtype):
    """fp8(clamp(x / scale, -fmax, fmax)) of an fp32 x, in the op's fp32 arithmetic."""
    # x / scale is x times the reciprocal rounded once to fp32 (capped at the largest float32),
    # the arithmetic of the GPU's cast; it differs from the true quotient by at most an fp32 ulp.
    inv = 1.0 / scale
    inv = torch.where(inv > torch.finfo(torch.float32).max, torch.finfo(torch.float32).max, inv)
    return (xf * inv).clamp(-FMAX[dtype], FMAX[dtype]).to(dtype)


def quantize_formula(x, dtype):
    """Per-tensor scaling as DESIGN.md defines it, in the op's fp32 arithmetic."""
    xf = x.float()
    amax = xf.abs().amax() if xf.numel() else torch.zeros(())
    scale = scale_formula(amax, dtype)
    return cast_formula(xf, scale, dtype), scale


def quantize_rows_formula(x, dtype):
    """Row-wise scaling: quantize_formula on each row of a 2-D x; the scales as an (M, 1) column."""
    rows = [quantize_formula(row, dtype) for row in x]
    return (torch.stack([q for q, _ in rows]).reshape(x.shape),
            torch.stack([s for _, s in rows]).reshape(-1, 1))


def quantize_input_formula(x, update_mode):
    """x's E4M3 quantisation in a MeldedLinear with current scaling: per row in the adapter mode,
    per tensor in the proxy mode."""
    return (quantize_rows_formula if update_mode == "adapter" else quantize_formula)(x, E4M3)


def quantize_delayed_formula(x, dtype, history):
    """Delayed scaling as the brief defines it: (q, scale, x's own amax); the amax used is
    max(history) where it is > 0 (false for a NaN), else x's own."""
    xf = x.float()
    amax = xf.abs().amax() if xf.numel() else torch.zeros(())
    recorded = history.float().max()
    scale = scale_formula(torch.where(recorded > 0, recorded, amax), dtype)
    return cast_formula(xf, scale, dtype), scale, amax


def product_bound(a_abs, b_abs_t, K, out_dtype, ref, scale=1.0):
    """Elementwise bound on |op - ref| for ref = (a @ b) * scale, the product accumulated in fp32,
    scaled, and cast to out_dtype."""
    u = 2.0**-24
    gamma = K * u / (1 - K * u)
    accumulation = gamma * (a_abs @ b_abs_t) * scale
    return UNIT_ROUNDOFF[out_dtype] * (ref.abs() + accumulation) + accumulation + 4 * u * ref.abs()


def random_weight(n, k, dtype=torch.float32):
    # LLaMA-like weights: normal with a few larger outliers, so the scale is set by a tail.
    w = torch.randn(n, k) * 0.02
    w.view(-1)[torch.randint(0, n * k, (max(1, n * k // 500),))] *= 8
    return w.to(dtype)


def melded(n, k, rank, svd="exact", bias=False):
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(random_weight(n, k))
    return lin, falqon.MeldedLinear.from_linear(lin, rank=rank, svd=svd)


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

def history_of(kind, amax, H=5):
    """An amax history of H values relative to the input's amax."""
    h = torch.rand(H) * 0.5 + 0.25          # fresh random values in [0.25, 0.75)
    if kind == "empty":
        return torch.zeros(H)
    if kind == "below":                     # the input exceeds the history: values saturate
        return h * amax
    if kind == "above":                     # the input is below what was recorded
        return (h + 1.5) * amax
    if kind == "nan":                       # max(history) is NaN, > 0 false: own amax
        h[1] = float("nan")
        return h * amax
    if kind == "nonpositive":               # nothing > 0: own amax
        return -h * amax * torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])[:H]
    raise ValueError(kind)


HISTORY_KINDS = ("empty", "below", "above", "nan", "nonpositive")


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


# ---- melded_linear forward ---------------------------------------------------------------------

@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k,rank", [(64, 48, 8), (96, 160, 16), (32, 64, 20)])
def test_melded_linear_forward(act_dtype, bias, n, k, rank):
    lin, layer = melded(n, k, rank, bias=bias)
    x = torch.randn(2, 3, k).to(act_dtype)
    B = torch.randn(n, rank)  # never enters the forward: any value gives the same output
    y, xa, _ = torch.ops.falqon.melded_linear(x, layer.weight, layer.weight_scale, B,
                                           layer.bias, None, 1.0, None)
    xq, sx = quantize_formula(x.reshape(-1, k), E4M3)
    wq, s = layer.weight.double(), layer.weight_scale.double()
    scale = sx.double() * s
    ref = (xq.double() @ wq.t()) * scale
    if bias:
        ref[:, :n] += lin.bias.double()
    bound = product_bound(xq.double().abs(), wq.abs().t(), k, act_dtype, ref, scale)
    if bias:  # one more fp32 rounding, of the biased sum
        bound[:, :n] += 2.0**-24 * ref[:, :n].abs()
    r16 = ops.padded_rank(rank)
    assert y.shape == (2, 3, n) and xa.shape == (2, 3, rank)
    assert y.dtype == xa.dtype == act_dtype
    assert y.stride() == (3 * (n + r16), n + r16, 1), "y is a view of the (.., N + r16) product"
    assert xa.is_contiguous()
    assert bool(((y.reshape(-1, n).double() - ref[:, :n]).abs() <= bound[:, :n]).all())
    assert bool(((xa.reshape(-1, rank).double() - ref[:, n:n + rank]).abs()
                 <= bound[:, n:n + rank]).all())


def test_melded_linear_is_close_to_the_original_layer():
    # The end-to-end FP8 error (x and W both rounded to E4M3: ~2^-4 relative per element, a few
    # percent rms on a product) against the unquantised layer.
    lin, layer = melded(128, 256, 16, bias=True)
    x = torch.randn(64, 256)
    assert rel_err(layer(x), lin(x).detach()) < 0.06


# ---- backward ---------------------------------------------------------------------------------

def _formula_grads(x_deq, g, w_real, a_real, scaling, bias):
    """Autograd of y = x W^T + scaling (x A^T) B^T + b at B = 0, in float64."""
    x = x_deq.clone().requires_grad_(True)
    B = torch.zeros(w_real.shape[0], a_real.shape[0], dtype=torch.float64, requires_grad=True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    y = x @ w_real.t() + scaling * (x @ a_real.t()) @ B.t()
    if b is not None:
        y = y + b
    y.backward(g)
    return x.grad, B.grad, None if b is None else b.grad


@pytest.mark.parametrize("grad_dtype", [E5M2, E4M3])
@pytest.mark.parametrize("alpha", [None, 32.0])
def test_melded_linear_backward_matches_autograd_of_the_formula(grad_dtype, alpha):
    n, k, rank = 64, 96, 16
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(random_weight(n, k))
    layer = falqon.MeldedLinear.from_linear(lin, rank=rank, alpha=alpha, grad_dtype=grad_dtype)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 5, k, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4, 5, n, dtype=torch.bfloat16)
    layer(x).backward(g)

    xq, sx = quantize_input_formula(x.detach().reshape(-1, k), layer.update_mode)
    gq, sg = quantize_formula(g.reshape(-1, n), grad_dtype)
    s = layer.weight_scale.double()
    w_q = layer.weight[:n].double()
    w_real, a_real = w_q * s, layer.weight[n:n + rank].double() * s
    x_deq = xq.double() * sx.double()

    # dx: the FP8 product of the quantised gradient with the FP8 weight rows, exactly.
    dx_ref = (gq.double() @ w_q) * sg.double() * s
    bound = product_bound(gq.double().abs(), w_q.abs(), n, torch.bfloat16, dx_ref, sg.double() * s)
    dx = x.grad.reshape(-1, k).double()
    assert bool(((dx - dx_ref).abs() <= bound).all())
    # ... and the unquantised formula's dx within the gradient format's rounding noise.
    dx_formula, dB_formula, db_formula = _formula_grads(
        x_deq, g.reshape(-1, n).double(), w_real, a_real, layer.scaling, layer.bias)
    assert rel_err(dx, dx_formula) < {E5M2: 0.08, E4M3: 0.04}[grad_dtype]

    # dB = scaling g^T (x A^T): bf16 operands (xa is the forward's bf16 output), fp32
    # accumulation over M tokens, rounded to bf16 (2^-8) and cast to lora_B's fp32. Each xa
    # element carries a bf16 rounding too (2^-8 relative): the bound is 2^-8 |g|^T |xa| + 2^-8 |dB|.
    dB = layer.lora_B.grad.double()
    xa_ref = x_deq @ a_real.t()
    g2 = g.reshape(-1, n).double()
    dB_bound = layer.scaling * 2.0**-8 * (g2.abs().t() @ xa_ref.abs()) * (1 + 2.0**-7)
    assert bool(((dB - dB_formula).abs() <= dB_bound + 2.0**-8 * dB_formula.abs()).all())
    assert torch.allclose(layer.bias.grad.double(), db_formula, rtol=2**-8, atol=1e-3)


def test_backward_with_every_optional_argument_left_at_its_default():
    # The dispatcher strips trailing defaulted arguments before autograd: backward must cope.
    _, layer = melded(32, 48, 8)
    x = torch.randn(3, 48, requires_grad=True)
    B = torch.zeros(32, 8, requires_grad=True)
    ops.melded_linear(x, layer.weight, layer.weight_scale, B).sum().backward()
    assert x.grad is not None and B.grad is not None and B.grad.abs().sum() > 0


def test_backward_without_input_grad_skips_dx():
    _, layer = melded(32, 32, 8)
    x = torch.randn(3, 32)
    layer(x).sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0


# ---- delayed scaling in melded_linear ----------------------------------------------------------

def _layer_history(x_hist, g_hist):
    return torch.stack([x_hist, g_hist]).contiguous()


@pytest.mark.parametrize("kind", HISTORY_KINDS)
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_melded_linear_forward_with_a_history(kind, act_dtype):
    n, k, rank = 64, 96, 8
    lin, layer = melded(n, k, rank, bias=True)
    x = (torch.randn(3, 7, k) * 2).to(act_dtype)
    own = x.float().abs().amax()
    history = _layer_history(history_of(kind, own, H=5), torch.rand(5))
    B = torch.randn(n, rank)
    y, xa, x_amax = torch.ops.falqon.melded_linear(x, layer.weight, layer.weight_scale, B,
                                                   layer.bias, None, 1.0, None, history)
    assert x_amax.shape == () and x_amax.dtype == torch.float32 and x_amax.item() == own.item()
    # x is quantised with row 0's delayed scale (row 1, the gradient's, plays no part) ...
    xq, sx, _ = quantize_delayed_formula(x.reshape(-1, k), E4M3, history[0])
    wq, s = layer.weight.double(), layer.weight_scale.double()
    scale = sx.double() * s
    ref = (xq.double() @ wq.t()) * scale
    ref[:, :n] += lin.bias.double()
    bound = product_bound(xq.double().abs(), wq.abs().t(), k, act_dtype, ref, scale)
    bound[:, :n] += 2.0**-24 * ref[:, :n].abs()
    assert bool(((y.reshape(-1, n).double() - ref[:, :n]).abs() <= bound[:, :n]).all())
    assert bool(((xa.reshape(-1, rank).double() - ref[:, n:n + rank]).abs()
                 <= bound[:, n:n + rank]).all())
    # ... and with nothing usable recorded the op is exactly the current-scaling op.
    y0, xa0, amax0 = torch.ops.falqon.melded_linear(x, layer.weight, layer.weight_scale, B,
                                                    layer.bias, None, 1.0, None)
    assert torch.equal(amax0, x_amax), "the current-scaling op returns x's amax too"
    assert torch.equal(y, y0) == (kind in ("empty", "nan", "nonpositive"))


def test_melded_linear_rejects_a_bad_history():
    _, layer = melded(32, 48, 8)
    x, B = torch.randn(3, 48), torch.zeros(32, 8)
    for bad in (torch.zeros(5), torch.zeros(3, 4), torch.zeros(2, 0),
                torch.zeros(2, 4, dtype=torch.bfloat16)):
        with pytest.raises(RuntimeError, match="amax_history"):
            torch.ops.falqon.melded_linear(x, layer.weight, layer.weight_scale, B, None, None,
                                           1.0, None, bad)


@pytest.mark.parametrize("kind", ["empty", "below", "above"])
def test_melded_linear_grad_input_with_a_history(kind):
    n, k, rank = 64, 48, 8
    _, layer = melded(n, k, rank)
    g = torch.randn(2, 5, n, dtype=torch.bfloat16)
    own = g.float().abs().amax()
    hist = history_of(kind, own, H=3)
    dx, g_amax = torch.ops.falqon.melded_linear_grad_input(g, layer.weight, layer.weight_scale,
                                                           None, None, hist, rank=rank)
    assert g_amax.item() == own.item()
    gq, sg, _ = quantize_delayed_formula(g.reshape(-1, n), E5M2, hist)
    w_q, s = layer.weight[:n].double(), layer.weight_scale.double()
    ref = (gq.double() @ w_q) * sg.double() * s
    bound = product_bound(gq.double().abs(), w_q.abs(), n, torch.bfloat16, ref, sg.double() * s)
    assert bool(((dx.reshape(-1, k).double() - ref).abs() <= bound).all())
    dx0, amax0 = torch.ops.falqon.melded_linear_grad_input(g, layer.weight, layer.weight_scale,
                                                           rank=rank)
    assert torch.equal(amax0, g_amax)
    assert torch.equal(dx0, dx) == (kind == "empty")
    assert torch.equal(ops.melded_linear_grad_input(g, layer.weight, layer.weight_scale, None,
                                                    None, hist, rank=rank), dx)


def test_melded_linear_backward_uses_and_records_the_gradient_history():
    n, k, rank, H = 64, 96, 16, 4
    _, layer = melded(n, k, rank)
    x = torch.randn(4, 5, k, requires_grad=True)
    g = torch.randn(4, 5, n) * 100   # far above what row 1 recorded: dx saturates in E5M2
    g_hist = torch.rand(H) * 20 + 10
    history = _layer_history(torch.rand(H) * 3 + 1, g_hist)
    before = history.clone()
    B = torch.zeros(n, rank, requires_grad=True)
    y = ops.melded_linear(x, layer.weight, layer.weight_scale, B, None, None, 1.0, None, history)
    assert torch.equal(history, before), "the forward op reads the history only"
    y.backward(g)
    # Row 1 now holds g's amax first, the older values shifted by one; row 0 is untouched.
    assert history[1, 0].item() == g.abs().max().item()
    assert torch.equal(history[1, 1:], g_hist[:-1]) and torch.equal(history[0], before[0])
    # dx with g quantised at row 1's delayed scale (before the record).
    gq, sg, _ = quantize_delayed_formula(g.reshape(-1, n), E5M2, g_hist)
    w_q, s = layer.weight[:n].double(), layer.weight_scale.double()
    ref = (gq.double() @ w_q) * sg.double() * s
    bound = product_bound(gq.double().abs(), w_q.abs(), n, torch.float32, ref, sg.double() * s)
    assert bool(((x.grad.reshape(-1, k).double() - ref).abs() <= bound).all())
    assert (gq.float().abs() == 57344).any(), "setup: values above the history saturate"
    assert B.grad is not None and B.grad.abs().sum() > 0


def test_backward_without_input_grad_records_no_gradient_amax():
    _, layer = melded(32, 32, 8)
    history = torch.zeros(2, 3)
    B = torch.zeros(32, 8, requires_grad=True)
    ops.melded_linear(torch.randn(3, 32), layer.weight, layer.weight_scale, B, None, None, 1.0,
                      None, history).sum().backward()
    assert B.grad.abs().sum() > 0 and not history.any()


# ---- melded_linear_backward: both gradients in one op ------------------------------------------

@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["none", "below", "above"])
@pytest.mark.parametrize("B_dtype", [None, torch.float32])
def test_melded_linear_backward_op_is_grad_input_and_dB(act_dtype, kind, B_dtype):
    n, k, rank, scaling = 64, 96, 24, 0.75
    _, layer = melded(n, k, rank)
    g = (torch.randn(3, 7, n) * 3).to(act_dtype)
    xa = torch.randn(3, 7, rank).to(act_dtype)
    hist = None if kind == "none" else history_of(kind, g.float().abs().amax(), H=4)
    dx, dB, g_amax = ops.melded_linear_backward(g, xa, layer.weight, layer.weight_scale, None,
                                                scaling, None, hist, B_dtype)
    # dx and g's amax are melded_linear_grad_input's, bit for bit.
    dx_ref, amax_ref = torch.ops.falqon.melded_linear_grad_input(
        g, layer.weight, layer.weight_scale, None, None, hist, rank=rank)
    assert torch.equal(dx, dx_ref) and torch.equal(g_amax, amax_ref)
    # dB = scaling g^T xa: exact products, fp32 sums over the 21 rows, one rounding.
    out_dtype = B_dtype or act_dtype
    assert dB.shape == (n, rank) and dB.dtype == out_dtype
    g2, xa2 = g.reshape(-1, n).double(), xa.reshape(-1, rank).double()
    ref = scaling * (g2.t() @ xa2)
    bound = product_bound(g2.abs().t(), xa2.abs(), g2.shape[0], out_dtype, ref, scaling)
    assert bool(((dB.double() - ref).abs() <= bound).all())


def test_melded_linear_backward_op_rejects_bad_arguments():
    _, layer = melded(32, 48, 8)
    g, xa = torch.randn(5, 32), torch.randn(5, 8)
    w, s = layer.weight, layer.weight_scale
    for bad_xa, match in ((torch.randn(4, 8), "xa has 4 rows, the gradient 5"),
                          (torch.randn(5, 8, dtype=torch.bfloat16), "xa must hold"),
                          (torch.randn(5, 17), "rank 17")):
        with pytest.raises(RuntimeError, match=match):
            ops.melded_linear_backward(g, bad_xa, w, s)
    with pytest.raises(RuntimeError, match="grad_B_dtype must be"):
        ops.melded_linear_backward(g, xa, w, s, grad_B_dtype=torch.float64)
    with pytest.raises(RuntimeError, match="amax_history"):
        ops.melded_linear_backward(g, xa, w, s, amax_history=torch.zeros(0))


# ---- meld_init ---------------------------------------------------------------------------------

def _exact_factor(w, rank):
    q, s = quantize_formula(w, E4M3)
    err = w.double() - q.double() * s.double()
    _, S, Vh = torch.linalg.svd(err)
    a = S[:rank].sqrt().unsqueeze(1) * Vh[:rank]
    pivot = a.gather(1, a.abs().argmax(1, keepdim=True))
    return a * torch.where(pivot < 0, -1.0, 1.0), S


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_meld_init_exact_matches_linalg_svd(in_dtype):
    n, k, rank = 96, 64, 8
    w = random_weight(n, k, in_dtype)
    weight, scale = ops.meld_init(w, rank, svd="exact")
    r16 = ops.padded_rank(rank)
    assert weight.shape == (n + r16, k) and weight.dtype == E4M3
    q0, s0 = quantize_formula(w, E4M3)
    a_ref, _ = _exact_factor(w.float(), rank)
    assert a_ref.abs().max() < w.float().abs().max(), "setup: A below W's amax keeps the scale"
    # W's rows are exactly its own FP8 quantisation (the stacked A did not change the scale).
    assert torch.equal(scale, s0)
    assert torch.equal(fp8_bytes(weight[:n]), fp8_bytes(q0))
    # A = sqrt(S_r) V_r^T of the error's SVD, quantised with the same scale: within half an
    # E4M3 step (2^-4 relative, or half the smallest subnormal step s 2^-10) plus fp32 SVD noise.
    a = weight[n:n + rank].double() * scale.double()
    tol = 2.0**-4 * a_ref.abs() + scale.double() * 2.0**-10 + 1e-5 * a_ref.abs().max()
    assert bool(((a - a_ref).abs() <= tol).all())
    assert not weight[n + rank:].float().any(), "padding rows are zero"


def test_meld_init_randomized_captures_the_top_subspace():
    # The quantisation error has a nearly flat spectrum, the hard case for a randomized SVD: the
    # power iterations must still find most of the top-r energy (sum of singular values).
    n, k, rank = 256, 192, 16
    w = random_weight(n, k)
    _, S = _exact_factor(w, rank)
    weight, scale = ops.meld_init(w, rank)  # randomized, default settings
    a = weight[n:n + rank].double() * scale.double()
    captured = (a.norm(dim=1) ** 2).sum() / S[:rank].sum()
    assert captured > 0.9, f"randomized SVD captured {captured:.3f} of the top-{rank} energy"
    again, _ = ops.meld_init(w, rank)
    other, _ = ops.meld_init(w, rank, seed=1)
    assert torch.equal(fp8_bytes(again), fp8_bytes(weight)), "same seed, same result"
    assert not torch.equal(fp8_bytes(other[n:]), fp8_bytes(weight[n:]))


def test_meld_init_rejects_bad_arguments():
    w = torch.randn(32, 48)
    with pytest.raises(RuntimeError, match="between 1 and min"):
        ops.meld_init(w, 33)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ops.meld_init(torch.randn(30, 48), 4)
    with pytest.raises(RuntimeError, match="'randomized' or 'exact'"):
        ops.meld_init(w, 4, svd="lanczos")


# ---- opcheck: schema, autograd registration, fake tensors, AOT dispatch ---------------------

def test_opcheck_every_op():
    lin, layer = melded(32, 48, 8, bias=True)
    x = torch.randn(4, 48, requires_grad=True)
    B = torch.randn(32, 8, requires_grad=True)
    wt = layer.weight[:32].t().contiguous()
    for dtype in (torch.bfloat16, torch.float32):
        opcheck(torch.ops.falqon.quantize.default, (x.detach().to(dtype), E4M3))
        opcheck(torch.ops.falqon.quantize.default, (x.detach().to(dtype), E5M2))
        opcheck(torch.ops.falqon.quantize_rows.default, (x.detach().to(dtype), E4M3))
        opcheck(torch.ops.falqon.quantize_rows.default, (x.detach().to(dtype), E5M2))
        opcheck(torch.ops.falqon.quantize_delayed.default,
                (x.detach().to(dtype), E4M3, torch.rand(4)))
        opcheck(torch.ops.falqon.quantize_delayed.default,
                (x.detach().to(dtype), E5M2, torch.zeros(2, 3)))
    # Delayed scaling: the history is read by the forward and updated by the backward.
    opcheck(torch.ops.falqon.melded_linear.default,
            (x, layer.weight, layer.weight_scale, B, layer.bias, wt, 0.5, None,
             torch.rand(2, 4) + 1))
    opcheck(torch.ops.falqon.melded_linear_grad_input.default,
            (torch.randn(4, 32), layer.weight, layer.weight_scale, None, None, torch.rand(3), None,
             1.0, 8))
    opcheck(torch.ops.falqon.melded_linear.default,
            (x, layer.weight, layer.weight_scale, B, layer.bias, None, 0.5, None))
    opcheck(torch.ops.falqon.melded_linear.default,
            (x.detach().bfloat16().requires_grad_(), layer.weight, layer.weight_scale, B, None,
             wt, 2.0, E4M3))
    opcheck(torch.ops.falqon.melded_linear_grad_input.default,
            (torch.randn(4, 32), layer.weight, layer.weight_scale, None, None, None, None, 1.0, 8))
    opcheck(torch.ops.falqon.melded_linear_grad_input.default,
            (torch.randn(2, 4, 32, dtype=torch.bfloat16), layer.weight, layer.weight_scale, wt,
             E4M3))
    opcheck(torch.ops.falqon.record_amax_.default, (torch.rand(5), torch.tensor(2.0)))
    opcheck(torch.ops.falqon.melded_linear_backward.default,
            (torch.randn(4, 32), torch.randn(4, 8), layer.weight, layer.weight_scale, wt, 0.5,
             E4M3, torch.rand(3), torch.float32))
    opcheck(torch.ops.falqon.melded_linear_backward.default,
            (torch.randn(2, 4, 32, dtype=torch.bfloat16), torch.randn(2, 4, 8, dtype=torch.bfloat16),
             layer.weight, layer.weight_scale))
    opcheck(torch.ops.falqon.meld_init.default, (lin.weight.detach(), 8, "randomized", 4, 2, 0))
    opcheck(torch.ops.falqon.meld_init.default, (lin.weight.detach(), 8, "exact", 16, 4, 0))
    opcheck(torch.ops.falqon.topk_update_.default,
            (layer.weight.detach().clone(), torch.randn(32, 8), None, 3, 1.0, False))
    opcheck(torch.ops.falqon.topk_update_.default,
            (layer.weight.detach().clone(), torch.randn(32, 8), wt.clone(), 3, 1.0, True))
