"""The melded layer's CPU kernels (the reference numerics: melded_linear, its input gradient and
backward, meld_init) and opcheck of every op, against formulas in float64 (cpu_formulas.py).

Tolerances:
- quantize is exact: the formula is the definition, so q must match bit for bit.
- A product of FP8 operands is exact in float64 (each FP8 value has <= 4 significant bits), so
  the only errors of the op are its fp32 accumulation and the rounding of the result. For a sum
  of K terms in fp32, |fl(sum) - sum| <= gamma_K * sum|terms| with gamma_K = K u / (1 - K u),
  u = 2^-24 (Higham, Accuracy and Stability, 3.1); the final cast to bf16 adds at most half an
  ulp, 2^-8 relative (8 significant bits). `product_bound` (cpu_formulas.py) adds those up, with a
  little room for the scale multiply.

The quantisation ops' own tests are in test_quantize_cpu.py.
"""

import pytest
import torch

import falqon
from falqon import ops
from falqon_testing import fp8_bytes, opcheck, rel_err
from cpu_formulas import (E4M3, E5M2, HISTORY_KINDS, history_of, melded, product_bound,
                          quantize_delayed_formula, quantize_formula, quantize_input_formula,
                          random_weight)


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
