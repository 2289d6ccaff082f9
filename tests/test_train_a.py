"""The adapter mode with A trained too (FalqonConfig(train_a=True), falqon/trained_a.py) on the CPU
reference: dA against a float64 formula, the rest of the gradients untouched, A's FP8 rows kept
as lora_A's image (the optimizer hook and the eager forward), a task only a trained A can fit,
save / load (resume: tests/test_workflow_checkpoint.py), the PEFT export, the config, the CLI's checks and
torch.compile.

Tolerances: dA is two fp32 GEMMs on the CPU (g B, then (g B)^T x); against float64 they err by
the fp32 accumulation over M and N terms, ~1e-6 relative here; 1e-5 is asserted. The PEFT export
is compared as tests/test_adapter_deploy.py compares it (its header gives the bound).
"""

import copy

import pytest
import torch
from torch import nn

import falqon
from falqon import FalqonConfig, MeldedLinear
from falqon.config import ADAPTER_GAIN, TRAINED_A_DIVISOR, TRAINED_A_GAIN
from falqon.trained_a import a_image_rows, max_a_range
from falqon_testing import rel_err
from test_workflow_checkpoint import train_steps
from workflow_testing import tiny_causal_lm


def layer(k=64, n=48, rank=8, seed=0, **kw):
    torch.manual_seed(seed)
    m = MeldedLinear.from_linear(nn.Linear(k, n), rank=rank, train_a=True, **kw)
    with torch.no_grad():
        m.lora_B.normal_(std=0.1)
    return m


def a_rows(m):
    return m.weight[m.out_features:m.out_features + m.rank]


# ---- gradients ----------------------------------------------------------------------------------

