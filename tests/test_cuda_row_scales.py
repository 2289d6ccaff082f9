"""Row-wise quantisation on the GPU against the CPU reference: torch.ops.falqon.quantize_rows
(bitwise) and melded_linear given a per-row quantisation of x (cuBLASLt's outer-vector scales),
which MeldedLinear's adapter mode uses on Hopper. The helpers are cuda_testing's, the GEMM cases
test_cuda_ops.py's; see its docstring for how the comparisons are made."""

from __future__ import annotations

import math

import pytest
import torch

import falqon
from falqon import ops
from falqon_testing import opcheck
from cuda_testing import (ACT_DTYPES as ACT, E4M3, FP8, VIEWS, assert_gemm_close, check_quantize,
                          emulation_subset, gpu, random_activations, scaled_mm_floor, short,
                          subset_rows, to_dev, wide_range)
from test_cuda_ops import LINEAR_CASES, _case_id, _operands

pytestmark = [pytest.mark.gpu, gpu]


# ---- quantize_rows ------------------------------------------------------------------------------

# Rows shorter than a vector, not a multiple of 8 (the scalar loop), LLaMA-7B's widths (vectors
# in registers: 128 and 512 threads a row), other block sizes, and longer than the 32,768
# elements the registers of 1024 threads hold (the re-read remainder).
ROW_SHAPES = [(1, 7), (3, 5, 13), (4097, 3), (64, 4096), (8192, 4096), (33, 11008), (5, 12296),
              (2, 20000), (3, 40000)]


@pytest.mark.parametrize("shape", emulation_subset(ROW_SHAPES, lambda s: math.prod(s) < 1e6),
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("out", FP8, ids=short)
@pytest.mark.parametrize("inp", ACT, ids=short)
def test_quantize_rows_matches_cpu(shape, out, inp):
    # Rows of different magnitudes (each its own scale), values over many binades within a row.
    x = wide_range(shape, inp)
    x = (x.float() * torch.logspace(-2, 2, x.numel() // shape[-1]).reshape(*shape[:-1], 1))
    x = x.clamp(-6e4, 6e4).to(inp)
    check_quantize(to_dev(x), x, out, f"quantize_rows {shape} {inp} -> {out}", rows=True)


@pytest.mark.parametrize("view", VIEWS, ids=str)
@pytest.mark.parametrize("inp", (torch.bfloat16, torch.float32), ids=short)
def test_quantize_rows_views_match_cpu(view, inp):
    base = wide_range((1000, 336), inp)
    fn = VIEWS[view]
    check_quantize(fn(to_dev(base)), fn(base), E4M3, f"quantize_rows {view} {inp}", rows=True)


@pytest.mark.parametrize("out", FP8, ids=short)
def test_quantize_rows_special_values_match_cpu(out):
    x = torch.randn(6, 4104)
    x[0] = 0.0                       # scale 1, q = 0
    x[1] = 1e-45                     # amax / fmax underflows: scale 1, q = 0
    x[2, 1234] = float("nan")        # NaN scale in its row only
    x[3, 17] = float("inf")
    x[4, -1] = -10 * x[4].abs().max()
    q, s = check_quantize(to_dev(x), x, out, f"quantize_rows specials -> {out}", rows=True)
    assert s[0].item() == s[1].item() == 1.0 and not q[:2].cpu().view(torch.uint8).any()
    assert s[2].isnan() and not s[[0, 1, 3, 4, 5]].isnan().any()
    assert q.cpu()[4, -1].float().item() == -ops.FP8_MAX[out]


# The forward with x quantised per row (the adapter mode's quantisation; here given to the proxy
# mode, whose y is then the product itself): cuBLASLt's outer-vector scales, with the bias fused
# or added after, bf16 / fp16 / fp32 outputs.
ROW_CASES = [c for c in LINEAR_CASES if c.M in (0, 1, 127, 2048) and c[0] * c[1] <= 4096 * 11008]


@pytest.mark.parametrize("c", ROW_CASES, ids=_case_id)
def test_melded_linear_with_row_scales_matches_cpu(c):
    K, N, lead, r, bias, wt, dtype, _ = c
    w, s, w_t, b = _operands(c)
    x = random_activations((*lead, K), dtype)
    lora_B = torch.randn(N, r)
    q, sx = falqon.quantize_rows(x, E4M3)
    y_d, xa_d, amax_d = torch.ops.falqon.melded_linear(
        to_dev(x), to_dev(w), to_dev(s), to_dev(lora_B), to_dev(b), to_dev(w_t), 1.0, None, None,
        False, to_dev(q), to_dev(sx))
    assert amax_d.shape == sx.shape and torch.equal(amax_d.cpu(), sx * 448)
    rows = subset_rows(c.M)
    pick = (lambda t, width: t.reshape(-1, width) if rows is None else t.reshape(-1, width)[rows])
    x_ref, q_ref = pick(x, K), pick(q, K)
    s_ref = sx.reshape(-1) if rows is None else sx.reshape(-1)[rows]
    y_c, xa_c, _ = torch.ops.falqon.melded_linear(x_ref, w, s, lora_B, b, w_t, 1.0, None, None,
                                                  False, q_ref, s_ref)
    floor = scaled_mm_floor(q_ref, s_ref.reshape(-1, 1), w.t(), s, fast_accum=True)
    f_y = f_xa = None
    if floor is not None:
        if b is not None:
            floor[:, :N] += b.float()
        floor = floor.to(dtype)
        f_y, f_xa = floor[:, :N], floor[:, N:N + r]
    y_dv, xa_dv = pick(y_d.cpu(), N), pick(xa_d.cpu(), r)
    assert_gemm_close(y_dv, y_c.reshape(-1, N), f_y, f"y rows {_case_id(c)}")
    assert_gemm_close(xa_dv, xa_c.reshape(-1, r), f_xa, f"xa rows {_case_id(c)}")


@pytest.mark.parametrize("out", FP8, ids=short)
def test_opcheck_quantize_rows(out):
    opcheck(torch.ops.falqon.quantize_rows.default,
            (to_dev(torch.randn(33, 64, dtype=torch.bfloat16)), out))
