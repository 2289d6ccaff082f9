"""MeldedLinear: construction, errors, dtype moves, state dicts, training with the proxy update,
and torch.compile (the adapter mode's own tests: test_adapter_cpu.py)."""

import copy

import pytest
import torch
from torch import nn

import falqon
from falqon import ops, shared_quant
from falqon_testing import fp8_bytes, rel_err


def make(k=64, n=48, rank=8, bias=True, **kw):
    lin = nn.Linear(k, n, bias=bias)
    return lin, falqon.MeldedLinear.from_linear(lin, rank=rank, **kw)


def test_from_linear_layout_and_trainable_parameters():
    lin, layer = make(rank=8)
    assert layer.weight.shape == (48 + 16, 64) and layer.weight.dtype == ops.E4M3
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_B"]
    assert layer.lora_B.shape == (48, 8) and not layer.lora_B.any()
    # The layer's weight is W to FP8 precision (half an E4M3 step: 2^-4 relative, or half the
    # smallest subnormal step of the scale).
    w = lin.weight.detach().double()
    err = (layer.dequantized_weight().double() - w).abs()
    assert bool((err <= 2**-4 * w.abs() + layer.weight_scale.double() * 2**-10).all())
    assert layer.adapter_A().shape == (8, 64)


@pytest.mark.parametrize("shape", [(64,), (5, 64), (2, 3, 64), (2, 1, 3, 64)])
def test_any_leading_batch_dims(shape):
    lin, layer = make()
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 48)
    assert rel_err(y, lin(x).detach()) < 0.06


@pytest.mark.parametrize("k,n,rank,match", [
    (30, 32, 4, "multiples of 16"),
    (32, 40, 4, "multiples of 16"),
    (32, 16, 17, "rank must be between 1 and"),
    (32, 16, 0, "rank must be >= 1"),
])
def test_from_linear_rejects_layers_fp8_gemms_cannot_take(k, n, rank, match):
    with pytest.raises(ValueError, match=match):
        falqon.MeldedLinear.from_linear(nn.Linear(k, n), rank=rank)
    assert falqon.check_meldable(k, n, rank) is not None


def test_clear_errors_for_bad_inputs():
    _, layer = make()
    with pytest.raises(ValueError, match="got an input with 32 features"):
        layer(torch.randn(3, 32))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer(torch.randn(3, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="takes an nn.Linear"):
        falqon.MeldedLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="weight must be float32"):
        falqon.MeldedLinear.from_linear(nn.Linear(32, 32).double())
    with pytest.raises(ValueError, match="meta device"):
        falqon.MeldedLinear.from_linear(nn.Linear(32, 32, device="meta"))
    with pytest.raises(ValueError, match="topk must be >= 0"):
        falqon.MeldedLinear(32, 32, rank=4, topk=-1)


def test_dtype_moves_keep_fp8_weight_and_fp32_scale():
    _, layer = make()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = layer(x)
    scale = layer.weight_scale.clone()
    weight = layer.weight.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == ops.E4M3 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_scale, scale), "the scale did not round through bf16"
    assert torch.equal(fp8_bytes(layer.weight), fp8_bytes(weight))
    assert layer.bias.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), y, rtol=2**-7, atol=1e-3)
    layer.half()
    assert layer.weight.dtype == ops.E4M3 and torch.equal(layer.weight_scale, scale)


@pytest.mark.parametrize("mode", ["adapter", "proxy"])
def test_state_dict_round_trip(mode):
    _, layer = make(rank=16, transposed_copy=True, update_mode=mode)
    with torch.no_grad():
        layer.lora_B.normal_()
    if mode == "proxy":
        layer.proxy_update(k=5)
    fresh = falqon.MeldedLinear(64, 48, rank=16, bias=True, transposed_copy=True, update_mode=mode)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(7, 64)
    assert torch.equal(fresh(x), layer(x))
    # The transposed copy: of the weight rows (proxy), of every row of W' (adapter).
    rows = 48 if mode == "proxy" else layer.weight.shape[0]
    assert torch.equal(fp8_bytes(fresh.weight_t), fp8_bytes(layer.weight[:rows].t().contiguous()))