def test_dA_is_the_lora_formula_and_the_other_gradients_are_the_frozen_modes():
    m = layer()
    frozen = copy.deepcopy(m)
    frozen.lora_A.requires_grad_(False)  # the same layer without TrainedAGrad
    x = torch.randn(3, 5, 64)
    g = torch.randn(3, 5, 48)
    outs = []
    for mod in (m, frozen):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        (y * g).sum().backward()
        outs.append((y.detach(), xi.grad, mod.lora_B.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    g64, x64 = g.reshape(-1, 48).double(), x.reshape(-1, 64).double()
    ref = m.scaling / TRAINED_A_DIVISOR * (g64 @ m.lora_B.double()).t() @ x64
    assert m.lora_A.grad.dtype == torch.float32
    assert rel_err(m.lora_A.grad.double(), ref) < 1e-5
    assert m.lora_A.grad.abs().sum() > 0


def test_no_dA_without_grad_or_when_frozen():
    m = layer()
    with torch.no_grad():
        y = m(torch.randn(4, 64))
    assert y.grad_fn is None
    m.lora_A.requires_grad_(False)
    x = torch.randn(4, 64, requires_grad=True)
    m(x).sum().backward()
    assert m.lora_A.grad is None and x.grad is not None


# ---- A's FP8 rows follow lora_A -----------------------------------------------------------------

def test_meld_starts_lora_A_at_the_melded_rows_times_the_divisor():
    m = layer()
    assert torch.equal(m.lora_A, m.adapter_A(torch.float32) * TRAINED_A_DIVISOR)
    rows, ratio = a_image_rows(m.lora_A, m.weight_scale)
    assert torch.equal(rows.view(torch.uint8), a_rows(m).view(torch.uint8))
    assert float(ratio) <= 1.0


def test_attach_rewrites_the_rows_after_each_step_and_the_forward_uses_them():
    m = layer(transposed_copy=True)
    opt = torch.optim.AdamW([m.lora_A, m.lora_B], lr=0.05)
    falqon.attach(opt, m)
    before = a_rows(m).view(torch.uint8).clone()
    x = torch.randn(16, 64)
    for _ in range(3):
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        rows, _ = a_image_rows(m.lora_A, m.weight_scale)
        assert torch.equal(a_rows(m).view(torch.uint8), rows.view(torch.uint8))
        assert torch.equal(m.weight_t.view(torch.uint8), m.weight.t().contiguous().view(torch.uint8))
    assert not torch.equal(a_rows(m).view(torch.uint8), before)  # A did move
    assert 0 < float(m.a_range)
    # the forward is the frozen-A layer's with these rows: y = x W^T + b + scaling (x A^T) B^T
    frozen = MeldedLinear(64, 48, rank=8, bias=True, adapter_gain=m.adapter_gain)
    frozen.load_state_dict({k: v for k, v in m.state_dict().items() if k != "lora_A"},
                           strict=False)
    with torch.no_grad():
        assert torch.equal(m(x), frozen(x))


def test_an_eager_forward_syncs_rows_that_no_hook_rewrote():
    m = layer()
    with torch.no_grad():
        m.lora_A.mul_(1.5)  # as an optimizer without falqon.attach would change it
    stale = a_rows(m).view(torch.uint8).clone()
    m(torch.randn(2, 64))
    rows, _ = a_image_rows(m.lora_A, m.weight_scale)
    assert torch.equal(a_rows(m).view(torch.uint8), rows.view(torch.uint8))
    assert not torch.equal(stale, rows.view(torch.uint8))


def test_rows_saturate_and_a_range_says_so():
    m = layer()
    with torch.no_grad():
        m.lora_A.mul_(1e4)  # far past what W's scale can hold in E4M3
    m.sync_adapter_A()
    assert float(m.a_range) > 1.0
    assert float(a_rows(m).float().abs().max()) == torch.finfo(torch.float8_e4m3fn).max
    model = nn.Sequential(m)
    assert max_a_range(model) == float(m.a_range)


def test_grouped_rewrite_equals_the_per_layer_one():
    """sync_many (falqon.attach's grouped rewrite) gives every layer the bytes, transposed-copy
    columns and a_range that sync_rows gives it alone, saturating layers included."""
    from falqon.trained_a import sync_many, sync_rows

    layers = [layer(64, 48, 8, seed=1), layer(48, 64, 4, seed=2, transposed_copy=True),
              layer(64, 32, 16, seed=3, amax_history_len=4)]
    with torch.no_grad():
        for m in layers:
            m.lora_A.add_(torch.randn_like(m.lora_A) * 0.1)
        layers[2].lora_A.mul_(1e4)  # saturates
    twins = copy.deepcopy(layers)
    sync_many(layers)
    for m in twins:
        sync_rows(m)
    for a, b in zip(layers, twins):
        assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
        assert torch.equal(a.a_range, b.a_range)
        if a.weight_t is not None:
            assert torch.equal(a.weight_t.view(torch.uint8), b.weight_t.view(torch.uint8))
            assert torch.equal(a.weight_t.view(torch.uint8),
                               a.weight.t().contiguous().view(torch.uint8))
    assert float(layers[2].a_range) > 100  # (the saturating layer did saturate)


def test_a_trained_A_fits_a_map_outside_the_frozen_A_subspace():
    """The target adds x V^T U^T with V orthogonal to the melded A's rows: B alone (A frozen)
    cannot produce it, a trained A can. The trained run must end well below the frozen one."""
    torch.manual_seed(1)
    base = nn.Linear(64, 32, bias=False)
    x = torch.randn(256, 64)
    losses = {}
    for train_a in (False, True):
        m = MeldedLinear.from_linear(copy.deepcopy(base), rank=4, train_a=train_a)
        A = m.adapter_A().double()
        q, _ = torch.linalg.qr(A.t())  # the frozen A's row space
        v = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        v = (v - (v @ q) @ q.t()).float()  # orthogonal to it
        u = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            target = m(x) + 0.5 * (x @ v.t()) @ u.t()
        opt = torch.optim.Adam([p for p in (m.lora_A, m.lora_B) if p is not None], lr=1e-2)
        falqon.attach(opt, nn.Sequential(m))
        for _ in range(150):
            loss = (m(x) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[train_a] = loss.item()
    assert losses[True] < 0.3 * losses[False], losses


# ---- checkpoints and exports --------------------------------------------------------------------

def melded_tiny(**cfg):
    model = tiny_causal_lm("llama")
    falqon.meld(model, FalqonConfig(**{"rank": 4, "train_a": True, **cfg}), progress=False,
                verbose=False)
    return model


def make_opt(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)


def test_save_and_load_keep_lora_A_and_its_rows(tmp_path):
    model = melded_tiny()
    opt = make_opt(model)
    falqon.attach(opt, model)
    train_steps(model, opt, 2, seed=4)
    falqon.save_pretrained(model, tmp_path / "ckpt")
    loaded = falqon.from_pretrained(tiny_causal_lm("llama"), tmp_path / "ckpt")
    for (name, a), (_, b) in zip(falqon.melded_layers(model), falqon.melded_layers(loaded)):
        assert torch.equal(a.lora_A, b.lora_A) and b.lora_A.requires_grad, name
        assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8)), name
    x = torch.randint(0, 272, (2, 10))
    assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    with pytest.raises(falqon.FalqonError, match="train_a"):  # a frozen-A model refuses it
        frozen = tiny_causal_lm("llama")
        falqon.meld(frozen, FalqonConfig(rank=4), progress=False, verbose=False)
        falqon.from_pretrained(frozen, tmp_path / "ckpt")


def test_peft_export_holds_the_trained_A_and_matches_the_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("compressed_tensors")
    model = melded_tiny(alpha=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    falqon.attach(opt, model)
    train_steps(model, opt, 3, seed=2)
    model.eval()
    falqon.export(model, tmp_path / "lora")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "lora"))
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora" / "adapter")).eval()
    wrapped = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in falqon.melded_layers(model):
        peft_A = wrapped[name].lora_A["default"].weight
        assert torch.equal(peft_A, layer.adapter_A())  # the trained A's FP8 image
        rows, _ = a_image_rows(layer.lora_A, layer.weight_scale)
        assert torch.equal(rows.float() * layer.weight_scale, peft_A)
    x = torch.randint(0, 272, (2, 14))
    with torch.no_grad():
        ours, theirs = model(input_ids=x).logits.float(), loaded(input_ids=x).logits.float()
        without = copy.deepcopy(model)
        for _, layer in falqon.melded_layers(without):
            layer.lora_B.zero_()
        effect = rel_err(without(input_ids=x).logits.float(), ours)
    assert rel_err(theirs, ours) < 0.1 < effect / 3


