"""A PEFT user's workflow, unchanged (falqon.peft_compat, falqon.model_api, falqon.update_guard):
LoraConfig and PEFT's field names, "all-linear", print_trainable_parameters, save_pretrained and
the Trainer's saves as falqon checkpoints, TRL's SFTTrainer, `falqon export` of a Trainer
checkpoint, and the proxy mode's forgotten update."""

import dataclasses
import math

import pytest
import torch

import falqon
from falqon import FalqonConfig
from workflow_testing import tiny_causal_lm

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def melded(config, seed=0):
    return falqon.meld(tiny_causal_lm(seed=seed), config, progress=False, verbose=False)


def layer_names(model):
    return sorted(n for n, _ in falqon.melded_layers(model))


def test_peft_names_and_lora_config_give_the_same_config():
    with pytest.warns(UserWarning, match="lora_dropout=0.05 is ignored"):
        cfg = FalqonConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "v_proj"])
    assert (cfg.rank, cfg.alpha, cfg.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["v_proj", "q_proj"],
                           task_type="CAUSAL_LM")
    # PEFT's exclude_modules=None is kept: a LoraConfig melds exactly what PEFT would adapt
    assert FalqonConfig.from_peft(lora) == dataclasses.replace(cfg, exclude_modules=None)
    assert FalqonConfig.from_peft(lora, update_mode="proxy").update_mode == "proxy"
    rs = FalqonConfig.from_peft(peft.LoraConfig(r=16, lora_alpha=8, use_rslora=True,
                                                target_modules="all-linear"))
    assert math.isclose(rs.scaling, rs.adapter_gain * 8 / math.sqrt(16))  # rsLoRA's scaling
    assert math.isclose(FalqonConfig(r=16, use_rslora=True).alpha, 16 * 4)
    with pytest.raises(ValueError, match="give rank or PEFT's r, not both"):
        FalqonConfig(rank=8, r=8)


@pytest.mark.parametrize("field, value", [("use_dora", True), ("bias", "all"),
                                          ("modules_to_save", ["lm_head"]),
                                          ("init_lora_weights", "pissa"),
                                          ("rank_pattern", {"q_proj": 4}),
                                          ("layers_to_transform", [0])])
def test_what_falqon_cannot_honour_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"cannot honour {field}="):
        FalqonConfig(r=4, **{field: value})
    model = tiny_causal_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"], **{field: value})
    with pytest.raises(ValueError, match=f"cannot honour {field}="):
        falqon.meld(model, lora)
    assert not falqon.melded_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_meld_targets_what_get_peft_model_targets():
    for targets in ("all-linear", None, ["q_proj", "down_proj"]):
        lora = peft.LoraConfig(r=4, target_modules=targets)
        ours = layer_names(melded(lora))
        theirs = sorted(n.removeprefix("base_model.model.") for n, m in
                        peft.get_peft_model(tiny_causal_lm(), lora).named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
        assert ours == theirs, targets
    model = melded(FalqonConfig(rank=4, target_modules="All-Linear", exclude_modules=None))
    assert "lm_head" not in layer_names(model) and len(layer_names(model)) == 14
    assert ("lm_head", "the output layer (target_modules='all-linear' leaves it out, as PEFT "
            "does)") in falqon.melded_summary(model).skipped
    with pytest.raises(TypeError, match="FalqonConfig or a peft.LoraConfig, got IA3Config"):
        falqon.meld(tiny_causal_lm(), peft.IA3Config(target_modules=["q_proj"]))


def test_print_trainable_parameters_as_peft(capsys):
    model = melded(peft.LoraConfig(r=4, target_modules="all-linear"))
    capsys.readouterr()
    model.print_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable == sum(m.lora_B.numel() for _, m in falqon.melded_layers(model))
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: "
                                       f"{total:,d} || trainable%: "
                                       f"{100 * trainable / total:.4f}\n")
    assert model.get_nb_trainable_parameters() == (trainable, total)


@pytest.mark.parametrize("mode", ["adapter", "proxy"])
def test_save_pretrained_round_trip(tmp_path, mode):
    model = melded(FalqonConfig(r=4, update_mode=mode))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    handle = falqon.attach(opt, model)
    ids = torch.randint(0, 256, (2, 16))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = falqon.from_pretrained(tiny_causal_lm(), tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises((OSError, ValueError)):  # not a transformers checkpoint (no config.json)
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    falqon.merge(loaded, precision="bf16", verbose=False)  # a plain model again: its own save
    loaded.save_pretrained(tmp_path / "merged")
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
