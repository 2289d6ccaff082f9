"""The CPU tests' formulas and inputs, in float64 or in the ops' own fp32 arithmetic: FP8
quantisation as DESIGN.md defines it (per tensor, per row, delayed), the bound of an
fp32-accumulated product of FP8 operands (test_ops_cpu.py's docstring derives it), LLaMA-like
weights and melded layers, and amax histories. Shared by test_ops_cpu.py, test_quantize_cpu.py
and the other CPU tests of the ops."""

import torch

import falqon

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
