"""The adapter mode's CUDA path against the CPU reference and float64 formulas: the forward's
adapter GEMM (y = y_base + scaling xa B^T into a contiguous y), the backward's operand
G = [g | scaling g B | 0] (u from a cuBLASLt GEMM, its partials joining g's, one cast; or, on
Hopper with enough rows, u and the partials from one row pass over g, adapter_u.cu, and the cast in
the fused pass, grad_pass_hopper.cu) and the dgrad over every row of W', in both scalings, at the
LLaMA-7B shapes.

Why these comparisons hold:
- Forward: the device's y_base and xa are the proxy forward's (the same FP8 GEMM, deterministic),
  checked against the CPU in test_cuda_ops.py. The adapter term is checked here against float64
  from those same device tensors: fp32 sums of r exact products (gamma_r) and one rounding.
- Backward: u = scaling g B is an fp32 sum whose order differs between cuBLASLt and the CPU; with
  g and B on a coarse grid (small integers times powers of two) every partial sum is exact in
  fp32, so u, hence G's FP8 image and its scale, are the same on both, and dx differs from the
  CPU's only by the GEMM's accumulation (the tolerances of cuda_testing.gemm_tolerance, widened by
  the GPU's own FP8 GEMM of the same operands). With ordinary random g and B, dx is checked
  against the unquantised float64 formula within the gradient format's noise.
"""

from __future__ import annotations

import pytest
import torch

import falqon
from falqon import ops
from falqon_testing import adapter_operand, adapter_operand_q, rel_err
from cuda_testing import (DEVICE, DRY_RUN, E4M3, E5M2, FAST_ACCUM_DGRAD, LLAMA_7B, UNIT_ROUNDOFF,
                          assert_gemm_close, gpu, melded_weight, random_activations,
                          scaled_mm_floor, short, subset_rows, to_dev)

pytestmark = [pytest.mark.gpu, gpu]

RANKS = {4096: 64, 11008: 16}


def grid_values(shape, lo, hi, step, amax_row=True):
    """Integers in [lo, hi] times `step` (exact in bf16 and in every fp32 partial sum of the sizes
    here), with the largest magnitude in row 0 (cuda_testing.subset_rows relies on it)."""
    t = torch.randint(lo, hi + 1, shape).float() * step
    if amax_row and t.numel():
        t.view(-1, shape[-1])[0, 0] = (hi + 2) * step
    return t


def adapter_B(N, r, scale=1.0):
    """A trained-looking B on the exact grid: integers in [-8, 8] times 2^-6 (times `scale`)."""
    return grid_values((N, r), -8, 8, scale * 2.0 ** -6, amax_row=False)


