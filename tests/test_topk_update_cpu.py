"""topk_update_ (the proxy mode's update) on the CPU reference: exactly the top-k rows of the FP8
weight move, by the float64 formula W'[T] + scaling B[T] A_q rounded to E4M3 (within one step at
an exact rounding tie), saturating, a NaN row left as it was, and k's edge cases. The grouped op
is tests/test_topk_update_many.py's; the CUDA kernels are tested against this reference in
tests/test_cuda_topk_many.py and tests/test_cuda_ops.py."""

import pytest
import torch

from falqon import ops
from falqon_testing import fp8_bytes
from cpu_formulas import E4M3, melded


def _update_setup(n=64, k=48, rank=8, transposed=False):
    _, layer = melded(n, k, rank)
    weight = layer.weight.detach().clone()
    weight_t = weight[:n].t().contiguous() if transposed else None
    # Row norms spread over two decades so the top-k set is unambiguous, and large enough that
    # every selected row moves by several FP8 steps.
    B = torch.randn(n, rank) * torch.logspace(-2, 0, n)[torch.randperm(n)].unsqueeze(1) * 40
    return layer, weight, weight_t, B


@pytest.mark.parametrize("keep_residual", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_topk_update_changes_exactly_the_top_rows(keep_residual, transposed):
    n, topk, scaling = 64, 5, 0.5
    layer, weight, weight_t, B = _update_setup(n, transposed=transposed)
    rank = B.shape[1]
    before, B_before = weight.clone(), B.clone()
    ops.topk_update_(weight, B, weight_t, topk, scaling, keep_residual)

    top = set(B_before.double().abs().sum(1).topk(topk).indices.tolist())
    changed = set((fp8_bytes(weight) != fp8_bytes(before)).any(1).nonzero().flatten().tolist())
    assert changed == top
    # The formula, in float64: W'[T] + scaling B[T] A_q in the scaled domain, then E4M3.
    idx = torch.tensor(sorted(top))
    a_q = before[n:n + rank].double()
    expect = (before[idx].double() + scaling * B_before[idx].double() @ a_q).clamp(-448, 448)
    got = weight[idx]
    same = fp8_bytes(got) == fp8_bytes(expect.to(E4M3))
    # fp32 vs float64 arithmetic may differ at an exact rounding tie: allow one step, rarely.
    assert same.float().mean() > 0.99
    step = 2.0 ** (torch.floor(torch.log2(expect.abs().clamp_min(2**-6))) - 3)
    assert bool(((got.double() - expect).abs() <= step * 1.01)[~same].all())
    if keep_residual:
        assert not B[idx].any() and torch.equal(B[[i for i in range(n) if i not in top]],
                                                B_before[[i for i in range(n) if i not in top]])
    else:
        assert not B.any()
    if transposed:
        assert torch.equal(fp8_bytes(weight_t), fp8_bytes(weight[:n].t().contiguous()))


def test_topk_update_saturates_instead_of_overflowing():
    layer, weight, _, B = _update_setup()
    B[7] = 1e6  # an update far beyond E4M3's range
    ops.topk_update_(weight, B, None, 1, 1.0)
    row = weight[7].float()
    assert torch.isfinite(row).all() and row.abs().max() == 448


def test_topk_update_leaves_a_nan_row_unchanged():
    layer, weight, _, B = _update_setup()
    B[3, 0] = float("nan")
    before = weight.clone()
    ops.topk_update_(weight, B, None, 64, 1.0)
    assert torch.equal(fp8_bytes(weight[3]), fp8_bytes(before[3]))
    assert not torch.isnan(weight.float()).any() and not B.any()


def test_topk_update_edge_cases():
    layer, weight, _, B = _update_setup()
    before = weight.clone()
    ops.topk_update_(weight, B.clone(), None, 0, 1.0, keep_residual=False)
    assert torch.equal(fp8_bytes(weight), fp8_bytes(before))
    B_keep = B.clone()
    ops.topk_update_(weight, B_keep, None, 0, 1.0, keep_residual=True)
    assert torch.equal(B_keep, B)
    ops.topk_update_(weight, B.clone(), None, 10_000, 1.0)  # k beyond N clamps to N
    n = B.shape[0]
    assert torch.equal(fp8_bytes(weight[n:]), fp8_bytes(before[n:])), "A and padding never move"
    with pytest.raises(RuntimeError, match="k must be >= 0"):
        ops.topk_update_(weight, B, None, -1, 1.0)
