"""The melded layer's CUDA ops of torch.ops.falqon against the CPU reference (csrc/reference.cpp):
melded_linear, melded_linear_grad_input and melded_linear_backward (current and delayed scaling),
MeldedLinear's autograd, opcheck of every op, the error messages, and the emulated path.

Inputs are drawn on the CPU, copied to the GPU, and the CPU op runs on the CPU copies. What must
match how: the GEMMs within the bounds cuda_testing.gemm_tolerance derives, FP8 operands bitwise.
The quantisation ops are in test_cuda_quantize.py (quantize_rows in test_cuda_row_scales.py),
topk_update_ and meld_init in test_cuda_topk_update.py and test_cuda_meld_init.py. Skipped without
a CUDA GPU with FP8 (see cuda_testing for the CPU dry run of these tests' code).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import falqon
from falqon import ops
from falqon_testing import opcheck
from cuda_testing import (
    ACT_DTYPES as ACT, DEVICE, E4M3, E5M2, EMULATED, FAST_ACCUM_DGRAD, FP8, LLAMA_7B, LLAMA_13B,
    UNIT_ROUNDOFF, assert_gemm_close, cuda_only, delayed_history, emulation_subset, gpu,
    melded_weight, random_activations, scaled_mm_floor, short, subset_rows, to_dev)

pytestmark = [pytest.mark.gpu, gpu]


# ---- melded_linear and melded_linear_grad_input ----------------------------------------------

class LinearCase(tuple):
    """(K, N, lead, r, bias, weight_t, dtype, grad_dtype); lead = the input's leading dims."""

    @property
    def M(self):
        return math.prod(self[2])


