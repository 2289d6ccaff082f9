"""Delayed scaling treats every non-finite amax alike: a NaN or Inf amax is never recorded
(record_amax_ leaves the history as it was), and a history holding a NaN or +Inf has nothing usable
(the input's own amax is used), so one bad tensor cannot poison the next H calls' scales. The CUDA
kernels' version is tests/test_cuda_quantize.py::test_record_amax_skips_non_finite_like_cpu."""

import copy

import pytest
import torch
from torch import nn

import falqon
from falqon import MeldedLinear, ops

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", NON_FINITE)
def test_record_amax_does_not_record_a_non_finite_amax(bad):
    history = torch.tensor([3.0, 2.0, 1.0])
    ops.record_amax_(history, torch.tensor(bad))
    assert torch.equal(history, torch.tensor([3.0, 2.0, 1.0]))
    ops.record_amax_(history, torch.tensor(5.0))
    assert torch.equal(history, torch.tensor([5.0, 3.0, 2.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [ops.E4M3, ops.E5M2])
def test_a_non_finite_history_is_current_scaling(bad, dtype):
    x = torch.randn(64, 32)
    q, scale, amax = falqon.quantize_delayed(x, dtype, torch.tensor([0.5, bad, 2.0]))
    q_cur, s_cur = falqon.quantize(x, dtype)
    assert torch.equal(q.view(torch.uint8), q_cur.view(torch.uint8))
    assert torch.equal(scale, s_cur) and amax == x.abs().amax()


@pytest.mark.parametrize("mode", ["adapter", "proxy"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_bad_input_does_not_spoil_the_next_calls(mode, bad):
    layer = MeldedLinear.from_linear(nn.Linear(64, 64), rank=8, amax_history_len=4,
                                     update_mode=mode)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    clean = [torch.randn(8, 64) for _ in range(6)]
    twin = copy.deepcopy(layer)
    for x in clean[:2]:
        layer(x).sum().backward()
        twin(x).sum().backward()
    spoiled = clean[2].clone()
    spoiled[1, 3] = bad
    layer(spoiled).sum().backward()  # x's amax is not finite: it is not recorded
    assert torch.equal(layer.amax_history, twin.amax_history)
    for x in clean[2:]:
        y, y_twin = layer(x), twin(x)
        assert torch.isfinite(y).all()
        assert torch.equal(y, y_twin)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bad_gradient_is_not_recorded(bad):
    layer = MeldedLinear.from_linear(nn.Linear(64, 64), rank=8, amax_history_len=3)
    x = torch.randn(8, 64, requires_grad=True)
    layer(x).sum().backward()
    before = layer.amax_history.clone()
    g = torch.ones(8, 64)
    g[0, 0] = bad
    layer.eval()  # the forward records nothing: only the backward's g
    layer(x).backward(g)
    assert torch.equal(layer.amax_history, before)
