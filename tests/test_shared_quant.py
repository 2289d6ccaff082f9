"""Projections that share an input share its FP8 quantisation (falqon.shared_quant): the op's
input_fp8 / input_scale arguments, and the per-model cache of melded layers on a tiny LLaMA."""

from __future__ import annotations

import copy
import io
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import falqon
from falqon import FalqonConfig, FalqonError, shared_quant
from falqon_testing import opcheck
from workflow_testing import tiny_causal_lm, tiny_config

E4M3 = torch.float8_e4m3fn
OP = torch.ops.falqon.melded_linear.default


@pytest.fixture(autouse=True)
def _fresh_switch(monkeypatch):
    """Each test reads FALQON_SHARED_QUANT afresh (the switch is read once per process)."""
    monkeypatch.setenv(shared_quant.ENV, "1")  # opt-in for now: the tests turn it on
    shared_quant.enabled.cache_clear()
    yield
    shared_quant.enabled.cache_clear()


def switch(monkeypatch, value: str) -> None:
    monkeypatch.setenv(shared_quant.ENV, value)
    shared_quant.enabled.cache_clear()


QUANTIZE_OPS = (torch.ops.falqon.quantize.default, torch.ops.falqon.quantize_rows.default)


class Calls(TorchDispatchMode):
    """Counts torch.ops.falqon.quantize and quantize_rows calls and records melded_linear calls:
    the input_fp8 each got (held, so that no two are the same object by a reused address), None
    without."""

    def __init__(self):
        super().__init__()
        self.quantize, self.melded = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in QUANTIZE_OPS:
            self.quantize += 1
        elif func is OP:
            self.melded.append(args[10] if len(args) > 10 else None)
        return func(*args, **(kwargs or {}))


def melded_layer(n=64, k=48, rank=8, bias=False, update_mode="adapter"):
    lin = nn.Linear(k, n, bias=bias)
    layer = falqon.MeldedLinear.from_linear(lin, rank=rank, svd="exact", update_mode=update_mode)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    return layer


# ---- the op's input_fp8 / input_scale -----------------------------------------------------------

@pytest.mark.parametrize("adapter", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
def test_op_with_the_quantisation_given_is_bit_identical(adapter, bias, act_dtype):
    """The quantisation the op makes itself (per tensor), given, changes nothing."""
    layer = melded_layer(bias=bias, update_mode="adapter" if adapter else "proxy")
    x0 = torch.randn(2, 3, 48).to(act_dtype)
    probe = torch.randn(2, 3, 64)
    q, s = torch.ops.falqon.quantize(x0, E4M3)
    results = []
    for given in (False, True):
        x = x0.clone().requires_grad_()
        B = layer.lora_B.detach().clone().requires_grad_()
        extra = (None, adapter, q, s) if given else (None, adapter)
        y, xa, amax = OP(x, layer.weight, layer.weight_scale, B, layer.bias, None, 0.5, None,
                         *extra)
        (y.float() * probe).sum().backward()
        results.append((y.detach(), xa, amax, x.grad, B.grad))
    (y0, xa0, amax0, dx0, dB0), (y1, xa1, amax1, dx1, dB1) = results
    for a, b in ((y0, y1), (xa0, xa1), (dx0, dx1), (dB0, dB1)):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)
    assert torch.equal(amax1, s * 448), "x's amax is then input_scale * 448"
    assert amax0.shape == amax1.shape == s.shape
    assert torch.all(amax0 <= amax1 * (1 + 2 ** -20))


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("adapter", [False, True])
def test_op_takes_either_kind_of_quantisation(adapter, rows):
    """A per-tensor or a per-row quantisation given to either mode is used as given: the product
    is the reference formula's at those scales, and x's amax has the given scale's shape."""
    layer = melded_layer(update_mode="adapter" if adapter else "proxy")
    x = torch.randn(2, 3, 48)
    quantize = torch.ops.falqon.quantize_rows if rows else torch.ops.falqon.quantize
    q, s = quantize(x, E4M3)
    y, xa, amax = OP(x, layer.weight, layer.weight_scale, layer.lora_B, None, None, 0.5, None,
                     None, adapter, q, s)
    assert amax.shape == s.shape and torch.equal(amax, s * 448)
    sx = s if s.dim() == 0 else s.unsqueeze(-1)
    product = (q.double() * sx.double()) @ (layer.weight.double() * layer.weight_scale.double()).t()
    torch.testing.assert_close(xa.double(), product[..., 64:64 + 8], rtol=1e-5, atol=1e-5)
    if not adapter:
        torch.testing.assert_close(y.double(), product[..., :64], rtol=1e-5, atol=1e-5)


def test_opcheck_with_the_quantisation_given():
    for adapter in (False, True):
        layer = melded_layer(bias=True, update_mode="adapter" if adapter else "proxy")
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(4, 48, dtype=dtype, requires_grad=True)
            for quantize in (torch.ops.falqon.quantize, torch.ops.falqon.quantize_rows):
                q, s = quantize(x.detach(), E4M3)
                B = layer.lora_B.detach().clone().requires_grad_()
                opcheck(OP, (x, layer.weight, layer.weight_scale, B, layer.bias, None, 0.5, None,
                             None, adapter, q, s))


def test_op_rejects_a_bad_quantisation_on_every_backend():
    layer = melded_layer()
    x = torch.randn(2, 3, 48)
    q, s = torch.ops.falqon.quantize(x, E4M3)
    history = torch.ones(2, 4)
    cases = [
        ((None, False, q, None), "input_fp8 and input_scale go together .* got only input_fp8"),
        ((None, False, None, s), "got only input_scale"),
        ((history, False, q, s), "cannot be combined with amax_history"),
        ((None, False, q.reshape(6, 48), s), r"input_fp8 must be a float8_e4m3fn tensor of the "
                                             r"input's shape \[2, 3, 48\], got \[6, 48\]"),
        ((None, False, x.to(torch.float8_e5m2), s), "input_fp8 must be a float8_e4m3fn tensor"),
        ((None, False, q, s.double()), r"input_scale must be float32, a single value \(quantize\) "
                                       r"or one per row of the input, shaped \[2, 3\]"),
        ((None, False, q, torch.ones(2)), r"input_scale must be float32, .* got shape \[2\]"),
        ((None, False, q, torch.ones(3, 2)), r"got shape \[3, 2\]"),
    ]
    for device in ("cpu", "meta"):  # the CPU kernel, and the fake kernel (torch.compile's)
        to = (lambda t: t if t is None else t.to(device))
        for extra, message in cases:
            with pytest.raises(RuntimeError, match=message):
                OP(to(x), to(layer.weight), to(layer.weight_scale), to(layer.lora_B), None, None,
                   1.0, None, *(to(t) if isinstance(t, torch.Tensor) else t for t in extra))
    with pytest.raises(RuntimeError, match="input_fp8 is on meta but the input is on cpu"):
        OP(x, layer.weight, layer.weight_scale, layer.lora_B, None, None, 1.0, None, None,
           False, q.to("meta"), s)


# ---- the shared cache in a melded model ------------------------------------------------------

def melded_llama(**config):
    model = tiny_causal_lm("llama")
    falqon.meld(model, FalqonConfig(rank=4, **config), progress=False, verbose=False)
    with torch.no_grad():
        for _, layer in falqon.melded_layers(model):
            layer.lora_B.normal_(std=0.1)
    return model


def step(model, ids, autocast=False):
    """Logits, loss and every lora_B gradient of one forward and backward, and the calls."""
    model.zero_grad(set_to_none=True)
    calls = Calls()
    with calls, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = [layer.lora_B.grad.clone() for _, layer in falqon.melded_layers(model)]
    return out.logits.detach(), out.loss.detach(), grads, calls


def assert_same(a, b):
    for x, y in zip(a[:2] + tuple(a[2]), b[:2] + tuple(b[2])):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_llama_quantises_qkv_and_gate_up_input_once_with_identical_results(monkeypatch,
                                                                           checkpointing):
    model = melded_llama()
    if checkpointing:  # the backward recomputes every decoder layer's forward
        model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 256, (2, 12))
    shared = step(model, ids)
    layers = model.config.num_hidden_layers
    runs = 2 if checkpointing else 1
    # Per decoder layer 7 projections, 4 distinct inputs: q/k/v's, o's, gate/up's, down's.
    assert len(shared[3].melded) == 7 * layers * runs
    assert shared[3].quantize == 4 * layers * runs
    assert all(q is not None for q in shared[3].melded)
    first = [id(q) for q in shared[3].melded[:7]]  # q, k, v, o, gate, up, down of layer 0
    assert first[0] == first[1] == first[2] and first[4] == first[5]
    assert len({first[0], first[3], first[4], first[6]}) == 4
    switch(monkeypatch, "0")
    alone = step(model, ids)
    # Unshared, each projection quantises its own input (per row: the adapter mode on the CPU).
    assert alone[3].quantize == 7 * layers * runs and all(q is not None for q in alone[3].melded)
    assert_same(shared, alone)


def test_autocast_keys_the_cache_on_the_original_input(monkeypatch):
    model = melded_llama()  # fp32 weights and activations; autocast runs the layers in bf16
    ids = torch.randint(0, 256, (2, 12))
    shared = step(model, ids, autocast=True)
    assert shared[3].quantize == 4 * model.config.num_hidden_layers
    switch(monkeypatch, "0")
    alone = step(model, ids, autocast=True)
    assert alone[3].quantize == 7 * model.config.num_hidden_layers  # each projection its own
    assert_same(shared, alone)


class TwoHeads(nn.Module):
    """Two linear layers that read the same input (as q/k/v do)."""

    def __init__(self, in_features: int = 48, a: int = 32, b: int = 64):
        super().__init__()
        self.a, self.b = nn.Linear(in_features, a), nn.Linear(in_features, b)

    def forward(self, x):
        return self.a(x), self.b(x)


def two_heads():
    return falqon.meld(TwoHeads(), FalqonConfig(rank=4), progress=False, verbose=False)


def test_an_input_changed_in_place_is_quantised_again():
    model = two_heads()
    x = torch.randn(5, 48)
    with Calls() as calls:
        model.a(x)
        model.b(x)
    assert calls.quantize == 1
    with Calls() as calls:
        model.a(x)  # x unchanged: still the entry b stored
        assert calls.quantize == 0
        x.add_(1.0)
        y, x1 = model.b(x), x.clone()
        assert calls.quantize == 1
        x[0, 0] = 9.0  # through a view: the same version counter
        z, x2 = model.b(x), x.clone()
    assert calls.quantize == 2
    # What b gives for a tensor it never saw (quantised afresh) is what it gave after each change.
    assert torch.equal(y, model.b(x1)) and torch.equal(z, model.b(x2))
    assert not torch.equal(y, z)


def test_the_cache_does_not_keep_the_input_alive_and_holds_one_entry():
    model = two_heads()
    cache = model.a._shared_quant
    assert isinstance(cache, shared_quant.InputQuantCache) and model.b._shared_quant is cache
    x = torch.randn(5, 48)
    model.a(x)
    gone = weakref.ref(x)
    del x
    assert gone() is None
    x2 = torch.randn(5, 48)
    with Calls() as calls:
        model.b(x2)  # another tensor (even if Python reused the old one's address)
    assert calls.quantize == 1
    assert cache._entry[0]() is x2


def test_the_cache_is_skipped_where_it_cannot_hold(monkeypatch):
    model = two_heads()
    x = torch.randn(5, 48)

    def quantize_calls():
        with Calls() as calls:
            model.a(x)
            model.b(x)
        model.a._shared_quant.clear()
        return calls.quantize

    # Shared: one quantisation for both layers; skipped: each layer its own (the adapter mode
    # quantises x per row in the layer, so each call shows).
    assert quantize_calls() == 1
    with torch.inference_mode():  # inference tensors have no version counter
        x = torch.randn(5, 48)
        assert quantize_calls() == 2
    x = torch.randn(5, 48)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        # not the cache: each layer emits its own quantize, which the compiled graph's common-
        # subexpression elimination merges (test_compiled_graph_quantizes_a_shared_input_once)
        assert quantize_calls() == 2 and model.a._shared_quant._entry is None
    assert quantize_calls() == 1
    switch(monkeypatch, "off")
    assert quantize_calls() == 2
    switch(monkeypatch, "maybe")
    with pytest.raises(FalqonError, match="FALQON_SHARED_QUANT must be 1 or 0, got 'maybe'"):
        model.a(x)


