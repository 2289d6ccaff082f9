"""topk_update_ on the GPU against the CPU reference: bitwise up to rare one-step FP8 flips.

Inputs are drawn on the CPU, copied to the GPU, and the CPU op runs on the CPU copies. Skipped
without a CUDA GPU with FP8 (see cuda_testing for the CPU dry run); test_cuda_ops.py re-runs the
small cases on the emulated path.
"""

from __future__ import annotations

import math

import pytest
import torch

import falqon
from cuda_testing import (assert_fp8_equal, assert_fp8_nearly_equal, emulation_subset, gpu,
                          melded_weight, short, to_dev)

pytestmark = [pytest.mark.gpu, gpu]


def _separate_top_k(B: torch.Tensor, k: int) -> torch.Tensor:
    """Scale down the rows whose score (L1 norm) lies just under the k-th largest, so that the top
    k are unambiguous: the CPU and the GPU sum |B| in different orders (fp32 errors of
    ~r 2^-24 relative), and a near tie at the boundary could then pick different rows."""
    scores = B.double().abs().sum(1)
    if 0 < k < len(scores):
        kth = scores.topk(k).values[-1]
        close = (scores < kth) & (scores > kth * (1 - 1e-3))
        B[close] *= 0.99   # 0.99 kth even after a bf16 rounding (2^-9) is < (1 - 1e-3) kth
    return B


TOPK_CASES = emulation_subset([
    # K, N, r, k, B dtype, scaling, keep_residual, weight_t
    (4096, 4096, 64, 10, torch.float32, 1.0, False, False),
    (4096, 11008, 64, 64, torch.float32, 2.0, True, True),
    (11008, 4096, 16, 10, torch.bfloat16, 1.0, False, True),
    (5120, 13824, 8, 300, torch.float32, 0.5, True, False),
    (256, 128, 8, 200, torch.float32, 1.0, False, True),       # k > N: every row
    (64, 32, 16, 0, torch.float32, 1.0, False, True),          # k = 0: only the reset
    (64, 32, 16, 0, torch.float32, 1.0, True, False),
], lambda c: c[0] * c[1] <= 4096 * 4096)


def _topk_operands(K, N, r, B_dtype):
    w, s = melded_weight(K, N, r)
    w = w.clone()
    # Rows of B are scored by their L1 norm; magnitudes such that scaling * B[T] A_q moves a good
    # part of the selected FP8 weights by a step or more (A_q is ~1/4 of W_q in the scaled domain).
    B = (torch.randn(N, r) * 0.05 * 8 / math.sqrt(r)).to(B_dtype)
    return w, s, B


def _run_topk(w, B, w_t, k, scaling, keep):
    w_d, B_d, wt_d = to_dev(w).clone(), to_dev(B).clone(), to_dev(w_t)
    wt_d = None if wt_d is None else wt_d.clone()
    falqon.topk_update_(w_d, B_d, wt_d, k, scaling, keep)
    w_c, B_c, wt_c = w.clone(), B.clone(), None if w_t is None else w_t.clone()
    falqon.topk_update_(w_c, B_c, wt_c, k, scaling, keep)
    return (w_d, B_d, wt_d), (w_c, B_c, wt_c)


def _changed_rows(before: torch.Tensor, after: torch.Tensor) -> set:
    diff = before.cpu().view(torch.uint8) != after.cpu().view(torch.uint8)
    return set(diff.any(1).nonzero().flatten().tolist())


@pytest.mark.parametrize("K,N,r,k,B_dtype,scaling,keep,wt", TOPK_CASES,
                         ids=lambda v: short(v) if isinstance(v, torch.dtype) else str(v))
def test_topk_update_matches_cpu(K, N, r, k, B_dtype, scaling, keep, wt):
    w, s, B = _topk_operands(K, N, r, B_dtype)
    B = _separate_top_k(B, k)
    w_t = w[:N].t().contiguous() if wt else None
    (w_d, B_d, wt_d), (w_c, B_c, _) = _run_topk(w, B, w_t, k, scaling, keep)

    kk = min(k, N)
    T = set(B.double().abs().sum(1).topk(kk).indices.tolist()) if kk else set()
    # Only the selected rows of W may change, on either device; A and the padding never do.
    assert _changed_rows(w, w_c) <= T and _changed_rows(w, w_d) <= T
    assert torch.equal(w_d[N:].cpu().view(torch.uint8), w[N:].view(torch.uint8))
    if kk:
        rows = sorted(T)
        # The update must be worth testing: it moves a fair part of the selected weights.
        moved = (w_c[rows].view(torch.uint8) != w[rows].view(torch.uint8)).float().mean().item()
        assert moved > 0.05, f"the update moved only {moved:.1%} of the selected weights"
        # Equal, except where v = W + scaling (B A_q) lands within fp32 noise of a rounding
        # midpoint and the two sum orders round it to neighbouring FP8 values: rare.
        assert_fp8_nearly_equal(w_d[rows], w_c[rows], max_fraction=1e-3, what="updated rows")
    # B reset per the policy: all rows (drop) or only the applied ones (keep_residual).
    B_dc = B_d.cpu()
    if keep:
        untouched = [i for i in range(N) if i not in T]
        assert torch.equal(B_dc[untouched], B[untouched])
        assert not B_dc[sorted(T)].any()
    else:
        assert not B_dc.any()
    assert torch.equal(B_dc, B_c)
    if wt:  # the transposed copy follows the weight, bit for bit
        assert torch.equal(wt_d.cpu().view(torch.uint8),
                           w_d[:N].cpu().t().contiguous().view(torch.uint8))


def test_topk_update_nan_and_saturation_match_cpu():
    K, N, r, k = 1024, 512, 16, 8
    w, s, B = _topk_operands(K, N, r, torch.float32)
    B[3, 5] = float("nan")   # a NaN score ranks first; its row must stay as it was
    B[7] *= 1e4              # this row's update saturates at +-448
    B = _separate_top_k(B, k)
    w_t = w[:N].t().contiguous()
    (w_d, B_d, wt_d), (w_c, B_c, _) = _run_topk(w, B, w_t, k, 1.0, False)
    assert torch.equal(w_d[3].cpu().view(torch.uint8), w[3].view(torch.uint8))
    assert torch.equal(w_c[3].view(torch.uint8), w[3].view(torch.uint8))
    sat = w_c[7].float().abs() == 448
    assert sat.float().mean() > 0.5, "the large row was meant to saturate"
    assert_fp8_equal(w_d[7], w_c[7], "saturated row")
    assert_fp8_nearly_equal(w_d, w_c, max_fraction=1e-4, what="weight")
    assert not B_d.cpu().any()
    assert torch.equal(wt_d.cpu().view(torch.uint8), w_d[:N].cpu().t().contiguous().view(torch.uint8))
