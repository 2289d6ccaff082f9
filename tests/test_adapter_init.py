"""The adapter mode's choice of A (FalqonConfig.adapter_init, falqon/adapter_init.py): "error_svd"
is the meld_init op bit for bit; "random" and "weight_svd" keep W's FP8 rows and scale, get the
op's rescale to a LoRA A's row norm (capped at amax(W)) and its quantisation at W's scale; random
A is reproducible per seed and differs across layers; weight_svd spans W's top-r right singular
subspace; the choice travels through meld, meld_pretrained, meld_from_config, checkpoints and the
CLI, and the proxy mode refuses it."""

import json

import pytest
import torch
from torch import nn

import falqon
from falqon import FalqonConfig, MeldedLinear, ops
from falqon.adapter_init import adapter_factor, layer_seed, meld_weight, scale_adapter
from falqon.checkpoint import CONFIG_FILE
from falqon.modules import ADAPTER_ROW_NORM
from falqon_testing import fp8_bytes
from cpu_formulas import E4M3, random_weight

INITS = ("error_svd", "random", "weight_svd")
NEW_INITS = ("random", "weight_svd")


def linear(n=64, k=96, scale=1.0, weight=None):
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(random_weight(n, k) * scale if weight is None else weight)
    return lin


def rows_A(layer: MeldedLinear) -> torch.Tensor:
    return fp8_bytes(layer.weight[layer.out_features:layer.out_features + layer.rank])


def rms_row_norm(a: torch.Tensor) -> float:
    return a.square().sum(1).mean().sqrt().item()


# ---- the layer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_error_svd_is_the_meld_init_op_bit_for_bit(svd):
    lin = linear()
    op_w, op_s = ops.meld_init(lin.weight.detach(), 8, svd, 16, 4, 3, ADAPTER_ROW_NORM)
    for kwargs in ({}, {"adapter_init": "error_svd"}):  # the default is error_svd
        layer = MeldedLinear.from_linear(lin, rank=8, svd=svd, seed=3, **kwargs)
        assert torch.equal(fp8_bytes(layer.weight), fp8_bytes(op_w))
        assert torch.equal(layer.weight_scale, op_s)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("init", NEW_INITS)
def test_new_inits_keep_W_and_quantise_the_rescaled_A_at_Ws_scale(init, svd):
    """W' = quantize([W; scale_adapter(A); 0]) bit for bit: W's rows and the scale are the
    op's, and A's rows are the op's rounding of the rescaled A at that scale."""
    lin = linear()
    w = lin.weight.detach()
    layer = MeldedLinear.from_linear(lin, rank=8, svd=svd, seed=3, adapter_init=init)
    default = MeldedLinear.from_linear(lin, rank=8, svd=svd, seed=3)
    assert torch.equal(fp8_bytes(layer.weight[:64]), fp8_bytes(default.weight[:64]))
    assert torch.equal(layer.weight_scale, default.weight_scale)
    assert not torch.equal(rows_A(layer), rows_A(default))
    a = scale_adapter(adapter_factor(w, 8, init, svd, 16, 4, 3), w.abs().amax(), ADAPTER_ROW_NORM)
    stacked = torch.cat([w, a, torch.zeros(ops.padded_rank(8) - 8, 96)])
    q, s = ops.quantize(stacked, E4M3)
    assert torch.equal(fp8_bytes(layer.weight), fp8_bytes(q)) and torch.equal(layer.weight_scale, s)


@pytest.mark.parametrize("init", INITS)
def test_every_init_has_a_loras_row_norm_and_the_cap(init):
    big = MeldedLinear.from_linear(linear(scale=10), rank=8, svd="exact", adapter_init=init)
    assert rms_row_norm(big.adapter_A()) == pytest.approx(ADAPTER_ROW_NORM, rel=0.05)
    lin = linear(scale=0.1)  # a LoRA-sized A would exceed this weight's amax: the cap binds
    small = MeldedLinear.from_linear(lin, rank=8, svd="exact", adapter_init=init)
    amax_w, amax_a = lin.weight.abs().max().item(), small.adapter_A().abs().max().item()
    assert 0.9 * amax_w <= amax_a <= amax_w
    assert rms_row_norm(small.adapter_A()) < ADAPTER_ROW_NORM


def test_random_A_is_reproducible_per_seed_and_gaussian():
    lin = linear(scale=10)
    a, b, c = (MeldedLinear.from_linear(lin, rank=8, adapter_init="random", seed=s)
               for s in (5, 5, 6))
    assert torch.equal(rows_A(a), rows_A(b)) and not torch.equal(rows_A(a), rows_A(c))
    # The rows are the seed's normal draws times one factor (up to their FP8 rounding).
    draws = torch.randn(8, 96, generator=torch.Generator().manual_seed(5))
    cos = nn.functional.cosine_similarity(a.adapter_A(), draws, dim=1)
    assert bool((cos > 0.99).all())


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_weight_svd_spans_the_top_right_singular_subspace(svd):
    # A weight with a gap after its 8th singular value, as a trained weight's spectrum has one.
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(64, 64, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(96, 64, generator=gen))[0]
    s = torch.cat([torch.linspace(8, 4, 8), torch.linspace(1, 0.1, 56)])
    w = (u * s) @ v.t()
    vh = torch.linalg.svd(w.double(), full_matrices=False)[2][:8].float()

    def outside(a):  # the part of A's rows outside span(V_r), relative
        return ((a - a @ vh.t() @ vh).norm() / a.norm()).item()

    layer = MeldedLinear.from_linear(linear(weight=w), rank=8, svd=svd, adapter_init="weight_svd")
    a = layer.adapter_A()
    assert outside(a) < 0.05  # E4M3 rounding of A's rows (~3%)
    # Equal row norms (orthonormal V_r^T rescaled by one factor), each row a singular vector.
    norms = a.norm(dim=1)
    assert (norms.max() / norms.min()).item() < 1.05
    if svd == "exact":
        cos = nn.functional.cosine_similarity(a, vh, dim=1).abs()
        assert bool((cos > 0.99).all())
    # The test tells the subspaces apart: error_svd's A lies mostly outside span(V_r).
    other = MeldedLinear.from_linear(linear(weight=w), rank=8, svd=svd).adapter_A()
    assert outside(other) > 0.5


