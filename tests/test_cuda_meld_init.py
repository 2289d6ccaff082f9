"""meld_init on the GPU against the CPU reference and a planted truth: the weight rows bitwise, the
adapter up to fp32 differences of the SVD.

Inputs are drawn on the CPU, copied to the GPU, and the CPU op runs on the CPU copies. Skipped
without a CUDA GPU with FP8 (see cuda_testing for the CPU dry run); test_cuda_ops.py re-runs the
small cases on the emulated path.
"""

from __future__ import annotations

import pytest
import torch

import falqon
from falqon import ops
from falqon_testing import rel_err
from cuda_testing import (E4M3, assert_fp8_equal, assert_fp8_nearly_equal, emulation_subset,
                          fp8_codes_sorted, gpu, short, to_dev)

pytestmark = [pytest.mark.gpu, gpu]


def planted_weight(N: int, K: int, r: int):
    """A float32 weight whose FP8 quantisation is known exactly and whose quantisation error is a
    planted rank-r matrix with well separated singular values, so that A = sqrt(S) V^T is well
    conditioned (its rows, not only their span, are determined) and known.

    W = s0 q + E: q random E4M3 values of magnitude 16..416 plus one 448 (the amax, in row 0),
    s0 = 2^-10 (a power of two: s0 q is exact); E = U diag(S) V^T with U's row 0 zero (the amax
    element stays exact) and |E| <= 0.4 s0, under half an FP8 step of every |q| >= 16, so that
    fp8(W / s0) = q. Singular values 1 - i/(2r) (times a constant): gaps of 1/(2r) relative."""
    s0 = 2.0 ** -10
    grid = fp8_codes_sorted(E4M3)
    grid = grid[(grid >= 16) & (grid <= 416)]
    q = grid[torch.randint(len(grid), (N, K))] * (torch.randint(0, 2, (N, K)) * 2 - 1)
    q[0, 0] = 448.0
    U = torch.cat([torch.zeros(1, r), torch.linalg.qr(torch.randn(N - 1, r, dtype=torch.float64)).Q])
    V = torch.linalg.qr(torch.randn(K, r, dtype=torch.float64)).Q
    S = 1 - torch.arange(r, dtype=torch.float64) / (2 * r)
    E = (U * S) @ V.T
    c = 0.4 * s0 / E.abs().max()
    W = (q.double() * s0 + E * c).float()
    A = (S * c).sqrt()[:, None] * V.T
    pivot = A.gather(1, A.abs().argmax(1, keepdim=True))
    A = A * torch.where(pivot < 0, -1.0, 1.0)   # the reference's sign convention
    return W, q.to(E4M3), s0, A


def _adapter(w, s, N, r):
    return w[N:N + r].cpu().double() * s.cpu().double()


MELD_PLANTED = emulation_subset(
    [(256, 512, 8, "exact"), (512, 256, 16, "randomized"), (1024, 1024, 64, "exact"),
     (4096, 4096, 64, "randomized"), (11008, 4096, 64, "randomized")],
    lambda c: c[0] * c[1] <= 1024 * 1024)


@pytest.mark.parametrize("N,K,r,svd", MELD_PLANTED, ids=str)
def test_meld_init_planted_matches_cpu_and_truth(N, K, r, svd):
    W, q, s0, A_true = planted_weight(N, K, r)
    w_d, s_d = falqon.meld_init(to_dev(W), r, svd=svd, seed=7)
    w_c, s_c = falqon.meld_init(W, r, svd=svd, seed=7)
    r16 = ops.padded_rank(r)
    assert w_d.shape == (N + r16, K) and w_d.dtype == E4M3 and w_d.is_contiguous()
    assert s_d.shape == () and s_d.dtype == torch.float32
    assert s_d.item() == s_c.item() == s0
    # The weight rows are the plain quantisation of W, bit for bit, on both devices.
    assert_fp8_equal(w_c[:N], q, "CPU weight rows")
    assert_fp8_equal(w_d[:N], q, "GPU weight rows")
    assert not w_d[N + r:].cpu().view(torch.uint8).any(), "padding rows must be zero"
    a_d, a_c = _adapter(w_d, s_d, N, r), _adapter(w_c, s_c, N, r)
    # Against the truth: FP8 keeps 4 significant bits (relative error <= 2^-4 an element).
    for name, a in (("GPU", a_d), ("CPU", a_c)):
        row_err = (a - A_true).norm(dim=1) / A_true.norm(dim=1)
        assert row_err.max() < 2.0 ** -3, f"{name} adapter rows vs the planted A: {row_err.max():.3g}"
    # GPU against CPU: the same fp32 A up to the SVDs' rounding (~1e-5 relative here), so the FP8
    # rows agree but for rare one-step flips; the Gram matrices A^T A agree closely.
    assert_fp8_nearly_equal(w_d[N:N + r], w_c[N:N + r], max_fraction=1e-2, what="adapter rows")
    assert rel_err(a_d.T @ a_d, a_c.T @ a_c) < 2.0 ** -6


MELD_RANDOM = emulation_subset(
    [(512, 1024, 16, "exact", torch.float32), (4096, 4096, 64, "randomized", torch.bfloat16),
     (13824, 5120, 64, "randomized", torch.bfloat16), (1024, 512, 8, "randomized", torch.float16)],
    lambda c: c[0] * c[1] <= 1024 * 1024)


@pytest.mark.parametrize("N,K,r,svd,dtype", MELD_RANDOM,
                         ids=lambda v: short(v) if isinstance(v, torch.dtype) else str(v))
def test_meld_init_random_weight_matches_cpu(N, K, r, svd, dtype):
    W = (torch.randn(N, K) * 0.02).to(dtype)
    w_d, s_d = falqon.meld_init(to_dev(W), r, svd=svd, seed=3)
    w_c, s_c = falqon.meld_init(W, r, svd=svd, seed=3)
    q, s = falqon.quantize(W, E4M3)
    a_c = _adapter(w_c, s_c, N, r)
    # A (from the quantisation error) is far smaller than W, so [W; A; 0] has W's scale and its
    # weight rows are W's plain quantisation.
    assert a_c.abs().max() < W.abs().max().double()
    assert s_d.item() == s_c.item() == s.item()
    assert_fp8_equal(w_c[:N], q, "CPU weight rows")
    assert_fp8_equal(w_d[:N], q, "GPU weight rows")
    assert not w_d[N + r:].cpu().view(torch.uint8).any()
    # The quantisation error of a random W has a flat spectrum: singular vectors of nearly equal
    # singular values may rotate among themselves between two SVD implementations, so compare
    # what is invariant to that: how much of the error's energy the adapter's span captures
    # (equal within 1%; the FP8 rounding of A alone moves it by less than that).
    E = W.double() - q.double() * s.double()
    a_d = _adapter(w_d, s_d, N, r)

    def captured(a):
        basis = torch.linalg.qr(a.T).Q
        return (E @ basis).pow(2).sum().item()

    assert abs(captured(a_d) - captured(a_c)) <= 1e-2 * captured(a_c)
    assert captured(a_c) > 0
