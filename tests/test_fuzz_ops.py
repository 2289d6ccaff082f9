"""Fuzzing of the ops and MeldedLinear (hypothesis, bounded: derandomized, a few dozen examples a
test, small shapes; a few seconds on 2 cores): random shapes, dtypes, strides and special values
(NaN, Inf, zeros, huge and tiny values). Every call either raises one clear error (RuntimeError or
ValueError naming falqon or the layer) or returns what the reference formula gives, bit for bit; the
fake (meta) kernels raise exactly where the real ones do and give the same shapes."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import falqon
from falqon import MeldedLinear, ops

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
ACT = [torch.float32, torch.float16, torch.bfloat16]
ANY_DTYPE = ACT + [torch.float64, torch.int32, torch.float8_e4m3fn]
SPECIALS = [math.nan, math.inf, -math.inf, 0.0, 1e30, -1e-30, 6e4]


def clear_error(exc: Exception) -> bool:
    text = str(exc)
    return "falqon" in text or "MeldedLinear" in text


@st.composite
def tensors(draw, shape, dtypes=ACT, specials=True):
    """A tensor of `shape` in one of `dtypes`, maybe a non-contiguous view, maybe with a few
    special values."""
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 300.0]))
    if specials and x.numel() and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    x = x.to(dtype) if dtype.is_floating_point else x.to(torch.int32).to(dtype)
    if x.dim() >= 2 and draw(st.booleans()):  # the same values through a transposed view
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def reference_quantize(x: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN.md's per-tensor quantisation in the op's fp32 arithmetic."""
    xf = x.float()
    amax = xf.abs().amax() if xf.numel() else torch.zeros(())
    scale = amax / torch.tensor(ops.FP8_MAX[dtype])
    scale = torch.where(scale == 0, torch.ones(()), scale)
    inv = torch.reciprocal(scale).clamp(max=torch.finfo(torch.float32).max)
    return (xf * inv).clamp(-ops.FP8_MAX[dtype], ops.FP8_MAX[dtype]).to(dtype), scale


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.itemsize == 1 and a.dtype.is_floating_point:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
        return torch.equal(a, b)
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@FUZZ
@given(data=st.data(), shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
       out=st.sampled_from([ops.E4M3, ops.E5M2, torch.float16]))
def test_quantize_is_the_reference_or_a_clear_error(data, shape, out):
    x = data.draw(tensors(tuple(shape), ANY_DTYPE))
    try:
        q, scale = falqon.quantize(x, out)
    except RuntimeError as exc:
        assert clear_error(exc), exc
        assert x.dtype not in ACT or out not in ops.FP8_MAX
        with pytest.raises(RuntimeError):
            falqon.quantize(x.to("meta"), out)
        return
    q_ref, s_ref = reference_quantize(x, out)
    assert same(q, q_ref) and same(scale, s_ref)
    q_meta, _ = falqon.quantize(x.to("meta"), out)
    assert q_meta.shape == q.shape and q_meta.dtype == q.dtype


@st.composite
def layer_calls(draw):
    """Arguments of melded_linear: mostly valid, sometimes with one thing wrong."""
    K = draw(st.sampled_from([16, 32, 48]))
    N = draw(st.sampled_from([16, 32]))
    r = draw(st.integers(1, min(K, N)))
    layer = MeldedLinear(K, N, rank=r, update_mode="proxy")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    w = (torch.randn(layer.weight.shape, generator=gen) * 100).to(ops.E4M3)
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))
    k_in = K if draw(st.integers(0, 9)) else draw(st.sampled_from([K + 16, 8]))
    x = draw(tensors(lead + (k_in,), ACT + [torch.float64]))
    B = draw(tensors((N, r), ACT, specials=False))
    bias = draw(st.none() | tensors((N,), ACT))
    scaling = draw(st.sampled_from([0.5, 1.0, 2.0, 0.0, math.nan]))
    adapter = draw(st.booleans())
    return x, w, torch.tensor(draw(st.sampled_from([1e-3, 0.02]))), B, bias, scaling, adapter


def reference_melded_linear(x, w, s, B, bias, scaling, adapter):
    """csrc/reference.cpp's melded_linear, transcribed: y (contiguous) and xa."""
    N, r = B.shape
    x2 = x.reshape(-1, x.shape[-1])
    xq, sx = reference_quantize(x2, ops.E4M3)
    acc = (xq.float() @ w.float().t()) * (sx * s)
    if bias is not None:
        acc[:, :N] += bias.float()
    out = acc.to(x.dtype)
    y, xa = out[:, :N], out[:, N:N + r]
    if adapter:
        y = torch.addmm(y.float(), xa.float(), B.to(x.dtype).float().t(), alpha=scaling)
        y = y.to(x.dtype)
    lead = x.shape[:-1]
    return y.reshape(*lead, N), xa.reshape(*lead, r)


@FUZZ
@given(call=layer_calls())
def test_melded_linear_is_the_reference_or_a_clear_error(call):
    x, w, s, B, bias, scaling, adapter = call
    args = (x, w, s, B, bias, None, scaling, None, None, adapter)
    try:
        y, xa, _ = torch.ops.falqon.melded_linear(*args)
    except RuntimeError as exc:
        assert clear_error(exc), exc
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError):  # the fake kernel refuses it too
            torch.ops.falqon.melded_linear(*meta)
        return
    y_ref, xa_ref = reference_melded_linear(x, w, s, B, bias, scaling, adapter)
    assert same(y.contiguous(), y_ref) and same(xa, xa_ref)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    y_meta, xa_meta, _ = torch.ops.falqon.melded_linear(*meta)
    assert y_meta.shape == y.shape and xa_meta.shape == xa.shape and y_meta.dtype == y.dtype


@FUZZ
@given(data=st.data(), mode=st.sampled_from(["adapter", "proxy"]),
       K=st.sampled_from([16, 32, 40]), N=st.sampled_from([16, 32]),
       rank=st.sampled_from([1, 4, 16, 17, 0, 2.5, True]),
       alpha=st.sampled_from([None, 8.0, 0.0, -1.0, math.inf, math.nan]),
       history=st.sampled_from([0, 3]))
def test_melded_linear_module_trains_or_refuses_clearly(data, mode, K, N, rank, alpha, history):
    try:
        lin = torch.nn.Linear(K, N)
        layer = MeldedLinear.from_linear(lin, rank=rank, alpha=alpha, update_mode=mode,
                                         amax_history_len=history)
    except ValueError as exc:
        assert clear_error(exc), exc
        return
    x = data.draw(tensors((3, K), ACT))
    try:
        y = layer(x.requires_grad_())
    except (ValueError, TypeError) as exc:
        assert clear_error(exc), exc
        return
    y.float().sum().backward()
    assert x.grad.shape == x.shape and layer.lora_B.grad.shape == (N, rank)
    if torch.isfinite(x).all():
        assert torch.isfinite(y).all() or x.dtype == torch.float16  # fp16 may overflow
        assert torch.isfinite(layer.amax_history).all() if history else True
    if mode == "proxy":
        layer.proxy_update()
        assert torch.isfinite(layer.dequantized_weight()).all()
