"""A melded model in the Hugging Face Trainer and TRL's SFTTrainer (their saves are falqon
checkpoints that falqon loads, the Trainer resumes from and `falqon export` reads), and the proxy
mode's update that cannot be forgotten silently."""

import warnings

import pytest
import torch

import falqon
from falqon import FalqonConfig
from falqon.cli import main as cli_main
from workflow_testing import tiny_causal_lm

transformers = pytest.importorskip("transformers")
ROWS = [{"input_ids": ids, "labels": ids} for ids in
        torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()]


def args(out, steps, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=0.02,
        report_to=[], logging_strategy="no", use_cpu=True, disable_tqdm=True, **kw)


def b_of(model):
    """Each melded layer's B (and its trained A, FalqonConfig(train_a=True))."""
    return [t.detach().clone() for _, m in falqon.melded_layers(model)
            for t in (m.lora_B, m.lora_A) if t is not None]


@pytest.mark.parametrize("train_a", [False, True], ids=["frozen_A", "train_a"])
def test_trainer_saves_load_resume_and_export(tmp_path, capsys, train_a):
    base = tmp_path / "base"
    tiny_causal_lm().save_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    config = FalqonConfig(r=4, lora_alpha=8, train_a=train_a)
    # A trained A's rows follow lora_A through FalqonCallback's hook (an eager forward would too)
    callbacks = [falqon.FalqonCallback()] if train_a else []
    falqon.meld(model, config, progress=False, verbose=False)
    trainer = transformers.Trainer(model=model, args=args(tmp_path / "out", 4, save_steps=2),
                                   train_dataset=ROWS, callbacks=callbacks)
    trainer.train()
    trainer.save_model(tmp_path / "final")
    for ckpt in (tmp_path / "out" / "checkpoint-4", tmp_path / "final"):
        loaded = falqon.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                        ckpt)
        assert all(torch.equal(a, b) for a, b in zip(b_of(loaded), b_of(model)))
    # The Trainer resumes from its own checkpoint into a freshly melded model.
    again = transformers.AutoModelForCausalLM.from_pretrained(base)
    falqon.meld(again, config, progress=False, verbose=False)
    callbacks = [falqon.FalqonCallback()] if train_a else []
    resumed = transformers.Trainer(model=again, args=args(tmp_path / "out", 4, save_steps=2),
                                   train_dataset=ROWS, callbacks=callbacks)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(b_of(again), b_of(model)))
    # `falqon export` of the Trainer's output directory (its newest checkpoint-N; the base
    # model is the directory it was loaded from) and of a checkpoint with --base-model.
    assert cli_main(["export", str(tmp_path / "out"), str(tmp_path / "e1"), "--format",
                     "bf16"]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e1")
    ids = torch.tensor([ROWS[0]["input_ids"]])
    with torch.no_grad():
        ref = falqon.merge(model, precision="bf16", verbose=False)(ids).logits
        assert torch.allclose(exported(ids).logits, ref, atol=1e-5)
    assert cli_main(["export", str(tmp_path / "out" / "checkpoint-2"), str(tmp_path / "e2"),
                     "--base-model", str(base)]) == 0
    assert (tmp_path / "e2" / "adapter" / "adapter_config.json").is_file()


def test_export_refuses_a_trainer_checkpoint_without_falqon_files(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "trainer_state.json").write_text("{}")
    assert cli_main(["export", str(tmp_path / "ck"), str(tmp_path / "e")]) == 2
    assert "holds no falqon checkpoint (falqon_config.json)" in capsys.readouterr().err


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from falqon.data import byte_tokenizer

    model = tiny_causal_lm()
    falqon.meld(model, lora_config(), progress=False, verbose=False)
    rows = [{"text": f"the word {w} twice: {w} {w}"} for w in ("alpha", "beta", "gamma") * 4]
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                           learning_rate=1e-2, report_to=[], save_steps=3, use_cpu=True,
                           disable_tqdm=True, max_length=64, logging_steps=1)
    trainer = trl.SFTTrainer(model=model, args=config, processing_class=byte_tokenizer(),
                             train_dataset=datasets.IterableDataset.from_generator(
                                 lambda: iter(rows)))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    loaded = falqon.from_pretrained(tiny_causal_lm(), tmp_path / "checkpoint-3")
    assert all(torch.equal(a, b) for a, b in zip(b_of(loaded), b_of(model)))