def test_training_with_the_proxy_update_fits_a_target():
    # A melded layer can learn a low-rank change of its weight through B and the row updates:
    # regress onto W + delta with delta in A's row space, so a rank-r adapter can represent it.
    torch.manual_seed(0)
    lin, layer = make(k=64, n=64, rank=16, bias=False, topk=8, alpha=16, update_mode="proxy")
    with torch.no_grad():
        delta = 0.2 * torch.randn(64, 16) @ layer.adapter_A()
        target = nn.Linear(64, 64, bias=False)
        target.weight.copy_(lin.weight + delta)
    opt = torch.optim.Adam([layer.lora_B], lr=0.05)
    x_val = torch.randn(256, 64)
    start = (layer(x_val) - target(x_val)).pow(2).mean().item()
    w0 = layer.weight.clone()
    for _ in range(60):
        x = torch.randn(128, 64)
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.proxy_update()
        assert not layer.lora_B.any(), "drop policy: B is zero after every update"
    end = (layer(x_val) - target(x_val)).pow(2).mean().item()
    assert end < 0.5 * start, (start, end)
    assert torch.equal(fp8_bytes(layer.weight[64:]), fp8_bytes(w0[64:])), "A and padding never move"
    assert (fp8_bytes(layer.weight[:64]) != fp8_bytes(w0[:64])).any()


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = falqon.MeldedLinear.from_linear(nn.Linear(64, 128), rank=8)
            self.down = falqon.MeldedLinear.from_linear(nn.Linear(128, 64, bias=False), rank=16)

        def forward(self, x):
            return x + self.down(nn.functional.silu(self.up(x)))

    block = Block()
    x = torch.randn(2, 9, 64, requires_grad=True)

    def run(model):
        for p in (block.up.lora_B, block.down.lora_B):
            p.grad = None
        x.grad = None
        y = model(x)
        y.square().mean().backward()
        return y.detach(), x.grad.clone(), block.up.lora_B.grad.clone(), block.down.lora_B.grad.clone()

    eager = run(block)
    compiled = run(torch.compile(block, fullgraph=True))
    for e, c in zip(eager, compiled):
        # Same ops, same inputs; inductor may fuse the elementwise parts differently (fp32).
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


# ---- delayed scaling (amax_history_len > 0) ------------------------------------------------------

def test_delayed_scaling_records_x_and_g_amaxes():
    _, layer = make(k=64, n=48, rank=8, amax_history_len=3, update_mode="proxy")
    assert layer.amax_history.shape == (2, 3) and layer.amax_history.dtype == torch.float32
    assert not layer.amax_history.any() and layer.amax_history_len == 3
    assert "amax_history" in layer.state_dict()
    xs = [torch.randn(4, 64) * (i + 1) for i in range(4)]
    gs = [torch.randn(4, 48) * (i + 2) for i in range(4)]
    for i, (x, g) in enumerate(zip(xs, gs)):
        x = x.requires_grad_()
        layer(x).backward(g)
        # Newest first; the oldest value drops out after H = 3 calls.
        want_x = [t.abs().max().item() for t in xs[:i + 1][::-1]][:3]
        want_g = [t.abs().max().item() for t in gs[:i + 1][::-1]][:3]
        assert layer.amax_history[0, :len(want_x)].tolist() == want_x
        assert layer.amax_history[1, :len(want_g)].tolist() == want_g
    # Evaluation reads the history but records nothing; neither does the proxy update.
    before = layer.amax_history.clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(4, 64) * 100)
    layer.train()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.proxy_update()
    assert torch.equal(layer.amax_history, before)


def test_delayed_scaling_uses_the_recorded_amax():
    # The first call (empty history) is current per-tensor scaling; the next ones use the
    # history's max. (Proxy mode: the adapter mode's current scaling quantises x per row.)
    lin, layer = make(k=64, n=48, rank=8, bias=False, amax_history_len=4, update_mode="proxy")
    _, current = make(k=64, n=48, rank=8, bias=False, update_mode="proxy")
    current.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "amax_history"})
    x1 = torch.randn(5, 64) * 10
    assert torch.equal(layer(x1), current(x1))
    x2 = torch.randn(5, 64)            # far below x1: quantised at x1's scale, coarser
    y2 = layer(x2)
    ref = ops.melded_linear(x2, layer.weight, layer.weight_scale, layer.lora_B, None, None, 1.0,
                            None, torch.stack([torch.stack([x1.abs().max(), *[torch.zeros(())] * 3]),
                                               torch.zeros(4)]))
    assert torch.equal(y2, ref) and not torch.equal(y2, current(x2))
    assert rel_err(y2, lin(x2).detach()) < 0.2, "coarser, still the layer's output"


def test_delayed_scaling_options_and_dtype_moves():
    with pytest.raises(ValueError, match="amax_history_len must be >= 0"):
        falqon.MeldedLinear(32, 32, rank=4, amax_history_len=-1)
    _, layer = make(amax_history_len=2)
    layer(torch.randn(3, 64))
    hist = layer.amax_history.clone()
    layer.to(torch.bfloat16)
    assert layer.amax_history.dtype == torch.float32 and torch.equal(layer.amax_history, hist)
    assert "amax_history_len=2" in repr(layer)
    fresh = falqon.MeldedLinear(64, 48, rank=8, bias=True, amax_history_len=2)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.amax_history, hist)
    _, plain = make()
    assert plain.amax_history is None and "amax_history" not in plain.state_dict()


