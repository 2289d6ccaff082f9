"""falqon.meld and falqon.from_pretrained are all or nothing, and never meld silently at one place
only: a non-finite weight is named before anything changes; a bare nn.Linear is melded and
returned; shared layers, tied embeddings and GPT-2's Conv1D are skipped with the reason."""

import json

import pytest
import torch
from torch import nn

import falqon
from falqon import FalqonConfig, FalqonError, MeldedLinear
from workflow_testing import tiny_causal_lm

transformers = pytest.importorskip("transformers")


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[k], v) or (after[k].isnan() == v.isnan()).all() for k, v in before.items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_meld_names_a_non_finite_weight_and_changes_nothing(bad):
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    before = state(model)
    with pytest.raises(ValueError, match=r"non-finite \(NaN or Inf\) weights in "
                                         r"model.layers.1.mlp.up_proj .*not changed"):
        falqon.meld(model, FalqonConfig(rank=4), progress=False, verbose=False)
    assert not falqon.melded_layers(model) and same_state(model, before)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = 0.0
    falqon.meld(model, FalqonConfig(rank=4), progress=False, verbose=False)  # a retry works
    assert len(falqon.melded_layers(model)) == 14


@pytest.mark.parametrize("mode", ["adapter", "proxy"])
def test_meld_of_a_bare_linear_returns_the_melded_layer(mode):
    lin = nn.Linear(32, 32)
    x = torch.randn(5, 32)
    out = falqon.meld(lin, FalqonConfig(rank=8, update_mode=mode), progress=False, verbose=False)
    assert isinstance(out, MeldedLinear) and out.update_mode == mode
    assert out.lora_B.requires_grad and falqon.melded_summary(out).melded == [""]
    rel = ((out(x) - lin(x)).norm() / lin(x).norm()).item()
    assert rel < 0.1  # the FP8 layer, not the unchanged Linear


def test_a_shared_linear_is_skipped_by_name_not_melded_at_one_place():
    shared = nn.Linear(32, 32)
    seq = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(32, 32))
    falqon.meld(seq, FalqonConfig(rank=4, exclude_modules=None), progress=False, verbose=False)
    assert seq[0] is shared and seq[2] is shared and isinstance(seq[3], MeldedLinear)
    summary = falqon.melded_summary(seq)
    assert summary.skipped == [("0", "the same nn.Linear is also used as 2: shared layers are "
                                     "not melded")]
    assert "skipped 0: the same nn.Linear is also used as 2" in str(summary)
    with pytest.raises(ValueError, match="no layer can be melded .*0: the same nn.Linear"):
        falqon.meld(nn.Sequential(shared, shared), FalqonConfig(rank=4, exclude_modules=None),
                    progress=False, verbose=False)


def test_tied_embeddings_stay_unmelded_and_the_export_loads(tmp_path):
    model = tiny_causal_lm("llama", tie_word_embeddings=True)
    falqon.meld(model, FalqonConfig(rank=4, exclude_modules=None), progress=False, verbose=False)
    assert isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reason = dict(falqon.melded_summary(model).skipped)["lm_head"]
    assert reason.startswith("its weight is tied to model.embed_tokens.weight")
    model.tie_weights()  # still possible
    falqon.export(model, tmp_path, format="fp8", verbose=False)
    assert "lm_head" in json.loads((tmp_path / "config.json").read_text())[
        "quantization_config"]["ignore"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = torch.randint(0, 272, (1, 10))
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=x).logits).all()


def test_gpt2_conv1d_layers_are_named_in_the_refusal():
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=128,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn: transformers Conv1D "
                                         r"\(GPT-2's layers"):
        falqon.meld(model, FalqonConfig(rank=4), progress=False, verbose=False)


@pytest.mark.parametrize("mode", ["adapter", "proxy"])
def test_from_pretrained_onto_another_mlp_width_changes_nothing(tmp_path, mode):
    model = tiny_causal_lm("llama")
    falqon.meld(model, FalqonConfig(rank=4, update_mode=mode), progress=False, verbose=False)
    falqon.save_pretrained(model, tmp_path)
    base = tiny_causal_lm("llama", intermediate_size=192)
    before = state(base)
    with pytest.raises(FalqonError):
        falqon.from_pretrained(base, tmp_path)
    assert not falqon.melded_layers(base) and same_state(base, before)