def lora_config():
    import peft

    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def proxy_steps(model, steps=2, after_step=None, fused=False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05,
                            fused=fused)
    ids = torch.randint(0, 256, (2, 16))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if after_step:
            after_step(opt)
    return opt


@pytest.mark.parametrize("fused", [False, True])  # a fused optimizer bumps no version counter
def test_forgotten_proxy_update_warns_once(tmp_path, fused):
    model = falqon.meld(tiny_causal_lm(), FalqonConfig(r=4, update_mode="proxy"),
                        progress=False, verbose=False)
    with pytest.warns(RuntimeWarning, match="no proxy update followed it") as caught:
        proxy_steps(model, steps=3, fused=fused)
    assert sum("no proxy update followed" in str(w.message) for w in caught) == 1
    for what, call in (("save_pretrained", lambda: model.save_pretrained(tmp_path / "c")),
                       ("falqon.export", lambda: falqon.export(model, tmp_path / "e",
                                                               verbose=False))):
        with pytest.warns(RuntimeWarning, match=f"{what}: lora_B of 14 proxy-mode layer"):
            call()


@pytest.mark.parametrize("how", ["attach", "by hand", "callback-style", "adapter mode"])
def test_no_warning_when_the_update_runs(tmp_path, how):
    mode = "adapter" if how == "adapter mode" else "proxy"
    model = falqon.meld(tiny_causal_lm(), FalqonConfig(r=4, update_mode=mode, keep_residual=True)
                        if mode == "proxy" else FalqonConfig(r=4), progress=False, verbose=False)
    updater = falqon.training.ProxyUpdater(model)

    def after(opt):
        if how == "by hand":
            for _, layer in falqon.melded_layers(model):
                layer.proxy_update()
        elif how == "callback-style":
            updater.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        if how == "attach":
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
            falqon.attach(opt, model)
            ids = torch.randint(0, 256, (2, 16))
            for _ in range(3):
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
        else:
            proxy_steps(model, steps=3, after_step=after)
        model(input_ids=torch.randint(0, 256, (2, 16)))
        model.save_pretrained(tmp_path / "c")


def test_save_pretrained_index_names_only_what_its_file_holds(tmp_path):
    """model.save_pretrained with a small max_shard_size (as transformers' callers may pass)
    writes one tensor file, and its model.safetensors.index.json maps to that file only keys it
    holds: falqon's reader of transformers directories opens it (it refused the old index, which
    mapped the frozen weights there too), from_pretrained loads it back, and a Trainer resumes
    from a checkpoint of it to the uninterrupted run's B."""
    import json

    from falqon.weight_sources import CheckpointWeights

    base = tmp_path / "base"
    tiny_causal_lm().save_pretrained(base, max_shard_size="20KB")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    falqon.meld(model, FalqonConfig(r=4, update_mode="proxy"), progress=False, verbose=False)
    trainer = transformers.Trainer(model=model, args=args(tmp_path / "out", 4, save_steps=2),
                                   train_dataset=ROWS, callbacks=[falqon.FalqonCallback()])
    trainer.train()
    model.save_pretrained(tmp_path / "ck", max_shard_size="20KB")
    for ckpt in (tmp_path / "ck", tmp_path / "out" / "checkpoint-2"):
        weights = CheckpointWeights(ckpt)  # every key in the file the index names
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {"falqon_model.safetensors"}
        assert set(weights.files) == set(index["weight_map"])
        assert "model.embed_tokens.weight" in index["metadata"]["falqon_frozen_keys"]
    loaded = falqon.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                    tmp_path / "ck")
    assert all(torch.equal(a, b) for a, b in zip(b_of(loaded), b_of(model)))
    again = transformers.AutoModelForCausalLM.from_pretrained(base)
    falqon.meld(again, FalqonConfig(r=4, update_mode="proxy"), progress=False, verbose=False)
    resumed = transformers.Trainer(model=again, args=args(tmp_path / "out", 4, save_steps=2),
                                   train_dataset=ROWS, callbacks=[falqon.FalqonCallback()])
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    weights = [m.weight.view(torch.uint8) for _, m in falqon.melded_layers(model)]
    assert all(torch.equal(a, m.weight.view(torch.uint8))
               for a, (_, m) in zip(weights, falqon.melded_layers(again)))