def test_delayed_scaling_torch_compile_fullgraph_matches_eager():
    # The backward records g's amax with an in-place copy into the history (a module buffer that
    # the forward also updates): AOTAutograd must carry both mutations. Several steps, so that
    # the later ones run on the delayed scales.
    def build():
        torch.manual_seed(0)

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.up = falqon.MeldedLinear.from_linear(nn.Linear(64, 128), rank=8,
                                                          amax_history_len=3)
                self.down = falqon.MeldedLinear.from_linear(nn.Linear(128, 64, bias=False),
                                                            rank=16, amax_history_len=2)

            def forward(self, x):
                return x + self.down(nn.functional.silu(self.up(x)))

        return Block()

    xs = [torch.randn(2, 9, 64) * s for s in (1.0, 3.0, 0.5, 2.0)]

    def run(block, model):
        out = []
        for x in xs:
            x = x.clone().requires_grad_()
            for p in (block.up.lora_B, block.down.lora_B):
                p.grad = None
            y = model(x)
            y.square().mean().backward()
            out.append((y.detach(), x.grad.clone(), block.up.lora_B.grad.clone(),
                        block.down.lora_B.grad.clone(), block.up.amax_history.clone(),
                        block.down.amax_history.clone()))
        return out

    eager_block, compiled_block = build(), build()
    eager = run(eager_block, eager_block)
    compiled = run(compiled_block, torch.compile(compiled_block, fullgraph=True))
    assert eager[-1][4].all() and eager[-1][5].all(), "every history slot filled"
    for e_step, c_step in zip(eager, compiled):
        for e, c in zip(e_step[:4], c_step[:4]):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
        # The amaxes are exact maxima of identical tensors: equal bit for bit.
        assert torch.equal(c_step[4], e_step[4]) and torch.equal(c_step[5], e_step[5])


@pytest.mark.parametrize("update_mode", ["adapter", "proxy"])
@pytest.mark.parametrize("history", [0, 4])
def test_eager_autograd_boundary_matches_the_registered_formula(update_mode, history):
    # The module's eager calls go through ops._MeldedLinearFunction (the cheap autograd boundary,
    # not torch.library's per-call wrapper); what it computes must be what the op's registered
    # autograd computes, bit for bit: y, dx, dB and d(bias), and the amax history it records.
    torch.manual_seed(3)
    _, layer = make(k=64, n=48, rank=8, update_mode=update_mode, amax_history_len=history)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    layer.bias.requires_grad_(True)
    results = []
    twins = [copy.deepcopy(layer) for _ in range(2)]  # the same state before either call
    for via_op, twin in zip((False, True), twins):
        xi = x.clone().requires_grad_(True)
        if via_op:
            # x's quantisation as the module makes it: per row in the adapter mode with current
            # scaling (on the CPU), else the op's own
            rows = update_mode == "adapter" and not history
            given = shared_quant.quantize_input(xi, rows=True) if rows else ()
            y = torch.ops.falqon.melded_linear.default(
                xi, twin.weight, twin.weight_scale, twin.lora_B, twin.bias.to(xi.dtype),
                twin.weight_t, twin.scaling, twin.grad_dtype, twin.amax_history,
                update_mode == "adapter", *given)[0]
        else:
            y = twin(xi)
            assert "_MeldedLinearFunction" in type(y.grad_fn).__name__
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(5)))
        results.append((y, xi.grad, twin.lora_B.grad, twin.bias.grad))
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if history:  # the backward recorded g's amax into row 1 on both paths alike
        assert torch.equal(twins[0].amax_history[1], twins[1].amax_history[1])
    with torch.no_grad():  # no graph to build: the op itself
        assert layer(x).grad_fn is None


def test_adapter_mode_quantises_x_per_row_unless_switched_off(monkeypatch):
    # The adapter mode with current scaling: x per row where ops.row_scales_supported (the CPU),
    # per tensor (the op's own quantisation) with FALQON_ROW_SCALES=0.
    _, layer = make(k=64, n=48, rank=8, update_mode="adapter")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    x[0] *= 100  # an outlier row: per-tensor scaling rounds the other rows coarser
    args = (x, layer.weight, layer.weight_scale, layer.lora_B, layer.bias, None, layer.scaling,
            None, None, True)
    per_row = torch.ops.falqon.melded_linear(*args, *ops.quantize_rows(x))[0]
    per_tensor = torch.ops.falqon.melded_linear(*args)[0]
    assert not torch.equal(per_row, per_tensor)
    try:
        monkeypatch.delenv(ops.ROW_SCALES_ENV, raising=False)
        ops._row_scales.cache_clear()
        assert torch.equal(layer(x), per_row)
        monkeypatch.setenv(ops.ROW_SCALES_ENV, "0")
        ops._row_scales.cache_clear()
        assert torch.equal(layer(x), per_tensor)
    finally:
        ops._row_scales.cache_clear()
