"""Meld while loading (falqon.loading, falqon.weight_sources) on the CPU: tiny sharded safetensors
checkpoints, corrupt ones included, and the seeded random weights of the benchmarks."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from torch import nn

import falqon
from falqon.config import FalqonError
from falqon.loading import empty_model, load_layerwise, meld_from_config, meld_pretrained
from falqon.weight_sources import INDEX_FILE, CheckpointWeights, RandomWeights

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from workflow_testing import tiny_causal_lm, tiny_config  # noqa: E402

CFG = falqon.FalqonConfig(rank=4)


def sharded(tmp_path, arch="llama", name="model", **overrides):
    """A tiny checkpoint saved as several safetensors shards with an index."""
    path = tmp_path / name
    tiny_causal_lm(arch, **overrides).save_pretrained(path, max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 3 and (path / INDEX_FILE).is_file()
    return path


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 1 and a.is_floating_point():
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def meld_whole(path, config=CFG):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return falqon.meld(model, config, progress=False, verbose=False)


@pytest.mark.parametrize("arch,overrides", [("llama", {"tie_word_embeddings": True}),
                                            ("qwen2", {})])  # tied lm_head; q/k/v biases
def test_meld_pretrained_equals_meld_of_the_loaded_model(tmp_path, arch, overrides, capsys):
    path = sharded(tmp_path, arch, **overrides)
    ours = meld_pretrained(path, CFG, device="cpu", dtype=torch.float32, progress=False)
    ref = meld_whole(path)
    assert "falqon: melded 14 of 15 linear layers" in capsys.readouterr().out
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert list(mine) == list(theirs)
    assert all(same(mine[k], theirs[k]) for k in mine)  # bit for bit, FP8 and A included
    assert falqon.melded_summary(ours) == falqon.melded_summary(ref)
    assert not ours.training and ours.lm_head.weight.requires_grad is False
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == (arch == "llama")
    ids = torch.randint(0, 272, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert all(p.device.type == "cpu" for p in ours.parameters())
    assert all(b.device.type == "cpu" for b in ours.buffers())


def test_single_file_checkpoint_and_skipped_layers_load_as_they_are(tmp_path):
    path = tmp_path / "one"
    # intermediate 72: the MLP's layers are not multiples of 16 wide, so meld skips them
    model = tiny_causal_lm("llama", intermediate_size=72)
    model.save_pretrained(path)
    assert (path / "model.safetensors").is_file() and not (path / INDEX_FILE).exists()
    ours = meld_pretrained(path, CFG, device="cpu", dtype=torch.float32, progress=False,
                           verbose=False)
    skipped = dict(falqon.melded_summary(ours).skipped)
    assert "multiples of 16" in skipped["model.layers.0.mlp.up_proj"]
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight",
                 "lm_head.weight", "model.norm.weight"):
        assert same(ours.get_parameter(name), model.get_parameter(name))
    assert type(ours.model.layers[0].mlp.gate_proj) is nn.Linear
    assert isinstance(ours.model.layers[0].self_attn.q_proj, falqon.MeldedLinear)


def test_one_layer_of_high_precision_weights_at_a_time(tmp_path):
    """Each layer to meld is loaded, converted and dropped before the next one is read: the
    previous layer's weights are gone, the later ones still on the meta device."""
    path = sharded(tmp_path)
    from transformers import AutoConfig

    model = empty_model(AutoConfig.from_pretrained(path), torch.float32)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    seen, previous = [], []

    def convert(linear):
        assert all(ref() is None for ref in previous)  # the last layer's weights were freed
        later = [model.get_submodule(n).weight for n in targets[len(seen) + 1:]]
        assert all(w.device.type == "meta" for w in later)
        previous[:] = [weakref.ref(linear.weight)]
        seen.append(linear.weight.shape)
        return falqon.MeldedLinear.from_linear(linear, rank=4)

    source = CheckpointWeights(path)
    load_layerwise(model, source, "cpu", dict.fromkeys(targets, convert), progress=False)
    assert len(seen) == len(targets) == 14
    assert not any(p.device.type == "meta" for p in model.parameters())


def write_index(path, mutate):
    index = json.loads((path / INDEX_FILE).read_text())
    mutate(index["weight_map"])
    (path / INDEX_FILE).write_text(json.dumps(index))


def shard_of(path, key):
    return json.loads((path / INDEX_FILE).read_text())["weight_map"][key]


def load(path):
    return meld_pretrained(path, CFG, device="cpu", dtype=torch.float32, progress=False,
                           verbose=False)


def test_corrupt_checkpoints_are_named_before_anything_loads(tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    path = sharded(tmp_path, name="missing")
    (path / shard_of(path, key)).unlink()
    with pytest.raises(FalqonError, match=f"{shard_of(path, key)} is missing"):
        load(path)

    path = sharded(tmp_path, name="truncated")
    shard = path / shard_of(path, key)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(FalqonError, match=f"{shard.name} is truncated or not a safetensors file"):
        load(path)

    path = sharded(tmp_path, name="moved")  # the index maps a tensor to a shard without it
    other = shard_of(path, "model.embed_tokens.weight")
    write_index(path, lambda m: m.__setitem__(key, other))
    with pytest.raises(FalqonError, match=f"{other} does not hold {key}"):
        load(path)

    path = sharded(tmp_path, name="lacking")  # no shard holds a weight the model needs
    write_index(path, lambda m: m.pop(key))
    with pytest.raises(FalqonError, match=f"has no tensor {key}: it is not a checkpoint"):
        load(path)

    path = sharded(tmp_path, name="mismatched")  # config.json of another model
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(FalqonError, match=r"model-0000\d-of-000\d\d.safetensors holds "
                       r"model.layers.0.mlp.gate_proj.weight as \[128, 64\], but the model"):
        load(path)

    path = sharded(tmp_path, name="fp8")  # a quantised checkpoint: not what meld starts from
    from safetensors.torch import load_file, save_file

    shard = path / shard_of(path, key)
    tensors = load_file(shard)
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(FalqonError, match=rf"holds {key} in FP8 \(F8_E4M3\): a quantised"):
        load(path)

    path = sharded(tmp_path, name="badindex")
    (path / INDEX_FILE).write_text("{")
    with pytest.raises(FalqonError, match=f"{INDEX_FILE} is not valid JSON"):
        load(path)
    for f in path.glob("*.safetensors*"):
        f.unlink()
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FalqonError, match="holds pytorch_model.bin: falqon loads safetensors"):
        load(path)
    with pytest.raises(FalqonError, match="no config.json"):
        load(tmp_path)


def test_a_nan_weight_is_named_and_nothing_half_loaded_is_left(tmp_path):
    path = tmp_path / "nan"
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 2] = float("nan")
    model.save_pretrained(path, max_shard_size="40KB")
    with pytest.raises(FalqonError, match="has non-finite weights: "
                       "model.layers.1.mlp.down_proj.weight holds NaN or inf"):
        load(path)
    from transformers import AutoConfig

    skeleton = empty_model(AutoConfig.from_pretrained(path), torch.float32)
    with pytest.raises(FalqonError, match="non-finite"):
        load_layerwise(skeleton, CheckpointWeights(path), "cpu", progress=False)
    # Layer 0 had loaded: the failed load put it back on the meta device.
    assert all(t.device.type == "meta" for t in skeleton.state_dict().values())


def test_bad_arguments(tmp_path):
    path = sharded(tmp_path)
    with pytest.raises(TypeError, match="config must be a FalqonConfig"):
        meld_pretrained(path, {"rank": 4})
    with pytest.raises(ValueError, match="no layer can be melded"):
        meld_pretrained(path, falqon.FalqonConfig(rank=4, target_modules=["nothing"]),
                        device="cpu", progress=False)
    (path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(FalqonError, match="is not a loadable causal LM"):
        load(path)


def test_meld_from_config_is_the_layerwise_build_of_seeded_random_weights():
    config = tiny_config("llama", num_key_value_heads=1, intermediate_size=96)  # GQA
    a = meld_from_config(config, CFG, device="cpu", dtype=torch.float32, seed=3, progress=False,
                         verbose=False)
    # The same weights, loaded unmelded, then melded whole: the same model bit for bit.
    plain = load_layerwise(empty_model(config, torch.float32), RandomWeights(0.02, 3), "cpu",
                           progress=False)
    w = plain.model.layers[0].mlp.up_proj.weight
    w = w.detach()
    assert abs(float(w.std()) - 0.02) < 0.002 and float(w.mean().abs()) < 0.002
    assert torch.equal(plain.model.norm.weight, torch.ones(64))
    assert plain.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    ref = falqon.meld(plain, CFG, progress=False, verbose=False)
    assert all(same(x, y) for x, y in zip(a.state_dict().values(), ref.state_dict().values()))
    b = meld_from_config(config, CFG, device="cpu", dtype=torch.float32, seed=4, progress=False,
                         verbose=False)
    assert not same(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_cli_finetune_melds_a_sharded_checkpoint_while_loading(tmp_path, capsys):
    from falqon.cli import main
    from falqon.fingerprint import weights_fingerprint
    from transformers import AutoModelForCausalLM

    from test_cli import one_error_line

    path = sharded(tmp_path, pad_token_id=256, bos_token_id=257, eos_token_id=258)
    common = ["--no-progress", "--no-plot", "--batch-size", "2", "--seq-len", "32", "--rank",
              "4", "--device", "cpu", "--steps", "1", "--eval-size", "2"]
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(path), "--output-dir", str(out), *common]) == 0
    # The fingerprint taken while loading is the one of the whole model (runs stay resumable).
    whole = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    run = json.loads((out / "run.json").read_text())
    assert run["base_fingerprint"] == weights_fingerprint(whole)
    capsys.readouterr()
    shard = path / shard_of(path, "model.layers.0.mlp.up_proj.weight")
    shard.write_bytes(shard.read_bytes()[:-8])
    bad = tmp_path / "bad-run"
    assert main(["finetune", "--model", str(path), "--output-dir", str(bad), *common]) == 2
    one_error_line(capsys, f"{shard.name} is truncated or not a safetensors file")
    assert not bad.exists()
