"""save_pretrained / from_pretrained and the training checkpoint: round trips bit for bit,
bit-exact resume (adapter and proxy mode), adapter-sized checkpoints in the adapter mode, version-1
checkpoints, and clear errors for damaged checkpoints or the wrong base model."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import falqon
from falqon import FalqonConfig, FalqonError, MeldedLinear
from falqon.checkpoint import (CONFIG_FILE, MODEL_FILE, load_training_checkpoint,
                               save_training_checkpoint)
from falqon.training import proxy_state
from workflow_testing import snapshot, tiny_causal_lm


def fp8_bytes(model):
    return {n: m.weight.view(torch.uint8).clone() for n, m in model.named_modules()
            if isinstance(m, MeldedLinear)}


def train_steps(model, opt, steps, seed=None, gen=None):
    """`steps` optimizer steps on random tokens drawn from `gen` (or a generator seeded with
    `seed`); returns the losses."""
    gen = torch.Generator().manual_seed(seed) if gen is None else gen
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 272, (2, 12), generator=gen)
        loss = model(input_ids=x).logits.float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def trained_model(steps=2, **cfg):
    model = tiny_causal_lm("llama")
    falqon.meld(model, FalqonConfig(**{"rank": 4, "topk": 3, **cfg}), progress=False,
                verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    handle = falqon.attach(opt, model)
    train_steps(model, opt, steps, seed=5)
    handle.remove()
    return model


STORED = {"proxy": ["weight", "weight_scale", "lora_B"],  # the whole FP8 [W; A; 0]
          "adapter": ["adapter_A", "weight_scale", "lora_B"]}  # W comes from the base model


@pytest.mark.parametrize("mode", ["adapter", "proxy"])
def test_round_trip_is_bit_exact(tmp_path, mode):
    # proxy: B holds a residual worth saving; adapter: B is the trained adapter
    model = trained_model(keep_residual=True, update_mode=mode)
    falqon.save_pretrained(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert meta["config"] == model.falqon_config.to_dict() and meta["state"]["step"] == 2
    assert meta["format_version"] == 2 and meta["weights"] == ("adapter" if mode == "adapter"
                                                               else "full")
    with safe_open(str(tmp_path / "ckpt" / MODEL_FILE), "pt") as f:
        stored = "weight" if mode == "proxy" else "adapter_A"
        assert f.get_tensor(f"model.layers.0.self_attn.q_proj.{stored}").dtype == \
            torch.float8_e4m3fn
        assert sorted(k.rsplit(".", 1)[1] for k in f.keys()) == sorted(STORED[mode] * 14)
        # adapter: the trained adapter; proxy: the residual rows that top-k has not folded yet
        assert any(f.get_tensor(k).any() for k in f.keys() if k.endswith(".lora_B"))

    loaded = falqon.from_pretrained(tiny_causal_lm("llama"), tmp_path / "ckpt")
    assert loaded.falqon_config == model.falqon_config
    assert proxy_state(loaded).step == 2
    for (name, a), b in zip(fp8_bytes(model).items(), fp8_bytes(loaded).values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(model.named_parameters(), loaded.parameters()):
        assert a.requires_grad == b.requires_grad and torch.equal(
            a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
            b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), name
    x = torch.randint(0, 272, (2, 10))
    assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    assert falqon.melded_summary(loaded).skipped == [("lm_head", "excluded (exclude_modules)")]
    # Loading into a model that is already melded (same layers) works as well.
    again = falqon.from_pretrained(copy.deepcopy(loaded), tmp_path / "ckpt")
    assert torch.equal(again(input_ids=x).logits, loaded(input_ids=x).logits)


@pytest.mark.parametrize("mode", ["adapter", "proxy"])
def test_transposed_copy_is_rebuilt_on_load(tmp_path, mode):
    model = trained_model(transposed_copy=True, update_mode=mode)
    falqon.save_pretrained(model, tmp_path)
    loaded = falqon.from_pretrained(tiny_causal_lm("llama"), tmp_path)
    for m in loaded.modules():
        if isinstance(m, MeldedLinear):
            # the adapter mode's copy holds every row of W' (its dx GEMM runs over [W; A; 0])
            rows = m.weight.shape[0] if mode == "adapter" else m.out_features
            assert m.weight_t.shape == (m.in_features, rows)
            assert torch.equal(m.weight_t.view(torch.uint8),
                               m.weight[:rows].t().contiguous().view(torch.uint8))
    x = torch.randint(0, 272, (2, 10))
    assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)


def histories(model):
    return {n: m.amax_history.clone() for n, m in model.named_modules()
            if isinstance(m, MeldedLinear)}


@pytest.mark.parametrize("mode", ["adapter", "proxy", "train_a"])
@pytest.mark.parametrize("amax_history_len", [0, 4])
def test_resume_is_bit_exact(tmp_path, amax_history_len, mode):
    """n steps, checkpoint, a fresh process's worth of objects (the checkpoint loaded into a
    fresh base model), n more == 2n straight: weights, B (and a trained A) and losses bit for
    bit (with delayed scaling too: the amax histories are part of the checkpoint)."""
    n = 2
    train_a = mode == "train_a"  # the adapter mode with A trained (FalqonConfig(train_a=True))
    straight = trained_model(steps=0, keep_residual=True, warmup_steps=3, topk=1,
                             amax_history_len=amax_history_len,
                             update_mode="adapter" if train_a else mode, train_a=train_a)
    twin = copy.deepcopy(straight)

    def make_opt(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05)

    opt = make_opt(straight)
    falqon.attach(opt, straight)
    losses = train_steps(straight, opt, 2 * n, seed=9)

    opt = make_opt(twin)
    handle = falqon.attach(opt, twin)
    gen = torch.Generator().manual_seed(9)
    first = train_steps(twin, opt, n, gen=gen)
    handle.remove()
    save_training_checkpoint(twin, opt, tmp_path / "step", {"step": n,
                                                            "gen": gen.get_state().tolist()})
    del twin, opt
    resumed, opt, state = load_training_checkpoint(tiny_causal_lm("llama"), make_opt,
                                                   tmp_path / "step")
    assert proxy_state(resumed).step == n  # the warm-up counter came back too
    falqon.attach(opt, resumed)
    gen = torch.Generator()
    gen.set_state(torch.tensor(state["gen"], dtype=torch.uint8))
    assert first + train_steps(resumed, opt, n, gen=gen) == losses
    for (name, a), b in zip(fp8_bytes(straight).items(), fp8_bytes(resumed).values()):
        assert torch.equal(a, b), name
    trained = [(a, b) for a, b in zip(straight.parameters(), resumed.parameters())
               if a.requires_grad]
    assert len(trained) == 14 * (1 + train_a) and all(torch.equal(a, b) for a, b in trained)
    assert any(a.any() for a, _ in trained)  # the adapter, or the proxy mode's residual
    if amax_history_len:
        for (name, a), b in zip(histories(straight).items(), histories(resumed).values()):
            assert torch.equal(a, b), name
            # 2n steps recorded into H = 4 slots; row 1 only where an input gradient was needed.
            assert a[0].all(), name


def test_amax_history_round_trip(tmp_path):
    model = trained_model(steps=2, amax_history_len=3)
    falqon.save_pretrained(model, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / MODEL_FILE), "pt") as f:
        assert sum(k.endswith(".amax_history") for k in f.keys()) == 14
    loaded = falqon.from_pretrained(tiny_causal_lm("llama"), tmp_path / "ckpt")
    assert loaded.falqon_config.amax_history_len == 3
    saved = histories(model)
    assert all(h[0, :2].all() and not h[0, 2:].any() for h in saved.values()), "2 steps recorded"
    for (name, a), b in zip(saved.items(), histories(loaded).values()):
        assert torch.equal(a, b), name
    x = torch.randint(0, 272, (2, 10))
    model.eval(), loaded.eval()
    assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    # A model melded with another history length does not take the checkpoint silently.
    other = tiny_causal_lm("llama")
    falqon.meld(other, FalqonConfig(rank=4, topk=3), progress=False, verbose=False)
    with pytest.raises(FalqonError, match="amax_history_len 0, the checkpoint 3"):
        falqon.from_pretrained(other, tmp_path / "ckpt")


@pytest.mark.parametrize("mode", ["adapter", "proxy"])
def test_errors_leave_the_checkpoint_alone(tmp_path, mode):
    model = trained_model(update_mode=mode)
    ckpt = tmp_path / "ckpt"
    falqon.save_pretrained(model, ckpt)
    files = snapshot(ckpt)
    with pytest.raises(FalqonError, match="not a falqon checkpoint"):
        falqon.from_pretrained(tiny_causal_lm("llama"), tmp_path / "missing")
    other = tiny_causal_lm("llama", hidden_size=96, num_attention_heads=6)
    with pytest.raises(FalqonError, match="is it the checkpoint's base model"):
        falqon.from_pretrained(other, ckpt)
    with pytest.raises(FalqonError, match="is it the checkpoint's base model"):
        falqon.from_pretrained(nn.Sequential(nn.Linear(64, 64)), ckpt)
    assert snapshot(ckpt) == files

    broken = tmp_path / "broken"
    broken.mkdir()
    for name, data in files.items():
        (broken / name).write_bytes(data)
    weights = broken / MODEL_FILE
    # A complete file that lacks a tensor (its size recorded as the checkpoint's own).
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.up_proj.lora_B"]
    save_file(tensors, str(weights))
    meta = json.loads(files[CONFIG_FILE])
    meta["files"][MODEL_FILE] = weights.stat().st_size
    (broken / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(FalqonError, match=r"is corrupt: model\.layers\.1\.mlp\.up_proj\.lora_B is "
                                          r"missing"):
        falqon.from_pretrained(tiny_causal_lm("llama"), broken)
    (broken / CONFIG_FILE).write_text(json.dumps({**meta, "weights": "half"}))
    with pytest.raises(FalqonError, match="is corrupt: weights is 'half'"):
        falqon.from_pretrained(tiny_causal_lm("llama"), broken)
    (broken / CONFIG_FILE).write_bytes(files[CONFIG_FILE])
    weights.write_bytes(files[MODEL_FILE][:len(files[MODEL_FILE]) // 2])  # truncated
    with pytest.raises(FalqonError, match="truncated or corrupt: falqon_model.safetensors"):
        falqon.from_pretrained(tiny_causal_lm("llama"), broken)
    (broken / CONFIG_FILE).write_text(files[CONFIG_FILE].decode()[:100])
    with pytest.raises(FalqonError, match="truncated or corrupt"):
        falqon.from_pretrained(tiny_causal_lm("llama"), broken)
    (broken / CONFIG_FILE).unlink()  # an interrupted save: the config is written last
    with pytest.raises(FalqonError, match="falqon_config.json is missing"):
        falqon.from_pretrained(tiny_causal_lm("llama"), broken)
    with pytest.raises(ValueError, match="not melded"):
        falqon.save_pretrained(tiny_causal_lm("llama"), tmp_path / "x")


def linear_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    assert not falqon.melded_layers(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                 for k, v in before.items())


def test_adapter_checkpoint_is_adapter_sized(tmp_path):
    """The adapter mode stores per layer A's FP8 rows, B, the scale: not the FP8 W, which the
    base model gives back at load."""
    sizes = {}
    for mode in ("adapter", "proxy"):
        model = trained_model(update_mode=mode)
        falqon.save_pretrained(model, tmp_path / mode)
        sizes[mode] = (tmp_path / mode / MODEL_FILE).stat().st_size
    with safe_open(str(tmp_path / "adapter" / MODEL_FILE), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    layers = falqon.melded_layers(model)
    assert stored == sum(m.rank * m.in_features + 4 * m.out_features * m.rank + 4
                         for _, m in layers)  # A (FP8), B (fp32), the scale (fp32)
    whole = sum(m.weight.numel() for _, m in layers)  # the proxy mode's FP8 [W; A; 0]
    assert stored < whole / 3 and sizes["adapter"] < sizes["proxy"] / 2, (stored, whole, sizes)


def test_adapter_checkpoint_needs_its_own_base_model(tmp_path):
    """The FP8 W is re-derived from the base model: a base whose weights quantise at another scale
    is refused with the layer's name, before anything of the model changes."""
    falqon.save_pretrained(trained_model(update_mode="adapter"), tmp_path)
    other = tiny_causal_lm("llama", seed=1)
    before = linear_state(other)
    with pytest.raises(FalqonError, match=r"base model's weights differ from the checkpoint's "
                                          r"base: layer model\.layers\.0\.self_attn\.q_proj "):
        falqon.from_pretrained(other, tmp_path)
    assert_untouched(other, before)
    # One layer changed (its amax), deep in the model: the layers before it are not replaced.
    edited = tiny_causal_lm("llama")
    with torch.no_grad():
        edited.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    before = linear_state(edited)
    with pytest.raises(FalqonError, match=r"layer model\.layers\.1\.mlp\.up_proj quantises"):
        falqon.from_pretrained(edited, tmp_path)
    assert_untouched(edited, before)
    # The same weights in another dtype round to another amax.
    with pytest.raises(FalqonError, match="base model's weights differ"):
        falqon.from_pretrained(tiny_causal_lm("llama").to(torch.bfloat16), tmp_path)
    with torch.device("meta"):
        unloaded = tiny_causal_lm("llama")
    with pytest.raises(FalqonError, match="on meta: the checkpoint needs the base model's"):
        falqon.from_pretrained(unloaded, tmp_path)
    # A model melded already: from another base (its scale), or in the proxy mode.
    for seed, mode, match in ((1, "adapter", "base model's weights differ"),
                              (0, "proxy", "update_mode proxy, the checkpoint adapter")):
        melded = tiny_causal_lm("llama", seed=seed)
        falqon.meld(melded, FalqonConfig(rank=4, update_mode=mode), progress=False,
                    verbose=False)
        with pytest.raises(FalqonError, match=match):
            falqon.from_pretrained(melded, tmp_path)