def _assert_adapter_term_close(y, y_base, xa, B, scaling, dtype):
    """y = y_base + scaling xa B^T against float64 from the same operands (2-D, on the CPU):
    fp32 sums of r exact products (gamma_r), one fma or a product and a sum (2u), one rounding to
    dtype."""
    r = xa.shape[1]
    yb, xa2, y2 = y_base.double(), xa.double(), y.double()
    Bt = B.to(dtype).double()
    ref = yb + scaling * (xa2 @ Bt.t())
    u = 2.0 ** -24
    gamma = r * u / (1 - r * u)
    terms = scaling * (xa2.abs() @ Bt.abs().t())
    bound = UNIT_ROUNDOFF[dtype] * ref.abs() + (gamma + 2 * u) * terms + 2 * u * ref.abs()
    err = (y2 - ref).abs()
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("adapter_y", ["auto", "gemm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=short)
@pytest.mark.parametrize("K,N", LLAMA_7B, ids=str)
def test_adapter_forward_matches_the_proxy_forward_plus_the_adapter(K, N, dtype, adapter_y,
                                                                    monkeypatch):
    # FALQON_ADAPTER_Y: adapter_y.cu's pass where it runs (Hopper), or cuBLASLt's GEMM.
    monkeypatch.setenv("FALQON_ADAPTER_Y", adapter_y)
    r = RANKS[N] if N in RANKS else 64
    w, s = melded_weight(K, N, r)
    x = random_activations((4, 1024, K), dtype)
    B = torch.randn(N, r) * 0.02
    b = torch.randn(N).to(dtype)
    scaling = 2.0
    args = (to_dev(x), to_dev(w), to_dev(s), to_dev(B), to_dev(b), None, scaling, None, None)
    y0, xa0, amax0 = torch.ops.falqon.melded_linear(*args, False)
    y, xa, amax = torch.ops.falqon.melded_linear(*args, True)
    assert y.shape == (4, 1024, N) and y.dtype == dtype and y.is_contiguous()
    assert torch.equal(xa, xa0) and torch.equal(amax, amax0)
    # In float64 from the device's own y_base and xa (rows subset: the check runs on the CPU).
    rows = subset_rows(4096)
    yb = y0.reshape(-1, N)[rows.to(y0.device) if rows is not None else slice(None)].cpu().double()
    xa2 = xa0.reshape(-1, r)[rows.to(y0.device) if rows is not None else slice(None)].cpu().double()
    y2 = y.reshape(-1, N)[rows.to(y.device) if rows is not None else slice(None)].cpu().double()
    _assert_adapter_term_close(y2, yb, xa2, B, scaling, dtype)
    assert (y2 != yb).any(), "setup: the adapter changes the output"


def _exact_operands(K, N, r, lead, dtype):
    w, s = melded_weight(K, N, r)
    g = grid_values((*lead, N), -8, 8, 0.125).to(dtype)
    B = adapter_B(N, r)
    return w, s, g, B


def _exact_xa(lead, r, dtype):
    """xa on the exact grid too (integers in [-8, 8] times 2^-4): every fp32 partial sum of dB =
    scaling g^T xa is then exact, so dB is the same bit for bit whatever kernel sums it in
    whatever order (the mma.sync pass, the wgmma pass of grad_pass_hopper.cu)."""
    return grid_values((*lead, r), -8, 8, 2.0 ** -4, amax_row=False).to(dtype)


def _adapter_dgrad_floor(G_q, sG, w, s, dtype):
    """dx of the GPU's own FP8 GEMM over every row of W' (the operand the op uses), or None."""
    floor = scaled_mm_floor(G_q, sG, w.t().contiguous().t(), s, fast_accum=FAST_ACCUM_DGRAD)
    return None if floor is None else floor.to(dtype)


def _check_dx(dx_d, g, w, s, B, scaling, gdt, dtype, history, what):
    """dx of the device against the CPU's: the CPU ops' quantised operand (all of it, so its scale
    is the whole operand's) times every row of W' in fp32, as csrc/reference.cpp computes dx, on
    all rows or, for large M, on subset_rows; the bounds widened by the GPU's own FP8 GEMM of the
    same operand. Returns the CPU operand's amax."""
    K, N = w.shape[1], g.shape[-1]
    G_q, sG, amax = adapter_operand_q(g.reshape(-1, N), B, scaling, w.shape[0], gdt, history)
    rows = subset_rows(G_q.shape[0])
    out = dx_d.reshape(-1, K).cpu()
    if rows is not None:
        G_q, out = G_q[rows], out[rows]
    dx_c = ((G_q.float() @ w.float()) * (sG * s)).to(dtype)
    assert_gemm_close(out, dx_c, _adapter_dgrad_floor(G_q, sG, w, s, dtype), what)
    return amax


BACKWARD_CASES = [
    (4096, 4096, (8192,), 64, torch.bfloat16, None),
    (4096, 11008, (4, 512), 16, torch.bfloat16, E4M3),
    (11008, 4096, (2, 1024), 64, torch.float16, None),
    (4096, 4096, (127,), 8, torch.bfloat16, None),
    (64, 32, (3,), 4, torch.bfloat16, None),
    (4096, 4096, (97,), 64, torch.float32, None),
]


def _case_id(c):
    K, N, lead, r, dtype, gdt = c
    return f"{K}to{N}-M{'x'.join(map(str, lead))}-r{r}-{short(dtype)}{'-g' + short(gdt) if gdt else ''}"


@pytest.mark.parametrize("history_kind", ["none", "empty", "below", "above"])
@pytest.mark.parametrize("c", BACKWARD_CASES, ids=_case_id)
def test_adapter_backward_matches_cpu(c, history_kind):
    K, N, lead, r, dtype, gdt = c
    w, s, g, B = _exact_operands(K, N, r, lead, dtype)
    scaling = 0.5
    gdt_eff = gdt or E5M2
    own = adapter_operand(g.reshape(-1, N), B, scaling, w.shape[0]).abs().amax().item()
    history = {"none": None, "empty": torch.zeros(5),
               "below": torch.tensor([own / 2, 0.0, own / 4, 0.0, 0.0]),
               "above": torch.tensor([0.0, own * 3, own, 0.0, own])}[history_kind]
    xa = _exact_xa(lead, r, dtype)
    dx_d, dB_d, amax_d = ops.melded_linear_backward(
        to_dev(g), to_dev(xa), to_dev(w), to_dev(s), None, scaling, gdt, to_dev(history),
        torch.float32, to_dev(B))
    what = f"{_case_id(c)} {history_kind}"
    amax_c = _check_dx(dx_d, g, w, s, B, scaling, gdt_eff, dtype, history, f"dx {what}")
    assert amax_d.item() == amax_c.item(), f"the operand's amax, exactly ({what})"
    # The same through the grad-input-only op (the generic path: the operand written out).
    dx_only, amax_only = torch.ops.falqon.melded_linear_grad_input(
        to_dev(g), to_dev(w), to_dev(s), None, gdt, to_dev(history), to_dev(B), scaling)
    assert torch.equal(amax_only.cpu(), amax_d.cpu())
    _check_dx(dx_only, g, w, s, B, scaling, gdt_eff, dtype, history, f"dx (grad_input) {what}")
    # dB is the proxy mode's formula: the same op without B gives it bit for bit (exact sums).
    _, dB_proxy, _ = ops.melded_linear_backward(
        to_dev(g), to_dev(xa), to_dev(w), to_dev(s), None, scaling, gdt, to_dev(history),
        torch.float32)
    assert torch.equal(dB_d, dB_proxy), "dB"


@pytest.mark.parametrize("history_kind", ["none", "empty"])
@pytest.mark.parametrize("K,N", LLAMA_7B, ids=str)
def test_adapter_backward_amax_is_u_where_u_dominates(K, N, history_kind):
    # A large B (still on the exact grid): u = scaling g B outgrows g, so the operand's scale is
    # u's amax, which current scaling folds into the fused pass's partials (no kernel of its own)
    # and delayed scaling with an empty history takes from adapter_partials.
    r = RANKS.get(N, 64)
    w, s, g, _ = _exact_operands(K, N, r, (1024,), torch.bfloat16)
    B = adapter_B(N, r, scale=16.0)
    scaling = 0.5
    G = adapter_operand(g.reshape(-1, N), B, scaling, w.shape[0])
    assert G[:, N:].abs().max() > 4 * G[:, :N].abs().max(), "setup: u dominates the operand"
    history = None if history_kind == "none" else torch.zeros(4)
    xa = random_activations((1024, r), torch.bfloat16)
    dx_d, _, amax_d = ops.melded_linear_backward(
        to_dev(g), to_dev(xa), to_dev(w), to_dev(s), None, scaling, None, to_dev(history),
        torch.float32, to_dev(B))
    amax_c = _check_dx(dx_d, g, w, s, B, scaling, E5M2, torch.bfloat16, history,
                       f"dx {K}to{N} {history_kind}")
    assert amax_d.item() == amax_c.item() == G.abs().max().item()


def _hopper_passes_run():
    """Whether the Hopper passes (adapter_u.cu's row pass, grad_pass_hopper.cu, adapter_y.cu) can
    run here: an sm_90a build on a compute capability 9.0 GPU (elsewhere FALQON_ADAPTER_U=rows
    falls back to cuBLASLt's u GEMM, and the forward's adapter term is cuBLASLt's GEMM)."""
    return (not DRY_RUN and torch.cuda.is_available()
            and torch.cuda.get_device_capability() == (9, 0)
            and "9.0a" in falqon.build_info()["cuda_archs"])


def _backward_by(choice, monkeypatch, *args, mma_pass=False):
    """The backward with FALQON_ADAPTER_U=choice and, with mma_pass, the fused pass on mma.sync
    (backward.cu) instead of TMA and wgmma (grad_pass_hopper.cu)."""
    monkeypatch.setenv("FALQON_ADAPTER_U", choice)
    if mma_pass:
        monkeypatch.setenv("FALQON_GRAD_PASS_MMA", "1")
    else:
        monkeypatch.delenv("FALQON_GRAD_PASS_MMA", raising=False)
    return ops.melded_linear_backward(*args)


# The row pass takes 16-bit g and ranks up to 64 that are multiples of 8; N = 528 ends in a part
# of a 64-column tile and of a 256-column stage (three of its four boxes wholly past N).
U_PASS_CASES = [c for c in BACKWARD_CASES if c[4] != torch.float32 and c[3] % 8 == 0]
U_PASS_CASES.append((256, 528, (1000,), 16, torch.bfloat16, None))


@pytest.mark.skipif(not _hopper_passes_run(), reason="the row pass over g needs an sm_90a build on Hopper")
@pytest.mark.parametrize("bdt", [torch.float32, torch.bfloat16], ids=short)
@pytest.mark.parametrize("c", U_PASS_CASES, ids=_case_id)
def test_adapter_u_row_pass_matches_the_gemm_path(c, bdt, monkeypatch):
    # Current scaling through adapter_u.cu's row pass (u and the operand's partial maxima from one
    # read of g, then g and u cast in the fused pass, on wgmma or on mma.sync) against cuBLASLt's
    # u GEMM, the fused pass's amax and the joint cast. On the exact grid u and dB are exact in
    # fp32 whatever the order of their sums, so the operand, its scale and amax, dx and dB are the
    # same bit for bit; the CPU check of dx holds for the row pass as for the other.
    K, N, lead, r, dtype, gdt = c
    w, s, g, B = _exact_operands(K, N, r, lead, dtype)
    xa = _exact_xa(lead, r, dtype)
    args = (to_dev(g), to_dev(xa), to_dev(w), to_dev(s), None, 0.5, gdt, None, bdt, to_dev(B))
    rows = _backward_by("rows", monkeypatch, *args)
    rows_mma = _backward_by("rows", monkeypatch, *args, mma_pass=True)
    gemm = _backward_by("gemm", monkeypatch, *args)
    for other, what in ((rows_mma, "mma.sync pass"), (gemm, "u GEMM")):
        for name, a, b in zip(("dx", "dB", "amax"), rows, other):
            assert torch.equal(a, b), f"{name} {_case_id(c)} against the {what}"
    amax_c = _check_dx(rows[0], g, w, s, B, 0.5, gdt or E5M2, dtype, None, f"dx {_case_id(c)} rows")
    assert rows[2].item() == amax_c.item()


@pytest.mark.skipif(not _hopper_passes_run(), reason="the row pass over g needs an sm_90a build on Hopper")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=short)
@pytest.mark.parametrize("M", [64, 1000, 8192])
def test_adapter_u_row_pass_with_random_values(M, dtype, monkeypatch):
    # Ordinary values, M with a partial last block of 64 rows (1000) and the default choice at
    # M = 8192: u's and dB's sums differ from the other path's only in their order (fp32), so the
    # operand's scale and a few of its FP8 roundings may differ; dx agrees within one rounding of
    # the gradient format, dB within fp32 summation error (and both with float64), and u
    # dominating the operand (a large B) moves the amax in both.
    K, N, r = 4096, 4096, 64
    w, s = melded_weight(K, N, r)
    g = random_activations((M, N), dtype)
    xa = random_activations((M, r), dtype)
    for B_std in (0.02, 2.0):
        B = torch.randn(N, r) * B_std
        args = (to_dev(g), to_dev(xa), to_dev(w), to_dev(s), None, 0.5, None, None, torch.float32,
                to_dev(B))
        rows = _backward_by("rows" if M < 8192 else "auto", monkeypatch, *args)
        gemm = _backward_by("gemm", monkeypatch, *args)
        dB_ref = 0.5 * g.reshape(-1, N).double().t() @ xa.reshape(-1, r).double()
        assert rel_err(rows[1].cpu(), dB_ref) < 1e-5 and rel_err(gemm[1].cpu(), dB_ref) < 1e-5, "dB"
        assert abs(rows[2].item() - gemm[2].item()) <= 1e-5 * gemm[2].item(), "amax"
        assert rel_err(rows[0].cpu(), gemm[0].cpu()) < 2e-3, "dx"
        G = adapter_operand(g.reshape(-1, N), B, 0.5, w.shape[0])
        assert rows[2].item() == pytest.approx(G.abs().max().item(), rel=1e-5)


# adapter_y.cu's tiles are 128 x 128: partial tiles in M (1000, 130) and N (528, 136), a tile
# wholly past N in its second half (528), r below one 64-wide box (8, 16), and fewer rows than
# a tile (64).
Y_CASES = [(8192, 4096, 64), (1000, 528, 16), (130, 136, 8), (256, 11008, 64), (64, 4096, 64)]


def _y_operands(M, N, r, dtype, exact):
    """y_base as the first N columns of a wider product (row stride N + 16, as the forward's),
    xa and B: on the exact grid (every product, sum, fma and the final sum exact in fp32) or
    ordinary random values."""
    if exact:
        wide = grid_values((M, N + 16), -64, 64, 2.0 ** -6, amax_row=False)
        xa = grid_values((M, r), -8, 8, 2.0 ** -4, amax_row=False)
        B = adapter_B(N, r)
    else:
        wide = torch.randn(M, N + 16)
        xa = torch.randn(M, r)
        B = torch.randn(N, r) * 0.05
    return wide.to(dtype), xa.to(dtype), B


@pytest.mark.skipif(not _hopper_passes_run(), reason="adapter_y.cu's pass needs an sm_90a build on Hopper")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=short)
@pytest.mark.parametrize("M,N,r", Y_CASES, ids=lambda c: str(c))
def test_adapter_y_pass_matches_the_gemm(M, N, r, dtype):
    # adapter_y.cu against cuBLASLt's GEMM with y_base as C: bit for bit on the exact grid (both
    # round the same exact fp32 value once), and on random values both within the float64 bound.
    for exact in (True, False):
        wide, xa, B = _y_operands(M, N, r, dtype, exact)
        wide_d, xa_d, b_d = to_dev(wide), to_dev(xa), to_dev(B.to(dtype))
        y_base_d = wide_d[:, :N]
        by = {impl: torch.ops.falqon_bench.adapter_output(y_base_d, xa_d, b_d, 0.5, impl)
              for impl in ("kernel", "gemm")}
        for impl, y in by.items():
            assert y.shape == (M, N) and y.dtype == dtype and y.is_contiguous(), impl
        if exact:
            assert torch.equal(by["kernel"], by["gemm"]), f"exact grid, {M}x{N} r={r}"
        rows = subset_rows(M)
        pick = (lambda t: t if rows is None else t[rows])
        _assert_adapter_term_close(pick(by["kernel"].cpu()), pick(wide[:, :N]), pick(xa), B, 0.5,
                                   dtype)
        assert torch.equal(wide_d[:, :N], y_base_d) and torch.equal(wide_d.cpu(), wide), "input kept"