# ---- configuration, CLI, compile ----------------------------------------------------------------

def test_config_resolves_the_gain_and_refuses_the_proxy_mode():
    assert FalqonConfig(train_a=True).adapter_gain == TRAINED_A_GAIN
    assert FalqonConfig().adapter_gain == ADAPTER_GAIN
    assert FalqonConfig(train_a=True, adapter_gain=3.0).adapter_gain == 3.0
    cfg = FalqonConfig(train_a=True)
    assert FalqonConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="train_a needs update_mode='adapter'"):
        FalqonConfig(train_a=True, update_mode="proxy")
    with pytest.raises(ValueError, match="train_a must be True or False"):
        FalqonConfig(train_a="yes")
    with pytest.raises(ValueError, match="train_a"):
        MeldedLinear(64, 48, rank=8, update_mode="proxy", train_a=True)
    assert MeldedLinear(64, 48, rank=8, train_a=True).scaling == TRAINED_A_GAIN


def test_cli_refuses_train_a_in_the_proxy_mode_and_resolves_the_gain():
    from types import SimpleNamespace

    from falqon.cli.run_options import check_update_mode
    from falqon.config import FalqonError

    args = SimpleNamespace(update_mode="proxy", train_a=True, adapter_gain=None,
                           adapter_init="error_svd")
    with pytest.raises(FalqonError, match="--train-a only applies to the adapter mode"):
        check_update_mode(args, {"train_a"})
    for train_a, gain in ((True, TRAINED_A_GAIN), (False, ADAPTER_GAIN)):
        args = SimpleNamespace(update_mode="adapter", train_a=train_a, adapter_gain=None,
                               adapter_init="error_svd")
        check_update_mode(args, set())
        assert args.adapter_gain == gain


def test_torch_compile_fullgraph_matches_eager():
    eager = layer()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    x = torch.randn(2, 7, 64)
    out = []
    for mod, fn in ((eager, eager), (compiled_layer, compiled)):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.square().mean().backward()
        out.append((y.detach(), xi.grad, mod.lora_B.grad, mod.lora_A.grad))
    for e, c in zip(*out):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