@pytest.mark.parametrize("mode", ["adapter", "proxy"])
def test_version_1_checkpoints_still_load(tmp_path, mode):
    """Format version 1 (before the weights layout) stored every layer's whole FP8 weight; those
    written before the adapter mode existed have no update_mode: the proxy mode's."""
    model = trained_model(update_mode=mode)
    layers = falqon.melded_layers(model)
    tensors = {}
    for name, layer in layers:
        tensors.update({f"{name}.weight": layer.weight, f"{name}.weight_scale": layer.weight_scale,
                        f"{name}.lora_B": layer.lora_B.detach()})
    save_file(tensors, str(tmp_path / MODEL_FILE))
    config = model.falqon_config.to_dict()
    del config["adapter_gain"]  # version 1 predates it: those adapters were trained with gain 1
    for _, layer in layers:
        layer.adapter_gain, layer.scaling = 1.0, layer.alpha / layer.rank
    if mode == "proxy":
        del config["update_mode"]
    meta = {"format": "falqon-checkpoint", "format_version": 1, "config": config,
            "state": {"step": 2, "skipped_steps": 0},
            "layers": {n: {"in_features": m.in_features, "out_features": m.out_features,
                           "rank": m.rank, "bias": False, "lora_dtype": "float32"}
                       for n, m in layers},
            "skipped": [["lm_head", "excluded (exclude_modules)"]],
            "base_model": {"class": "LlamaForCausalLM", "name_or_path": None},
            "files": {MODEL_FILE: (tmp_path / MODEL_FILE).stat().st_size}}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    loaded = falqon.from_pretrained(tiny_causal_lm("llama"), tmp_path)
    assert loaded.falqon_config.update_mode == mode and proxy_state(loaded).step == 2
    assert loaded.falqon_config.adapter_gain == 1.0
    assert {m.scaling for _, m in falqon.melded_layers(loaded)} == {1.0}
    for (name, a), b in zip(fp8_bytes(model).items(), fp8_bytes(loaded).values()):
        assert torch.equal(a, b), name
    x = torch.randint(0, 272, (2, 10))
    assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    # Saved again, it is a version-2 checkpoint in its mode's layout.
    falqon.save_pretrained(loaded, tmp_path / "v2")
    meta = json.loads((tmp_path / "v2" / CONFIG_FILE).read_text())
    assert meta["format_version"] == 2 and meta["weights"] == ("adapter" if mode == "adapter"
                                                               else "full")
