"""save_pretrained / from_pretrained and the training checkpoint: round trips bit for bit,
bit-exact resume, and clear errors for damaged checkpoints."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
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


def train_steps(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 272, (2, 12), generator=gen)
        model(input_ids=x).logits.float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def trained_model(steps=2, **cfg):
    model = tiny_causal_lm("llama")
    falqon.meld(model, FalqonConfig(**{"rank": 4, "topk": 3, **cfg}), progress=False,
                verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    handle = falqon.attach(opt, model)
    train_steps(model, opt, steps, seed=5)
    handle.remove()
    return model


def test_round_trip_is_bit_exact(tmp_path):
    model = trained_model(keep_residual=True)  # B holds a residual worth saving
    falqon.save_pretrained(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert meta["config"] == model.falqon_config.to_dict() and meta["state"]["step"] == 2
    with safe_open(str(tmp_path / "ckpt" / MODEL_FILE), "pt") as f:
        key = "model.layers.0.self_attn.q_proj.weight"
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
        assert sorted(k.rsplit(".", 1)[1] for k in f.keys()) == sorted(
            ["weight", "weight_scale", "lora_B"] * 14)

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


def test_transposed_copy_is_rebuilt_on_load(tmp_path):
    model = trained_model(transposed_copy=True)
    falqon.save_pretrained(model, tmp_path)
    loaded = falqon.from_pretrained(tiny_causal_lm("llama"), tmp_path)
    for m in loaded.modules():
        if isinstance(m, MeldedLinear):
            assert torch.equal(m.weight_t.view(torch.uint8),
                               m.weight[:m.out_features].t().contiguous().view(torch.uint8))


def histories(model):
    return {n: m.amax_history.clone() for n, m in model.named_modules()
            if isinstance(m, MeldedLinear)}


@pytest.mark.parametrize("amax_history_len", [0, 4])
def test_resume_is_bit_exact(tmp_path, amax_history_len):
    """n steps, checkpoint, a fresh process's worth of objects, n more == 2n straight (with delayed
    scaling too: the amax histories are part of the checkpoint)."""
    n = 2
    straight = trained_model(steps=0, keep_residual=True, warmup_steps=3, topk=1,
                             amax_history_len=amax_history_len)
    twin = copy.deepcopy(straight)

    def make_opt(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05)

    opt = make_opt(straight)
    falqon.attach(opt, straight)
    train_steps(straight, opt, 2 * n, seed=9)

    opt = make_opt(twin)
    handle = falqon.attach(opt, twin)
    gen_state = torch.Generator().manual_seed(9)
    for _ in range(n):
        x = torch.randint(0, 272, (2, 12), generator=gen_state)
        twin(input_ids=x).logits.float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    save_training_checkpoint(twin, opt, tmp_path / "step", {"step": n,
                                                            "gen": gen_state.get_state().tolist()})
    del twin, opt
    resumed, opt, state = load_training_checkpoint(tiny_causal_lm("llama"), make_opt,
                                                   tmp_path / "step")
    assert proxy_state(resumed).step == n  # the warm-up counter came back too
    falqon.attach(opt, resumed)
    gen = torch.Generator()
    gen.set_state(torch.tensor(state["gen"], dtype=torch.uint8))
    for _ in range(n):
        x = torch.randint(0, 272, (2, 12), generator=gen)
        resumed(input_ids=x).logits.float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    for (name, a), b in zip(fp8_bytes(straight).items(), fp8_bytes(resumed).values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.parameters(), resumed.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b)
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


def test_errors_leave_the_checkpoint_alone(tmp_path):
    model = trained_model()
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
