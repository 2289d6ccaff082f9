"""One set of validation rules (falqon.validation, csrc/checks.cpp) for FalqonConfig, MeldedLinear
and the ops, fake (meta) kernels included: a bad value fails at once with one message naming it,
never later inside torch, in backward or in a proxy update."""

import math

import pytest
import torch
from torch import nn

import falqon
from falqon import FalqonConfig, MeldedLinear, ops

BAD_ALPHAS = [0, -1.0, math.nan, math.inf, -math.inf, True, "2", 1e300]
BAD_INTS = [2.5, True, "4", None]


@pytest.mark.parametrize("alpha", BAD_ALPHAS)
def test_alpha_rules_are_the_same_for_config_and_module(alpha):
    with pytest.raises(ValueError, match="FalqonConfig: alpha must be a positive finite number"):
        FalqonConfig(alpha=alpha)
    with pytest.raises(ValueError, match="MeldedLinear: alpha must be a positive finite number"):
        MeldedLinear(32, 32, rank=4, alpha=alpha)


@pytest.mark.parametrize("name", ["rank", "topk", "amax_history_len"])
@pytest.mark.parametrize("value", BAD_INTS + [-1])
def test_integer_options_are_checked_by_config_and_module(name, value):
    if name == "rank" and value == -1:
        value = 0
    with pytest.raises(ValueError, match=f"FalqonConfig: {name} must be "):
        FalqonConfig(**{name: value})
    with pytest.raises(ValueError, match=f"MeldedLinear: {name} must be "):
        MeldedLinear(32, 32, **{"rank": 4, name: value})


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float64, torch.int32, "float32"])
def test_lora_dtype_is_checked_at_construction(dtype):
    with pytest.raises(ValueError, match="MeldedLinear: lora_dtype must be torch.float32, "
                                         "torch.float16 or torch.bfloat16"):
        MeldedLinear(32, 32, rank=4, lora_dtype=dtype)
    with pytest.raises(ValueError, match="lora_dtype must be"):
        MeldedLinear.from_linear(nn.Linear(32, 32), rank=4, lora_dtype=dtype)


def test_zero_dim_input_is_a_clear_error():
    layer = MeldedLinear.from_linear(nn.Linear(32, 32), rank=4)
    with pytest.raises(ValueError, match=r"MeldedLinear\(32 -> 32\) got a 0-d input"):
        layer(torch.tensor(1.0))


def _layer(update_mode="proxy"):
    return MeldedLinear.from_linear(nn.Linear(64, 64), rank=8, update_mode=update_mode)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("scaling", [0.0, -1.0, math.nan, math.inf, 1e39])
def test_ops_refuse_a_bad_scaling_on_every_kernel(device, scaling):
    layer = _layer()
    w, s, B = (t.detach().to(device) for t in (layer.weight, layer.weight_scale, layer.lora_B))
    x = torch.randn(4, 64, device=device)
    with pytest.raises(RuntimeError, match=r"falqon.melded_linear: scaling \(alpha / rank\) must "
                                           r"be a finite number > 0"):
        torch.ops.falqon.melded_linear(x, w, s, B, None, None, scaling)
    with pytest.raises(RuntimeError, match="melded_linear_grad_input: scaling"):
        torch.ops.falqon.melded_linear_grad_input(x, w, s, None, None, None, B, scaling)
    with pytest.raises(RuntimeError, match="melded_linear_backward: scaling"):
        torch.ops.falqon.melded_linear_backward(x, torch.zeros(4, 8, device=device), w, s, None,
                                                scaling)
    with pytest.raises(RuntimeError, match="topk_update_: scaling"):
        torch.ops.falqon.topk_update_(w.clone(), B.clone(), None, 2, scaling)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_grad_input_needs_to_know_which_rows_are_w(device):
    """A 64-output rank-8 weight has 80 rows, which a 48-output weight of rank 17-32 has too: a
    gradient of width 48 used to be accepted and multiplied by the first 48 rows."""
    layer = _layer()
    w, s = layer.weight.detach().to(device), layer.weight_scale.to(device)
    g48 = torch.randn(4, 48, device=device)
    with pytest.raises(RuntimeError, match="pass the adapter's rank"):
        torch.ops.falqon.melded_linear_grad_input(g48, w, s)
    with pytest.raises(RuntimeError, match="for 48 outputs and rank 8 has 64 rows"):
        ops.melded_linear_grad_input(g48, w, s, rank=8)
    with pytest.raises(RuntimeError, match="rank must be >= 1"):
        ops.melded_linear_grad_input(torch.randn(4, 64, device=device), w, s, rank=0)
    dx = ops.melded_linear_grad_input(torch.randn(4, 64, device=device), w, s, rank=8)
    assert dx.shape == (4, 64)


@pytest.mark.parametrize("bad, match", [
    (dict(input=torch.randn(4, 64, dtype=torch.float64)), "input must be float32"),
    (dict(input=torch.tensor(1.0)), "features in its last dimension"),
    (dict(weight_scale=torch.ones(2)), "weight_scale must be a single float32 value"),
    (dict(lora_B=torch.zeros(64, 8, dtype=torch.int32)), "lora_B must be float32"),
    (dict(lora_B=torch.zeros(48, 8)), "a melded weight for 48 outputs and rank 8"),
    (dict(bias=torch.zeros(3)), "bias must be a floating vector of 64 values"),
    (dict(amax_history=torch.zeros(3, 4)), "amax_history must be"),
])
def test_fake_melded_linear_makes_the_real_kernels_checks(bad, match):
    layer = _layer()
    args = dict(input=torch.randn(4, 64), weight=layer.weight.detach(),
                weight_scale=layer.weight_scale, lora_B=layer.lora_B.detach(), bias=None,
                weight_t=None, scaling=1.0, grad_dtype=None, amax_history=None)
    args.update(bad)
    for device in ("cpu", "meta"):
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(RuntimeError, match=match):
            torch.ops.falqon.melded_linear(*moved.values())


def test_fake_backward_and_record_amax_check_their_arguments():
    layer = _layer()
    w, s = layer.weight.detach().to("meta"), layer.weight_scale.to("meta")
    g = torch.randn(4, 64, device="meta")
    with pytest.raises(RuntimeError, match="xa must hold the rank's columns last"):
        torch.ops.falqon.melded_linear_backward(g, torch.zeros(4, 8, device="meta",
                                                               dtype=torch.half), w, s)
    with pytest.raises(RuntimeError, match="a melded weight for 64 outputs and rank 20 has 96"):
        torch.ops.falqon.melded_linear_backward(g, torch.zeros(4, 20, device="meta"), w, s)
    with pytest.raises(RuntimeError, match="record_amax_: amax must be one float32 value"):
        torch.ops.falqon.record_amax_(torch.zeros(4, device="meta"),
                                      torch.zeros(2, device="meta"))