def _linear_cases():
    cases = []
    i = 0
    # Every LLaMA-7B and -13B shape at every M, with the options rotating so that each shape meets
    # both activation dtypes, bias and weight_t on and off and every rank.
    leads = {1: (1,), 3: (3,), 127: (127,), 2048: (4, 512), 8192: (8192,)}
    for K, N in LLAMA_7B + LLAMA_13B:
        for M, lead in leads.items():
            cases.append(LinearCase((K, N, lead, (8, 16, 64)[i % 3], (i // 2) % 2 == 1,
                                     (i // 4) % 2 == 1, (torch.bfloat16, torch.float32)[i % 2],
                                     (None, E4M3)[(i // 3) % 2])))
            i += 1
    # Every combination of the options at one real shape (cheap on the CPU at M = 127).
    for r, bias, wt, dtype in itertools.product((8, 16, 64), (False, True), (False, True), ACT):
        cases.append(LinearCase((4096, 4096, (127,), r, bias, wt, dtype, None)))
    # Edges: a 1-D input, several leading dims, no rows at all, rank 1, the smallest layer.
    cases += [LinearCase((16, 16, (), 1, True, True, torch.bfloat16, None)),
              LinearCase((64, 32, (2, 3, 5), 8, True, False, torch.bfloat16, E4M3)),
              LinearCase((64, 32, (0,), 8, True, True, torch.float32, None)),
              LinearCase((4096, 4096, (2, 0, 3), 16, False, False, torch.bfloat16, None))]
    return emulation_subset(cases, lambda c: c.M <= 127)


LINEAR_CASES = _linear_cases()


def _case_id(c):
    K, N, lead, r, bias, wt, dtype, gdt = c
    return (f"{K}to{N}-lead{'x'.join(map(str, lead)) or 'none'}-r{r}-{short(dtype)}"
            f"{'-bias' if bias else ''}{'-wt' if wt else ''}{'-g' + short(gdt) if gdt else ''}")


def _operands(c):
    K, N, lead, r, bias, wt, dtype, _ = c
    w, s = melded_weight(K, N, r)
    w_t = w[:N].t().contiguous() if wt else None
    b = torch.randn(N).to(dtype) if bias else None
    return w, s, w_t, b


def _forward_floor(x2, w, s, N, r, b, dtype, x_history=None):
    """(y, xa) of the GPU's own FP8 GEMM on the operands of the forward (x quantised as the CPU
    op does: at its delayed scale where x_history, the amax history before the step, is given),
    with fast accumulation, which the forward may use; (None, None) where it cannot run."""
    if x_history is None:
        xq, sx = falqon.quantize(x2, E4M3)
    else:
        xq, sx, _ = falqon.quantize_delayed(x2, E4M3, x_history)
    floor = scaled_mm_floor(xq, sx, w.t(), s, fast_accum=True)
    if floor is None:
        return None, None
    if b is not None:
        floor[:, :N] += b.float()
    floor = floor.to(dtype)
    return floor[:, :N], floor[:, N:N + r]


def _dgrad_floor(g2, w, s, N, gdt, dtype, g_history=None):
    """dx of the GPU's own FP8 GEMM on the operands of the dgrad, or None; with g_history (the
    gradient's amax history before the step), g quantised at its delayed scale."""
    if g_history is None:
        gq, sg = falqon.quantize(g2, gdt or E5M2)
    else:
        gq, sg, _ = falqon.quantize_delayed(g2, gdt or E5M2, g_history)
    w_rows_t = w[:N].t().contiguous()            # (K, N); .t() is the column-major (N, K) W_q
    floor = scaled_mm_floor(gq, sg, w_rows_t.t(), s, fast_accum=FAST_ACCUM_DGRAD)
    return None if floor is None else floor.to(dtype)


@pytest.mark.parametrize("c", LINEAR_CASES, ids=_case_id)
def test_melded_linear_matches_cpu(c):
    K, N, lead, r, bias, wt, dtype, _ = c
    w, s, w_t, b = _operands(c)
    x = random_activations((*lead, K), dtype)
    lora_B = torch.randn(N, r)  # never enters the forward; the op checks its shape
    y_d, xa_d, _ = torch.ops.falqon.melded_linear(to_dev(x), to_dev(w), to_dev(s), to_dev(lora_B),
                                               to_dev(b), to_dev(w_t), 1.0, None)
    rows = subset_rows(c.M)
    x_ref = x if rows is None else x.reshape(-1, K)[rows]
    y_c, xa_c, _ = torch.ops.falqon.melded_linear(x_ref, w, s, lora_B, b, w_t, 1.0, None)

    # Layout: y is a view of the (..., N + r16) product, as the CPU op's; xa is contiguous.
    product = torch.empty((*lead, N + ops.padded_rank(r)))
    assert y_d.shape == (*lead, N) and y_d.dtype == dtype and y_d.device == xa_d.device
    if c.M:  # (the strides of an empty tensor mean nothing)
        assert y_d.stride() == (y_c.stride() if rows is None else
                                product.narrow(-1, 0, N).stride())
    assert xa_d.shape == (*lead, r) and xa_d.dtype == dtype and xa_d.is_contiguous()

    f_y, f_xa = _forward_floor(x_ref.reshape(-1, K), w, s, N, r, b, dtype)
    y_dv = y_d.reshape(-1, N).cpu()
    xa_dv = xa_d.reshape(-1, r).cpu()
    if rows is not None:
        y_dv, xa_dv = y_dv[rows], xa_dv[rows]
    assert_gemm_close(y_dv, y_c.reshape(-1, N), f_y, f"y {_case_id(c)}")
    assert_gemm_close(xa_dv, xa_c.reshape(-1, r), f_xa, f"xa {_case_id(c)}")


@pytest.mark.parametrize("c", LINEAR_CASES, ids=_case_id)
def test_melded_linear_grad_input_matches_cpu(c):
    K, N, lead, r, _, wt, dtype, gdt = c
    w, s, w_t, _ = _operands(c)
    g = random_activations((*lead, N), dtype)
    dx_d = falqon.melded_linear_grad_input(to_dev(g), to_dev(w), to_dev(s), to_dev(w_t), gdt,
                                           rank=r)
    rows = subset_rows(c.M)
    g2 = g.reshape(-1, N) if rows is None else g.reshape(-1, N)[rows]
    dx_c = falqon.melded_linear_grad_input(g2, w, s, w_t, gdt, rank=r)
    assert dx_d.shape == (*lead, K) and dx_d.dtype == dtype and dx_d.is_contiguous()

    dx_dv = dx_d.reshape(-1, K).cpu()
    if rows is not None:
        dx_dv = dx_dv[rows]
    assert_gemm_close(dx_dv, dx_c.reshape(-1, K), _dgrad_floor(g2, w, s, N, gdt, dtype),
                      f"dx {_case_id(c)}")


# ---- melded_linear_backward: g read once for its quantisation and dB -------------------------

def _backward_cases():
    # (K, N, lead, r, weight_t, dtype, grad_dtype, grad_B_dtype, history kind)
    cases = [(K, N, (8192,), 64, i % 2 == 1, torch.bfloat16, None, torch.float32, "none")
             for i, (K, N) in enumerate(LLAMA_7B + LLAMA_13B)]
    # Ranks: one fragment, several, a padded width (48 -> 64), two passes over g (200 = 128 + 72).
    cases += [(4096, 4096, (4, 512), r, False, torch.bfloat16, None, torch.float32, "none")
              for r in (1, 8, 16, 48, 100, 128, 200)]
    # Rows: 1, a few, odd, fewer than one split; fp16, fp32 (the two-step path), E4M3 gradients,
    # dB in the activation dtype; delayed scaling with each kind of history.
    cases += [(4096, 11008, (1,), 16, True, torch.bfloat16, None, torch.float32, "none"),
              (11008, 4096, (3,), 64, False, torch.float16, E4M3, torch.float16, "none"),
              (4096, 4096, (127,), 8, True, torch.bfloat16, None, torch.bfloat16, "none"),
              (64, 32, (2, 3, 5), 8, False, torch.bfloat16, E4M3, torch.float32, "none"),
              (4096, 4096, (2, 100), 64, False, torch.float32, None, torch.float32, "none"),
              (16, 16, (), 1, True, torch.float16, None, torch.float32, "none"),
              (64, 32, (0,), 8, False, torch.bfloat16, None, torch.float32, "none")]
    cases += [(4096, 4096, (8192,), 64, True, torch.bfloat16, None, torch.float32, kind)
              for kind in ("empty", "below", "above")]
    cases += [(4096, 11008, (127,), 200, False, torch.float16, E4M3, torch.float32, "above"),
              (11008, 4096, (2, 100), 64, False, torch.float32, None, torch.float32, "below")]
    return emulation_subset(cases, lambda c: math.prod(c[2]) <= 127)


def _backward_id(c):
    K, N, lead, r, wt, dtype, gdt, bdt, kind = c
    return (f"{K}to{N}-lead{'x'.join(map(str, lead)) or 'none'}-r{r}-{short(dtype)}"
            f"{'-wt' if wt else ''}{'-g' + short(gdt) if gdt else ''}-dB{short(bdt)}-{kind}")


@pytest.mark.parametrize("c", _backward_cases(), ids=_backward_id)
def test_melded_linear_backward_matches_grad_input_and_dB(c):
    K, N, lead, r, wt, dtype, gdt, bdt, kind = c
    w, s = melded_weight(K, N, r)
    w_t = w[:N].t().contiguous() if wt else None
    g = random_activations((*lead, N), dtype)
    xa = random_activations((*lead, r), dtype)
    own = g.float().abs().amax().item() if g.numel() else 1.0
    history = None if kind == "none" else delayed_history(kind, own, H=5)
    scaling = 0.5
    args = (to_dev(w), to_dev(s), to_dev(w_t))
    dx, dB, g_amax = ops.melded_linear_backward(to_dev(g), to_dev(xa), *args, scaling, gdt,
                                                to_dev(history), bdt)
    # dx and g's amax: those of melded_linear_grad_input on the device, bit for bit (the same
    # FP8 gradient into the same GEMM; that op is checked against the CPU above).
    dx_ref, amax_ref = torch.ops.falqon.melded_linear_grad_input(to_dev(g), *args, gdt,
                                                                 to_dev(history), rank=r)
    assert dx.shape == (*lead, K) and dx.dtype == dtype and dx.is_contiguous()
    assert torch.equal(dx, dx_ref), "dx"
    assert torch.equal(g_amax, amax_ref), "g's amax"
    # dB = scaling g^T xa: exact products, fp32 sums over M rows in some order (Higham's gamma_M
    # of the sum of |terms|), one multiply by the scaling and one rounding to dB's dtype.
    assert dB.shape == (N, r) and dB.dtype == bdt and dB.device == dx.device
    g64, xa64 = to_dev(g).reshape(-1, N).double(), to_dev(xa).reshape(-1, r).double()
    ref = scaling * (g64.t() @ xa64)
    M = g64.shape[0]
    u = 2.0 ** -24
    gamma = M * u / (1 - M * u)
    accumulation = gamma * scaling * (g64.abs().t() @ xa64.abs())
    info = torch.finfo(bdt)
    bound = (UNIT_ROUNDOFF[bdt] * (ref.abs() + accumulation) + accumulation
             + 2 * u * ref.abs() + info.smallest_normal * info.eps / 2)  # (a subnormal's rounding)
    err = (dB.double() - ref).abs()
    assert bool((err <= bound).all()), (f"dB {_backward_id(c)}: worst excess "
                                        f"{(err - bound).max().item():.3g}")
    if M:
        assert ref.abs().max() > 0 and dB.abs().max() > 0, "setup: a non-trivial dB"


DELAYED_LINEAR_CASES = emulation_subset(
    [LinearCase((4096, 4096, (8192,), 64, True, False, torch.bfloat16, None)),
     LinearCase((4096, 11008, (4, 512), 16, False, True, torch.bfloat16, E4M3)),
     LinearCase((11008, 4096, (127,), 64, True, True, torch.float32, None)),
     LinearCase((64, 32, (1,), 8, True, False, torch.float16, None)),
     LinearCase((64, 32, (0,), 8, False, False, torch.bfloat16, None))],
    lambda c: c.M <= 127)


@pytest.mark.parametrize("kind", ["empty", "below", "above"])
@pytest.mark.parametrize("c", DELAYED_LINEAR_CASES, ids=_case_id)
def test_melded_linear_with_a_history_matches_cpu(c, kind):
    K, N, lead, r, bias, wt, dtype, gdt = c
    w, s, w_t, b = _operands(c)
    x = random_activations((*lead, K), dtype)
    g = random_activations((*lead, N), dtype)
    amax = lambda t: t.float().abs().amax().item() if t.numel() else 1.0  # noqa: E731
    history = torch.stack([delayed_history(kind, amax(x), H=6),
                           delayed_history(kind, amax(g), H=6)])
    lora_B = torch.randn(N, r)
    y_d, xa_d, xmax_d = torch.ops.falqon.melded_linear(
        to_dev(x), to_dev(w), to_dev(s), to_dev(lora_B), to_dev(b), to_dev(w_t), 1.0, gdt,
        to_dev(history))
    rows = subset_rows(c.M)
    x2 = x.reshape(-1, K)
    x_ref = x2 if rows is None else x2[rows]
    y_c, xa_c, xmax_c = torch.ops.falqon.melded_linear(x_ref, w, s, lora_B, b, w_t, 1.0, gdt,
                                                       history)
    if rows is not None:  # the subset's own amax is not x's: x's is the CPU quantiser's
        xmax_c = falqon.quantize_delayed(x2, E4M3, history[0])[2]
    assert torch.equal(xmax_d.cpu(), xmax_c), "x's amax, exactly"
    # The floor: the GPU's own FP8 GEMM on x quantised with the delayed scale (as the CPU does).
    xq, sx, _ = falqon.quantize_delayed(x_ref, E4M3, history[0])
    floor = scaled_mm_floor(xq, sx, w.t(), s, fast_accum=True)
    f_y = f_xa = None
    if floor is not None:
        if b is not None:
            floor[:, :N] += b.float()
        floor = floor.to(dtype)
        f_y, f_xa = floor[:, :N], floor[:, N:N + r]
    y_dv, xa_dv = y_d.reshape(-1, N).cpu(), xa_d.reshape(-1, r).cpu()
    if rows is not None:
        y_dv, xa_dv = y_dv[rows], xa_dv[rows]
    assert_gemm_close(y_dv, y_c.reshape(-1, N), f_y, f"y {_case_id(c)} {kind}")
    assert_gemm_close(xa_dv, xa_c.reshape(-1, r), f_xa, f"xa {_case_id(c)} {kind}")

    # The input gradient with row 1's delayed scale.
    dx_d, gmax_d = torch.ops.falqon.melded_linear_grad_input(
        to_dev(g), to_dev(w), to_dev(s), to_dev(w_t), gdt, to_dev(history[1]), rank=r)
    g2 = g.reshape(-1, N) if rows is None else g.reshape(-1, N)[rows]
    dx_c, _ = torch.ops.falqon.melded_linear_grad_input(g2, w, s, w_t, gdt, history[1], rank=r)
    gq, sg, gmax_c = falqon.quantize_delayed(g.reshape(-1, N), gdt or E5M2, history[1])
    assert torch.equal(gmax_d.cpu(), gmax_c), "g's amax, exactly"
    d_floor = scaled_mm_floor(gq if rows is None else gq[rows], sg,
                              w[:N].t().contiguous().t(), s, fast_accum=FAST_ACCUM_DGRAD)
    dx_dv = dx_d.reshape(-1, K).cpu()
    if rows is not None:
        dx_dv = dx_dv[rows]
    assert_gemm_close(dx_dv, dx_c.reshape(-1, K), None if d_floor is None else d_floor.to(dtype),
                      f"dx {_case_id(c)} {kind}")


MODULE_CASES = emulation_subset(
    [(4096, 4096, (4, 512), 64, True, False, torch.bfloat16),
     (4096, 11008, (2, 100), 16, False, True, torch.bfloat16),
     (512, 256, (3, 7), 8, True, True, torch.float32)], lambda c: math.prod(c[2]) <= 1024)


@pytest.mark.parametrize("K,N,lead,r,bias,wt,dtype", MODULE_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_melded_module_autograd_matches_cpu(K, N, lead, r, bias, wt, dtype):
    # The module melded on the CPU, then copied to the device: the same FP8 weights on both.
    lin = torch.nn.Linear(K, N, bias=bias, dtype=dtype)
    torch.nn.init.normal_(lin.weight, std=0.02)
    cpu = falqon.MeldedLinear.from_linear(lin, rank=r, alpha=2 * r, transposed_copy=wt,
                                          update_mode="proxy")
    dev = copy.deepcopy(cpu).to(DEVICE)
    with torch.no_grad():
        dev.lora_B.normal_()   # the proxy mode: B never enters the forward; its value must not matter
    x = random_activations((*lead, K), dtype)
    g = random_activations((*lead, N), dtype)
    x_d = to_dev(x).requires_grad_()
    y_d = dev(x_d)
    y_d.backward(to_dev(g))
    what = f"{K}to{N} r{r} {short(dtype)}"
    x2, g2 = x.reshape(-1, K), g.reshape(-1, N)
    w, s, b = cpu.weight, cpu.weight_scale, None if cpu.bias is None else cpu.bias.to(dtype)
    # y and dx against the CPU ops, as in the op tests.
    y_c = cpu(x)
    f_y, _ = _forward_floor(x2, w, s, N, r, b, dtype)
    assert_gemm_close(y_d.detach().reshape(-1, N).cpu(), y_c.detach().reshape(-1, N), f_y,
                      f"y {what}")
    dx_c = falqon.melded_linear_grad_input(g, w, s, cpu.weight_t, None, rank=r)
    assert_gemm_close(x_d.grad.reshape(-1, K).cpu(), dx_c.reshape(-1, K),
                      _dgrad_floor(g2, w, s, N, None, dtype), f"dx {what}")
    # dB = scaling g^T xa in the activation dtype, from the xa of the device's own forward (xa
    # itself is checked against the CPU in the op tests; here the autograd formula is).
    _, xa_d, _ = torch.ops.falqon.melded_linear(to_dev(x), dev.weight, dev.weight_scale, dev.lora_B,
                                             to_dev(b), dev.weight_t, dev.scaling, None)
    expected = (g2.double().T @ xa_d.reshape(-1, r).cpu().double()).to(dtype)
    assert dev.lora_B.grad.dtype == torch.float32
    assert_gemm_close((dev.lora_B.grad.cpu() / dev.scaling).to(dtype), expected, None,
                      f"dB {what}")
    assert dev.weight.grad is None
    if bias:
        assert dev.bias.grad is None  # the bias is frozen with the weight


@pytest.mark.parametrize("K,N,lead,r,bias,wt,dtype", MODULE_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_delayed_module_training_steps_match_cpu(K, N, lead, r, bias, wt, dtype):
    # Three fwd+bwd steps of a delayed-scaling layer on both devices from the same state: the
    # histories (exact amaxes of identical x and g) must agree bit for bit after every step, and
    # y and dx (both at the delayed scales of the same histories) within the GEMM bounds of the
    # CPU module's.
    lin = torch.nn.Linear(K, N, bias=bias, dtype=dtype)
    torch.nn.init.normal_(lin.weight, std=0.02)
    cpu = falqon.MeldedLinear.from_linear(lin, rank=r, transposed_copy=wt, amax_history_len=2,
                                          update_mode="proxy")
    dev = copy.deepcopy(cpu).to(DEVICE)
    what = f"{K}to{N} r{r} {short(dtype)}"
    for step, amp in enumerate((1.0, 4.0, 0.5)):   # step 2 runs far under the recorded amax
        x = (random_activations((*lead, K), torch.float32) * amp).to(dtype)
        g = (random_activations((*lead, N), torch.float32) * amp).to(dtype)
        history = cpu.amax_history.clone()  # the scales of this step come from it
        x_d = to_dev(x).detach().clone().requires_grad_()
        y_d = dev(x_d)
        y_d.backward(to_dev(g))
        x_c = x.detach().clone().requires_grad_()
        y_c = cpu(x_c)
        y_c.backward(g)
        assert torch.equal(dev.amax_history.cpu(), cpu.amax_history), f"history, step {step}"
        assert cpu.amax_history[0, 0].item() == x.float().abs().max().item()
        assert cpu.amax_history[1, 0].item() == g.float().abs().max().item()
        b = None if cpu.bias is None else cpu.bias.to(dtype)
        y_floor, _ = _forward_floor(x.reshape(-1, K), cpu.weight, cpu.weight_scale, N, r, b, dtype,
                                    history[0])
        assert_gemm_close(y_d.detach().reshape(-1, N).cpu(), y_c.detach().reshape(-1, N), y_floor,
                          f"y {what} step {step}")
        # Both GEMMs run with fast accumulation: their error is bounded through the GPU's own
        # GEMMs of the same (delayed-scale) operands, as in the current-scaling module test.
        dx_floor = _dgrad_floor(g.reshape(-1, N), cpu.weight, cpu.weight_scale, N, None, dtype,
                                history[1])
        assert_gemm_close(x_d.grad.reshape(-1, K).cpu(), x_c.grad.reshape(-1, K), dx_floor,
                          f"dx {what} step {step}")


# ---- opcheck --------------------------------------------------------------------------------------

@pytest.mark.parametrize("out", FP8, ids=short)
def test_opcheck_quantize(out):
    opcheck(torch.ops.falqon.quantize.default,
            (to_dev(torch.randn(33, 64, dtype=torch.bfloat16)), out))


@pytest.mark.parametrize("bias,wt", [(False, False), (True, True)])
def test_opcheck_melded_linear(bias, wt):
    K, N, r = 64, 32, 8
    w, s = melded_weight(K, N, r)
    x = to_dev(torch.randn(2, 24, K, dtype=torch.bfloat16)).requires_grad_()
    B = to_dev(torch.randn(N, r)).requires_grad_()
    b = to_dev(torch.randn(N, dtype=torch.bfloat16)) if bias else None
    w_t = to_dev(w[:N].t().contiguous()) if wt else None
    opcheck(torch.ops.falqon.melded_linear.default,
            (x, to_dev(w), to_dev(s), B, b, w_t, 2.0, None))


@pytest.mark.parametrize("out", FP8, ids=short)
def test_opcheck_quantize_delayed(out):
    x = to_dev(torch.randn(33, 64, dtype=torch.bfloat16))
    opcheck(torch.ops.falqon.quantize_delayed.default, (x, out, to_dev(torch.zeros(4))))
    opcheck(torch.ops.falqon.quantize_delayed.default, (x, out, to_dev(torch.rand(4) + 0.5)))


def test_opcheck_melded_linear_with_a_history():
    K, N, r = 64, 32, 8
    w, s = melded_weight(K, N, r)
    x = to_dev(torch.randn(2, 24, K, dtype=torch.bfloat16)).requires_grad_()
    B = to_dev(torch.randn(N, r)).requires_grad_()
    opcheck(torch.ops.falqon.melded_linear.default,
            (x, to_dev(w), to_dev(s), B, None, None, 2.0, None, to_dev(torch.rand(2, 5) + 1)))
    opcheck(torch.ops.falqon.melded_linear_grad_input.default,
            (to_dev(torch.randn(40, N, dtype=torch.bfloat16)), to_dev(w), to_dev(s), None, E5M2,
             to_dev(torch.rand(5)), None, 1.0, r))


def test_opcheck_melded_linear_grad_input():
    K, N, r = 64, 32, 8
    w, s = melded_weight(K, N, r)
    g = to_dev(torch.randn(40, N, dtype=torch.bfloat16))
    opcheck(torch.ops.falqon.melded_linear_grad_input.default,
            (g, to_dev(w), to_dev(s), to_dev(w[:N].t().contiguous()), E5M2))


def test_opcheck_melded_linear_backward():
    w, s = melded_weight(128, 64, 8)
    w_t = w[:64].t().contiguous()
    opcheck(torch.ops.falqon.melded_linear_backward.default,
            (to_dev(random_activations((5, 64), torch.bfloat16)),
             to_dev(random_activations((5, 8), torch.bfloat16)), to_dev(w), to_dev(s), None, 0.5,
             None, None, torch.float32))
    opcheck(torch.ops.falqon.melded_linear_backward.default,
            (to_dev(random_activations((2, 3, 64), torch.float16)),
             to_dev(random_activations((2, 3, 8), torch.float16)), to_dev(w), to_dev(s),
             to_dev(w_t), 2.0, E4M3, to_dev(torch.rand(4) + 1)))


def test_opcheck_meld_init():
    opcheck(torch.ops.falqon.meld_init.default,
            (to_dev(torch.randn(64, 48) * 0.02), 8, "randomized", 8, 2, 5))


@pytest.mark.parametrize("keep", [False, True])
def test_opcheck_topk_update(keep):
    K, N, r = 64, 32, 8
    w, s = melded_weight(K, N, r)
    opcheck(torch.ops.falqon.topk_update_.default,
            (to_dev(w.clone()), to_dev(torch.randn(N, r)), to_dev(w[:N].t().contiguous()), 4,
             1.5, keep))


# ---- errors -----------------------------------------------------------------------------------

def _bad_calls():
    w, s = melded_weight(64, 32, 8)
    B = torch.randn(32, 8)
    return {
        "quantize_int": lambda d: falqon.quantize(torch.ones(4, dtype=torch.int32, device=d)),
        "quantize_to_bf16": lambda d: falqon.quantize(torch.ones(4, device=d), torch.bfloat16),
        "linear_wrong_K": lambda d: torch.ops.falqon.melded_linear(
            torch.randn(3, 48, device=d), w.to(d), s.to(d), B.to(d)),
        "linear_wrong_rank": lambda d: torch.ops.falqon.melded_linear(
            torch.randn(3, 64, device=d), w.to(d), s.to(d), torch.randn(32, 17, device=d)),
        "grad_input_bad_dtype": lambda d: falqon.melded_linear_grad_input(
            torch.randn(3, 32, device=d), w.to(d), s.to(d), None, torch.bfloat16),
        "topk_negative_k": lambda d: falqon.topk_update_(w.clone().to(d), B.to(d), None, -1, 1.0),
        "meld_rank_0": lambda d: falqon.meld_init(torch.randn(32, 64, device=d), 0),
        "delayed_empty_history": lambda d: falqon.quantize_delayed(
            torch.randn(4, device=d), E4M3, torch.zeros(0, device=d)),
        "linear_bad_history": lambda d: torch.ops.falqon.melded_linear(
            torch.randn(3, 64, device=d), w.to(d), s.to(d), B.to(d), None, None, 1.0, None,
            torch.zeros(3, 4, device=d)),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_input_raises_same_error_as_cpu(name):
    call = _bad_calls()[name]
    messages = []
    for d in ("cpu", DEVICE):
        with pytest.raises(RuntimeError) as info:
            call(d)
        messages.append(str(info.value).splitlines()[0])
    assert messages[0] == messages[1]
    assert messages[0].startswith("falqon")


# ---- the emulated path (GPUs without FP8, or FALQON_FORCE_EMULATION=1) ------------------------

_WARN_PROBE = r"""
import json, warnings, torch, falqon
x = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
calls = []
for _ in range(2):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        q, s = falqon.quantize(x)
        torch.cuda.synchronize()
    calls.append([str(w.message) for w in seen if "falqon" in str(w.message)])
print("WARNINGS" + json.dumps(calls))
"""


# The ops' other test files that the emulated re-run covers with this one.
EMULATED_ALSO = ("test_cuda_quantize.py", "test_cuda_topk_update.py", "test_cuda_meld_init.py")


def _run_emulated(args, timeout):
    env = dict(os.environ, FALQON_FORCE_EMULATION="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))


@cuda_only
@pytest.mark.skipif(EMULATED, reason="this is the emulated run itself")
def test_emulated_path_warns_once():
    # The variable is read once per process: a subprocess of its own.
    r = _run_emulated(["-c", _WARN_PROBE], timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    first, second = json.loads(r.stdout.split("WARNINGS", 1)[1])
    assert len(first) == 1, f"expected one falqon warning on the first call, got {first}"
    assert "8.9" in first[0] and "emulat" in first[0].lower(), first[0]
    assert second == [], f"the warning came again: {second}"


@cuda_only
@pytest.mark.skipif(EMULATED, reason="this is the emulated run itself")
def test_emulated_path_matches_cpu():
    # This file's own tests and its three siblings' (the small cases), re-run with the emulated
    # CUDA path.
    here = os.path.dirname(__file__)
    files = [__file__] + [os.path.join(here, f) for f in EMULATED_ALSO]
    r = _run_emulated(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files,
                       "-k", "not opcheck and not emulated"], timeout=900)
    tail = (r.stdout[-6000:] + r.stderr[-2000:])
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail
