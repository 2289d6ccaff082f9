"""FalqonConfig: defaults, validation, layer matching, warm-up schedule, JSON round trip."""

import json

import pytest
import torch

from falqon import FalqonConfig


def test_defaults_follow_the_contract():
    cfg = FalqonConfig()
    assert (cfg.rank, cfg.alpha, cfg.topk, cfg.warmup_topk, cfg.warmup_steps) == (16, None, 10,
                                                                                   None, 0)
    assert cfg.keep_residual is False and cfg.transposed_copy is False
    assert cfg.target_modules is None and cfg.exclude_modules == ("lm_head",)
    assert (cfg.svd, cfg.seed, cfg.grad_dtype) == ("randomized", 0, "e5m2")
    # alpha / rank, times the adapter gain (10) in the adapter mode, the default.
    assert cfg.update_mode == "adapter" and cfg.adapter_gain == 10.0
    assert cfg.scaling == 10.0 and cfg.grad_torch_dtype == torch.float8_e5m2
    assert cfg.amax_history_len == 0, "current scaling (the paper's method) by default"
    assert FalqonConfig(rank=8, alpha=32).scaling == 40.0
    assert FalqonConfig(rank=8, alpha=32, update_mode="proxy").scaling == 4.0


def test_json_round_trip():
    cfg = FalqonConfig(rank=8, alpha=16, topk=3, warmup_topk=5, warmup_steps=7,
                       keep_residual=True, target_modules=["q_proj", "v_proj"],
                       exclude_modules=r".*\.mlp\..*", svd="exact", seed=3, grad_dtype="e4m3",
                       transposed_copy=True, amax_history_len=16)
    text = json.dumps(cfg.to_dict())
    back = FalqonConfig.from_dict(json.loads(text))
    assert back == cfg
    assert FalqonConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be >= 1"),
    (dict(rank=2.5), "rank must be an integer"),
    (dict(topk=-1), "topk must be >= 0"),
    (dict(warmup_topk=-2), "warmup_topk"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(alpha=0), "alpha must be a positive"),
    (dict(alpha=True), "alpha must be a positive"),
    (dict(svd="dense"), "svd must be one of"),
    (dict(grad_dtype="fp16"), "grad_dtype must be one of"),
    (dict(keep_residual="yes"), "keep_residual must be True or False"),
    (dict(target_modules="("), "not a valid regular expression"),
    (dict(target_modules=[""]), "non-empty strings"),
    (dict(exclude_modules=5), "must be None, a regex string or a list"),
    (dict(amax_history_len=-1), "amax_history_len must be >= 0"),
    (dict(amax_history_len=True), "amax_history_len must be an integer"),
])
def test_bad_values_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FalqonConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field.*lora_dropout"):
        FalqonConfig.from_dict({"rank": 4, "lora_dropout": 0.1})


def test_layer_matching_follows_peft():
    cfg = FalqonConfig(target_modules=["q_proj", "mlp.up_proj"])
    assert cfg.wants("model.layers.0.self_attn.q_proj") is None
    assert cfg.wants("model.layers.3.mlp.up_proj") is None
    assert cfg.wants("model.layers.0.self_attn.xq_proj") == "not in target_modules"
    assert cfg.wants("lm_head") == "excluded (exclude_modules)"
    regex = FalqonConfig(target_modules=r"model\.layers\.[01]\..*_proj", exclude_modules=None)
    assert regex.wants("model.layers.1.mlp.down_proj") is None
    assert regex.wants("model.layers.2.mlp.down_proj") == "not in target_modules"
    assert regex.wants("lm_head") == "not in target_modules"


def test_topk_schedule_has_a_warmup():
    cfg = FalqonConfig(rank=16, topk=4, warmup_steps=3)
    assert [cfg.topk_at(s) for s in range(5)] == [16, 16, 16, 4, 4]
    assert cfg.topk_at(0, rank=8) == 8  # warm-up k defaults to the layer's own rank
    cfg = FalqonConfig(rank=16, topk=4, warmup_steps=2, warmup_topk=7)
    assert [cfg.topk_at(s) for s in range(3)] == [7, 7, 4]