def test_delayed_scaling_layers_quantise_x_themselves():
    model = melded_llama(amax_history_len=4)
    ids = torch.randint(0, 256, (1, 8))
    with Calls() as calls:
        model(input_ids=ids)
    assert calls.quantize == 0 and all(q is None for q in calls.melded)
    assert falqon.melded_layers(model)[0][1]._shared_quant is not None


def test_every_way_of_melding_shares_one_cache_per_model(tmp_path):
    def caches(model):
        return {id(layer._shared_quant) for _, layer in falqon.melded_layers(model)}

    model = melded_llama()
    assert len(caches(model)) == 1 and None not in {
        layer._shared_quant for _, layer in falqon.melded_layers(model)}
    built = falqon.meld_from_config(tiny_config("llama"), FalqonConfig(rank=4), device="cpu",
                                    progress=False, verbose=False)
    assert len(caches(built)) == 1 and caches(built) != caches(model)
    copied = copy.deepcopy(model)
    assert len(caches(copied)) == 1 and caches(copied) != caches(model)
    layer = melded_layer()  # (a melded model holds hooks that pickle refuses)
    cache = shared_quant.share_input_quantization(layer)
    layer(torch.randn(2, 48))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    assert isinstance(unpickled._shared_quant, shared_quant.InputQuantCache)
    assert unpickled._shared_quant is not cache and unpickled._shared_quant._entry is None
    model.save_pretrained(tmp_path / "ckpt")
    loaded = falqon.from_pretrained(tiny_causal_lm("llama"), tmp_path / "ckpt")
    assert len(caches(loaded)) == 1
    assert "_shared_quant" not in str(model.state_dict().keys())


def test_sharing_is_off_unless_the_switch_is_on(monkeypatch):
    monkeypatch.delenv(shared_quant.ENV)
    shared_quant.enabled.cache_clear()
    model = melded_llama()
    ids = torch.randint(0, 256, (2, 12))
    alone = step(model, ids)
    assert alone[3].quantize == 7 * model.config.num_hidden_layers  # each projection its own
    switch(monkeypatch, "1")
    shared = step(model, ids)
    assert shared[3].quantize == 4 * model.config.num_hidden_layers
    assert_same(shared, alone)


@pytest.mark.slow
def test_compiled_graph_quantizes_a_shared_input_once():
    """Under torch.compile a melded decoder layer's forward graph holds one falqon.quantize per
    distinct input (q/k/v share one, gate/up one, o and down one each: 4 for 7 GEMMs) after
    AOTAutograd's common-subexpression elimination, with the loss and gradients of eager."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from workflow_testing import tiny_causal_lm

    seen = []

    def forward_compiler(gm, example_inputs):
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        seen.append((sum("falqon.quantize" in t for t in targets),
                     sum("falqon.melded_linear." in t for t in targets)))
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=forward_compiler,
                           bw_compiler=lambda gm, example_inputs: make_boxed_func(gm),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    models = [falqon.meld(tiny_causal_lm("llama"), falqon.FalqonConfig(rank=4), progress=False,
                          verbose=False) for _ in range(2)]
    for layer in models[1].model.layers:
        layer.compile(backend=backend)
    ids = torch.randint(0, models[0].config.vocab_size, (2, 8),
                        generator=torch.Generator().manual_seed(0))
    losses = []
    for m in models:
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    assert seen and all(counts == (4, 7) for counts in seen), seen
    assert torch.equal(losses[0], losses[1])
    for (_, a), (_, b) in zip(falqon.melded_layers(models[0]), falqon.melded_layers(models[1])):
        assert torch.equal(a.lora_B.grad, b.lora_B.grad)