def test_adapter_init_errors():
    with pytest.raises(ValueError, match="adapter_init must be one of"):
        FalqonConfig(adapter_init="pissa")
    with pytest.raises(ValueError, match="adapter_init must be one of"):
        FalqonConfig(adapter_init=None)
    for init in NEW_INITS:
        with pytest.raises(ValueError, match="needs update_mode='adapter'"):
            FalqonConfig(update_mode="proxy", adapter_init=init)
        with pytest.raises(ValueError, match="needs update_mode='adapter'"):
            MeldedLinear.from_linear(linear(), rank=8, update_mode="proxy", adapter_init=init)
        with pytest.raises(ValueError, match="needs adapter_row_norm > 0"):
            meld_weight(linear().weight.detach(), 8, init)
    assert FalqonConfig(update_mode="proxy").adapter_init == "error_svd"
    with pytest.raises(ValueError, match="adapter_init must be one of"):
        MeldedLinear.from_linear(linear(), rank=8, adapter_init="gaussian")


# ---- models: meld, meld_pretrained, meld_from_config, checkpoints -------------------------------

transformers = pytest.importorskip("transformers")
from workflow_testing import tiny_causal_lm, tiny_config  # noqa: E402


def melded_A(model) -> dict:
    return {n: rows_A(m) for n, m in falqon.melded_layers(model)}


def test_meld_seeds_random_A_per_layer():
    cfg = FalqonConfig(rank=4, adapter_init="random", seed=7)
    model = falqon.meld(tiny_causal_lm("llama"), cfg, progress=False, verbose=False)
    again = falqon.meld(tiny_causal_lm("llama"), cfg, progress=False, verbose=False)
    other = falqon.meld(tiny_causal_lm("llama"),
                        FalqonConfig(rank=4, adapter_init="random", seed=8), progress=False,
                        verbose=False)
    a, b, c = melded_A(model), melded_A(again), melded_A(other)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)
    q0, q1 = a["model.layers.0.self_attn.q_proj"], a["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0, q1)  # same shape, another layer: another draw
    name = "model.layers.1.mlp.up_proj"
    lin = tiny_causal_lm("llama").get_submodule(name)
    alone = MeldedLinear.from_linear(lin, rank=4, adapter_init="random", seed=layer_seed(7, name))
    assert torch.equal(rows_A(alone), a[name])


@pytest.mark.parametrize("init", NEW_INITS)
def test_meld_pretrained_and_meld_from_config_take_the_init(tmp_path, init):
    pytest.importorskip("accelerate")
    from falqon.loading import meld_from_config, meld_pretrained

    cfg = FalqonConfig(rank=4, adapter_init=init, seed=2)
    tiny_causal_lm("llama").save_pretrained(tmp_path / "m")
    ours = meld_pretrained(tmp_path / "m", cfg, device="cpu", dtype=torch.float32,
                           progress=False, verbose=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"),
                                                              dtype=torch.float32)
    ref = falqon.meld(model, cfg, progress=False, verbose=False)
    mine, theirs = melded_A(ours), melded_A(ref)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
    built = [meld_from_config(tiny_config("llama"), c, device="cpu", dtype=torch.float32,
                              progress=False, verbose=False) for c in (FalqonConfig(rank=4), cfg)]
    (_, old), (_, new) = (falqon.melded_layers(m)[0] for m in built)
    assert torch.equal(fp8_bytes(old.weight[:old.out_features]),
                       fp8_bytes(new.weight[:new.out_features]))  # the same random W
    assert not torch.equal(rows_A(old), rows_A(new))


def test_config_round_trip_and_old_configs_are_error_svd():
    cfg = FalqonConfig(rank=4, adapter_init="weight_svd")
    assert FalqonConfig.from_json(cfg.to_json()) == cfg
    old = cfg.to_dict()
    del old["adapter_init"]
    assert FalqonConfig.from_dict(old).adapter_init == "error_svd"


@pytest.mark.parametrize("init", INITS)
def test_checkpoint_round_trip_keeps_A_and_the_init(tmp_path, init):
    """An adapter-sized checkpoint stores A's FP8 rows (whatever A came from) and re-derives W
    from the base: the loaded model is the saved one, bit for bit."""
    from test_workflow_checkpoint import fp8_bytes as model_bytes
    from test_workflow_checkpoint import trained_model

    model = trained_model(adapter_init=init)
    falqon.save_pretrained(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert meta["weights"] == "adapter" and meta["config"]["adapter_init"] == init
    loaded = falqon.from_pretrained(tiny_causal_lm("llama"), tmp_path / "ckpt")
    assert loaded.falqon_config == model.falqon_config
    ours, theirs = model_bytes(model), model_bytes(loaded)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    x = torch.randint(0, 272, (2, 10))
    assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    if init == "error_svd":  # a checkpoint from before adapter_init loads as error_svd
        del meta["config"]["adapter_init"]
        (tmp_path / "ckpt" / CONFIG_FILE).write_text(json.dumps(meta))
        old = falqon.from_pretrained(tiny_causal_lm("llama"), tmp_path / "ckpt")
        assert old.falqon_config.adapter_init == "error_svd"
        assert torch.equal(model(input_ids=x).logits, old(input_ids=x).logits)
