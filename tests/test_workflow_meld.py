"""falqon.meld on small random LLaMA, Qwen2, Mistral and BERT models built from configs."""

import pytest
import torch
from torch import nn

import falqon
from falqon import FalqonConfig, MeldedLinear
from falqon_testing import rel_err
from workflow_testing import tiny_causal_lm, tiny_config

transformers = pytest.importorskip("transformers")


def linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_meld_causal_lm(arch):
    model = tiny_causal_lm(arch)
    x = torch.randint(0, 272, (2, 12))
    with torch.no_grad():
        dense = model(x).logits
    linears = linear_names(model)
    cfg = FalqonConfig(rank=8, topk=4)
    assert falqon.meld(model, cfg, progress=False, verbose=False) is model
    melded = {n for n, m in model.named_modules() if isinstance(m, MeldedLinear)}
    assert melded == linears - {"lm_head"}
    assert isinstance(model.lm_head, nn.Linear)  # lm_head and the embeddings stay as they are
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.endswith("lora_B"), name
    assert model.falqon_config is cfg
    s = falqon.melded_summary(model)
    assert sorted(s.melded) == sorted(melded)
    assert s.skipped == [("lm_head", "excluded (exclude_modules)")]
    n_layers = model.config.num_hidden_layers
    per_layer = (64 + 64 + 32 + 32) * 8 + (128 + 128 + 64) * 8  # lora_B: out_features x rank
    assert s.trainable_params == n_layers * per_layer
    assert s.all_params == sum(p.numel() for p in model.parameters())
    assert s.memory_after < s.memory_before
    text = str(s)
    assert "trainable params: " in text and "trainable%" in text and "lm_head" in text
    with torch.no_grad():
        out = model(x).logits
    # FP8 E4M3 weights and activations (3 mantissa bits, about 3% relative error per tensor)
    # through two decoder layers; the residual stream and the unquantised lm_head keep the
    # logits' error well under 10%.
    assert rel_err(out, dense) < 0.1


def test_meld_bert_skips_what_cannot_be_melded():
    model = transformers.BertForSequenceClassification(tiny_config("bert", num_labels=2))
    model.eval()
    x = torch.randint(0, 272, (2, 10))
    with torch.no_grad():
        dense = model(x).logits
    falqon.meld(model, FalqonConfig(rank=4), progress=False, verbose=False)
    s = falqon.melded_summary(model)
    reasons = dict(s.skipped)
    assert "multiples of 16" in reasons["classifier"]  # 64 -> 2 classes
    assert isinstance(model.classifier, nn.Linear)
    assert len(s.melded) == 2 * 6 + 1  # q, k, v, attn out, intermediate, output per layer; pooler
    with torch.no_grad():
        out = model(x).logits
    assert out.shape == dense.shape and torch.isfinite(out).all()


def test_target_and_exclude_modules_and_rank_limits():
    model = tiny_causal_lm("llama")
    cfg = FalqonConfig(rank=48, target_modules=["q_proj", "k_proj", "down_proj"],
                       exclude_modules=["layers.1.self_attn.q_proj"])
    falqon.meld(model, cfg, progress=False, verbose=False)
    s = falqon.melded_summary(model)
    assert sorted(s.melded) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                "model.layers.1.mlp.down_proj"]
    reasons = dict(s.skipped)
    assert reasons["model.layers.1.self_attn.q_proj"] == "excluded (exclude_modules)"
    assert reasons["model.layers.0.self_attn.v_proj"] == "not in target_modules"
    assert "rank must be between 1 and" in reasons["model.layers.0.self_attn.k_proj"]  # 64 -> 32


def test_meld_progress_and_summary_are_printed(capsys):
    model = tiny_causal_lm("llama")
    falqon.meld(model, FalqonConfig(rank=4), progress=True, verbose=True)
    captured = capsys.readouterr()
    assert "falqon: melded 14 of 15 linear layers" in captured.out
    assert "weight memory:" in captured.out
    assert "falqon meld" in captured.err  # the tqdm bar over the layers


def test_meld_errors():
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="no layer can be melded"):
        falqon.meld(model, FalqonConfig(target_modules=["nothing"]), progress=False,
                    verbose=False)
    falqon.meld(model, FalqonConfig(rank=4), progress=False, verbose=False)
    with pytest.raises(ValueError, match="already holds MeldedLinear"):
        falqon.meld(model, FalqonConfig(rank=4), progress=False, verbose=False)
    with pytest.raises(ValueError, match="not melded"):
        falqon.melded_summary(nn.Linear(16, 16))
    with pytest.raises(TypeError, match="FalqonConfig"):
        falqon.meld(tiny_causal_lm("llama"), {"rank": 4})


def test_meld_keeps_dtype_and_device_of_the_model():
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    falqon.meld(model, FalqonConfig(rank=4), progress=False, verbose=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.lora_B.dtype == torch.float32
    assert layer.weight.device == model.model.embed_tokens.weight.device
    out = model(torch.randint(0, 272, (1, 8))).logits
    assert out.dtype == torch.bfloat16