@pytest.mark.skipif(not _hopper_passes_run(), reason="adapter_y.cu's pass needs an sm_90a build on Hopper")
def test_adapter_y_pass_refuses_what_it_cannot_take():
    wide, xa, B = _y_operands(256, 512, 64, torch.bfloat16, exact=False)
    y_base = to_dev(wide)[:, :512]
    for bad_xa, bad_b in ((to_dev(xa[:, :12]), to_dev(B[:, :12].to(torch.bfloat16))),  # r % 8
                          (to_dev(xa), to_dev(B.to(torch.float16)))):                  # dtypes
        with pytest.raises(RuntimeError, match="adapter_y cannot take"):
            torch.ops.falqon_bench.adapter_output(y_base, bad_xa, bad_b, 0.5, "kernel")


@pytest.mark.parametrize("K,N", LLAMA_7B, ids=str)
def test_adapter_transposed_copy_gives_the_same_dx(K, N):
    r = 64
    w, s, g, B = _exact_operands(K, N, r, (2048,), torch.bfloat16)
    xa = random_activations((2048, r), torch.bfloat16)
    wt = w.t().contiguous()  # every row of W'
    outs = [ops.melded_linear_backward(to_dev(g), to_dev(xa), to_dev(w), to_dev(s), to_dev(t), 1.0,
                                       None, None, None, to_dev(B)) for t in (None, wt)]
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("K,N", LLAMA_7B, ids=str)
def test_adapter_module_step_matches_lora_fa(K, N):
    # Realistic values (not the exact grid): the module's y, dx and dB against LoRA-FA's float64
    # formula with the layer's own W, A and B, within the FP8 noise of x (E4M3) and g (E5M2).
    lin = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    layer = falqon.MeldedLinear.from_linear(lin, rank=16, alpha=32).to(DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    x = random_activations((512, K), torch.bfloat16).to(DEVICE).requires_grad_()
    g = random_activations((512, N), torch.bfloat16).to(DEVICE)
    y = layer(x)
    y.backward(g)
    W = layer.dequantized_weight(torch.float64).cpu()
    A = layer.adapter_A(torch.float64).cpu()
    Bd = layer.lora_B.detach().double().cpu()
    xd, gd = x.detach().double().cpu(), g.double().cpu()
    y_ref = xd @ W.t() + layer.scaling * (xd @ A.t()) @ Bd.t()
    dx_ref = gd @ (W + layer.scaling * Bd @ A)
    dB_ref = layer.scaling * gd.t() @ (xd @ A.t())
    assert rel_err(y.detach().cpu().double(), y_ref) < 0.05
    assert rel_err(x.grad.cpu().double(), dx_ref) < 0.08
    assert rel_err(layer.lora_B.grad.cpu().double(), dB_ref) < 0.05
    # The adapter's share of the output is visible above that noise.
    assert rel_err(y_ref, xd @ W.t()) > 0.1


@pytest.mark.parametrize("K,N", LLAMA_7B, ids=str)
def test_trained_A_step_on_the_device(K, N):
    # FalqonConfig(train_a=True) on the GPU: dA against LoRA's float64 formula (bf16 GEMMs with
    # fp32 accumulation: u = g B rounded to bf16, 2^-8 relative, then summed over M), y, dx and
    # dB the frozen-A layer's bit for bit, and after a step with falqon.attach A's FP8 rows the
    # image of lora_A (falqon.trained_a.a_image_rows), written without a host read-back.
    from falqon.config import TRAINED_A_DIVISOR
    from falqon.trained_a import a_image_rows

    lin = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    layer = falqon.MeldedLinear.from_linear(lin, rank=16, train_a=True).to(DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    frozen = falqon.MeldedLinear(K, N, rank=16, adapter_gain=layer.adapter_gain).to(DEVICE)
    frozen.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "lora_A"},
                           strict=False)
    x = random_activations((512, K), torch.bfloat16).to(DEVICE)
    g = random_activations((512, N), torch.bfloat16).to(DEVICE)
    outs = []
    for mod in (layer, frozen):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.backward(g)
        outs.append((y.detach(), xi.grad, mod.lora_B.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    gd, xd = g.double().cpu(), x.double().cpu()
    dA_ref = layer.scaling / TRAINED_A_DIVISOR * (gd @ layer.lora_B.detach().double().cpu()).t() @ xd
    assert rel_err(layer.lora_A.grad.double().cpu(), dA_ref) < 2e-2
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    falqon.attach(opt, torch.nn.Sequential(layer))
    opt.step()
    rows, _ = a_image_rows(layer.lora_A, layer.weight_scale)
    n = layer.out_features
    assert torch.equal(layer.weight[n:n + 16].view(torch.uint8), rows.view(torch.uint8))


@pytest.mark.skipif(DRY_RUN, reason="the opcheck of the device's kernels")
def test_opcheck_adapter_ops_on_the_device():
    from falqon_testing import opcheck
    w, s = melded_weight(256, 128, 16)
    B = (torch.randn(128, 16) * 0.05).to(DEVICE).requires_grad_()
    x = torch.randn(64, 256, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    wt = w.t().contiguous().to(DEVICE)
    opcheck(torch.ops.falqon.melded_linear.default,
            (x, to_dev(w), to_dev(s), B, None, wt, 2.0, None, None, True))
    opcheck(torch.ops.falqon.melded_linear.default,
            (x, to_dev(w), to_dev(s), B, None, None, 2.0, E4M3,
             torch.rand(2, 3, device=DEVICE) + 1, True))
    opcheck(torch.ops.falqon.melded_linear_backward.default,
            (torch.randn(64, 128, dtype=torch.bfloat16, device=DEVICE),
             torch.randn(64, 16, dtype=torch.bfloat16, device=DEVICE), to_dev(w), to_dev(s), wt,
             0.5, None, torch.rand(3, device=DEVICE), torch.float32, B.detach()))
