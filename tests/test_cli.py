"""The `falqon` console script: finetune end to end on a tiny model, bit-exact resume, export,
bench, info, and a one-line error that leaves files intact for each kind of bad input."""

import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import falqon

from falqon.cli import main
from falqon.config import FalqonError
from workflow_testing import cli_finetune, snapshot

transformers = pytest.importorskip("transformers")

# On the CPU everywhere (the reference ops), so that bit-exactness holds on a GPU machine too;
# tests/test_cli_gpu.py runs the CLI on the GPU.
TINY_RUN = ["--batch-size", "2", "--seq-len", "64", "--rank", "4", "--lr", "0.05",
            "--no-progress", "--device", "cpu"]
PROXY = ["--update-mode", "proxy", "--topk", "4"]


def finetune(inputs, out, *extra):
    return cli_finetune(inputs, out, TINY_RUN, *extra)


def one_error_line(capsys, match):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("falqon: error: "), err
    assert match in err[0], err[0]


def test_finetune_end_to_end(inputs, tmp_path, capsys):
    out, exp = tmp_path / "run", tmp_path / "exported"
    assert finetune(inputs, out, "--steps", "4", "--eval-every", "2", "--save-every", "2",
                    "--grad-accum", "2", "--export", str(exp)) == 0
    printed = capsys.readouterr().out
    assert "falqon: melded 14 of 15 linear layers" in printed and "train loss" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["steps"] == 4 and run["options"]["grad_accum"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002",
                                                                       "step-0000004"]
    # Each checkpoint is the Hugging Face Trainer's (its optimizer, scheduler and state, which
    # its resume_from_checkpoint reads), with falqon's model files and size manifest.
    checkpoint = out / "checkpoints" / "step-0000004"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 4
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "falqon_model.safetensors"} <= \
        {p.name for p in checkpoint.iterdir()}
    manifest = json.loads((checkpoint / "falqon_run_checkpoint.json").read_text())
    assert manifest["step"] == 4 and manifest["files"]["optimizer.pt"] == \
        (checkpoint / "optimizer.pt").stat().st_size
    assert (out / "final" / "falqon_config.json").is_file()
    assert (out / "final" / "tokenizer.json").is_file()
    qconfig = json.loads((exp / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "float-quantized"
    # `falqon export` of the finished run writes the same tensors as --export did.
    assert main(["export", str(out), str(tmp_path / "again")]) == 0
    a, b = load_file(str(exp / "model.safetensors")), load_file(str(tmp_path / "again" /
                                                                     "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    # The adapter mode's default format: the FP8 base plus a PEFT LoRA adapter.
    for d in (exp, tmp_path / "again"):
        assert json.loads((d / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert "fp8+lora" in capsys.readouterr().out


def test_export_formats(inputs, tmp_path, capsys):
    adapter_run, proxy_run = tmp_path / "adapter", tmp_path / "proxy"
    assert finetune(inputs, adapter_run, "--steps", "2", "--eval-every", "0") == 0
    assert finetune(inputs, proxy_run, "--steps", "2", "--eval-every", "0", *PROXY) == 0
    assert main(["export", str(adapter_run), str(tmp_path / "bf16"), "--format", "bf16"]) == 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and not (tmp_path / "bf16" / "adapter").exists()
    assert main(["export", str(adapter_run), str(tmp_path / "fp8"), "--format", "fp8"]) == 0
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert not (tmp_path / "fp8" / "adapter").exists()
    assert main(["export", str(proxy_run), str(tmp_path / "proxy-fp8")]) == 0
    assert not (tmp_path / "proxy-fp8" / "adapter").exists()
    capsys.readouterr()
    assert main(["export", str(proxy_run), str(tmp_path / "x"), "--format", "fp8+lora"]) == 2
    one_error_line(capsys, "needs update_mode='adapter'")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir()), \
        "refused before anything was written"


@pytest.mark.parametrize("variant", [[*PROXY, "--warmup-steps", "2", "--keep-residual"],
                                     ["--amax-history-len", "4", "--transposed-copy"]],
                         ids=["proxy_keep_residual", "adapter_delayed_scaling_transposed_copy"])
def test_resume_is_bit_exact(inputs, tmp_path, variant):
    """Stop after step 3 and resume == 6 steps straight: weights, B and losses, bit for bit (with
    delayed scaling: the amax histories too), in the proxy mode and in the adapter mode."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    opts = ["--steps", "6", "--eval-every", "0", "--save-every", "0", *variant]
    assert finetune(inputs, straight, *opts) == 0
    assert finetune(inputs, resumed, *opts, "--stop-after", "3") == 0
    assert not (resumed / "final").exists()
    # On resume the run's own options are used: only the directory is needed.
    assert main(["finetune", "--output-dir", str(resumed), "--resume", "--no-progress",
                 "--device", "cpu"]) == 0
    a = load_file(str(straight / "final" / "falqon_model.safetensors"))
    b = load_file(str(resumed / "final" / "falqon_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].flatten().view(torch.uint8),
                           b[key].flatten().view(torch.uint8)), key

    def losses(run):
        return [json.loads(line).get("loss") for line in
                (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(straight) == losses(resumed)
    config = json.loads((resumed / "final" / "falqon_config.json").read_text())["config"]
    delayed = "--amax-history-len" in variant
    assert config["amax_history_len"] == (4 if delayed else 0)
    assert config["transposed_copy"] == delayed
    assert config["update_mode"] == ("adapter" if delayed else "proxy")
    assert any(key.endswith(".amax_history") for key in a) == delayed
    if delayed:  # the adapter mode trained B (it is never folded, so it is not zero)
        assert all(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B"))
    else:  # the proxy options reached the run's config
        assert config["keep_residual"] and config["topk"] == 4 and config["warmup_steps"] == 2


def test_runs_saved_before_later_options_resume_with_their_defaults():
    """A run.json (and its checkpoints) written before --amax-history-len, --transposed-copy and
    --update-mode existed holds none of them: it is the run with their values of then (the proxy
    update), and a resume that sets them otherwise is refused like any other changed option."""
    from falqon.cli.run_options import FINGERPRINT, LATER_OPTION_DEFAULTS
    from falqon.cli.run_options import compare_run as _compare_run
    from falqon.config import FalqonError

    assert LATER_OPTION_DEFAULTS["update_mode"] == "proxy" and "update_mode" in FINGERPRINT
    opts = {**{k: 1 for k in FINGERPRINT}, **LATER_OPTION_DEFAULTS}
    old_run = {"options": {k: v for k, v in opts.items() if k not in LATER_OPTION_DEFAULTS}}
    _compare_run(old_run, opts, pathlib.Path("run"))
    with pytest.raises(FalqonError, match=r"amax_history_len: 0 -> 16"):
        _compare_run(old_run, {**opts, "amax_history_len": 16}, pathlib.Path("run"))
    with pytest.raises(FalqonError, match=r"transposed_copy: False -> True"):
        _compare_run(old_run, {**opts, "transposed_copy": True}, pathlib.Path("run"))
    with pytest.raises(FalqonError, match=r"update_mode: 'proxy' -> 'adapter'"):
        _compare_run(old_run, {**opts, "update_mode": "adapter"}, pathlib.Path("run"))


def test_a_run_from_before_update_mode_resumes_in_the_proxy_mode(inputs, tmp_path, capsys):
    """A proxy run whose run.json lacks update_mode (as every run.json written before the option
    existed) resumes, with no option given, as the proxy run it was: not in today's default
    adapter mode, and not refused as a changed run."""
    out = tmp_path / "run"
    assert finetune(inputs, out, *PROXY, "--steps", "4", "--stop-after", "2", "--save-every",
                    "2", "--no-plot") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["update_mode"] == "proxy"
    del run["options"]["update_mode"]
    (out / "run.json").write_text(json.dumps(run))
    checkpoint = out / "checkpoints" / "step-0000002"
    state = json.loads((checkpoint / "falqon_run_checkpoint.json").read_text())
    del state["options"]["update_mode"]  # the checkpoint's copy of the options, as then
    (checkpoint / "falqon_run_checkpoint.json").write_text(json.dumps(state))
    meta = json.loads((checkpoint / "falqon_config.json").read_text())
    del meta["config"]["update_mode"]  # and its FalqonConfig, as then
    (checkpoint / "falqon_config.json").write_text(json.dumps(meta))
    assert main(["finetune", "--output-dir", str(out), "--resume", "--no-progress", "--no-plot",
                 "--device", "cpu"]) == 0
    config = json.loads((out / "final" / "falqon_config.json").read_text())["config"]
    assert config["update_mode"] == "proxy" and config["topk"] == 4
    capsys.readouterr()
    # Asking for the adapter mode on resume is a different run.
    assert main(["finetune", "--output-dir", str(out), "--resume", "--update-mode", "adapter",
                 "--no-progress", "--device", "cpu"]) == 2
    one_error_line(capsys, "update_mode: 'proxy' -> 'adapter'")


def test_an_adapter_run_from_before_adapter_gain_resumes_with_gain_1(inputs, tmp_path, capsys):
    """An adapter-mode run whose run.json and checkpoint lack adapter_gain (written before the
    option existed, when the adapter had no gain) resumes with gain 1, the model it trained, not
    today's default gain; --adapter-gain with the proxy mode is refused in one line."""
    out = tmp_path / "run"
    assert finetune(inputs, out, "--adapter-gain", "1", "--steps", "4", "--stop-after", "2",
                    "--save-every", "2", "--no-plot") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["adapter_gain"] == 1.0
    del run["options"]["adapter_gain"]
    (out / "run.json").write_text(json.dumps(run))
    checkpoint = out / "checkpoints" / "step-0000002"
    state = json.loads((checkpoint / "falqon_run_checkpoint.json").read_text())
    del state["options"]["adapter_gain"]
    (checkpoint / "falqon_run_checkpoint.json").write_text(json.dumps(state))
    meta = json.loads((checkpoint / "falqon_config.json").read_text())
    del meta["config"]["adapter_gain"]
    (checkpoint / "falqon_config.json").write_text(json.dumps(meta))
    assert main(["finetune", "--output-dir", str(out), "--resume", "--no-progress", "--no-plot",
                 "--device", "cpu"]) == 0
    config = json.loads((out / "final" / "falqon_config.json").read_text())["config"]
    assert config["update_mode"] == "adapter" and config["adapter_gain"] == 1.0
    capsys.readouterr()
    assert main(["finetune", "--output-dir", str(tmp_path / "proxy"), *PROXY,
                 "--adapter-gain", "2", "--no-progress", "--device", "cpu"]) == 2
    one_error_line(capsys, "--adapter-gain only applies to the adapter mode")
    assert not (tmp_path / "proxy").exists()


def test_update_mode_is_in_the_fingerprint_and_proxy_options_need_it(inputs, tmp_path, capsys):
    """--update-mode is recorded in run.json; the proxy update's options are refused, in one
    line and before anything is written, when the run is in the adapter mode (the default, or a
    resumed adapter run); a resume with another --update-mode is a different run."""
    out = tmp_path / "run"
    assert finetune(inputs, out, "--steps", "2", "--stop-after", "1", "--save-every", "1",
                    "--no-plot") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["update_mode"] == "adapter"
    capsys.readouterr()
    before = snapshot(tmp_path)
    for option, message in ((["--topk", "4"], "--topk only applies to the proxy update"),
                            (["--keep-residual", "--warmup-steps", "2"],
                             "--warmup-steps, --keep-residual only apply to the proxy update"),
                            (["--warmup-topk", "3", "--update-mode", "adapter"],
                             "--warmup-topk only applies")):
        assert finetune(inputs, tmp_path / "fresh", *option) == 2
        one_error_line(capsys, message)
        assert snapshot(tmp_path) == before
    # Resuming the adapter run: a proxy option is refused the same way ...
    assert main(["finetune", "--output-dir", str(out), "--resume", "--topk", "3",
                 "--no-progress", "--device", "cpu"]) == 2
    one_error_line(capsys, "--topk only applies to the proxy update")
    # ... and switching the mode is a different run.
    assert main(["finetune", "--output-dir", str(out), "--resume", "--update-mode", "proxy",
                 "--no-progress", "--device", "cpu"]) == 2
    one_error_line(capsys, "update_mode: 'adapter' -> 'proxy'")
    assert snapshot(tmp_path) == before


def test_adapter_init_is_melded_recorded_and_in_the_fingerprint(inputs, tmp_path, capsys):
    """--adapter-init reaches the FalqonConfig (checkpoint) and run.json; a run.json from before
    it resumes as error_svd; a resume with another init is a different run; with the proxy
    mode it is refused in one line, before anything is written."""
    out = tmp_path / "run"
    assert finetune(inputs, out, "--adapter-init", "random", "--steps", "2", "--stop-after", "1",
                    "--save-every", "1", "--no-plot") == 0
    assert json.loads((out / "run.json").read_text())["options"]["adapter_init"] == "random"
    meta = json.loads((out / "checkpoints" / "step-0000001" / "falqon_config.json").read_text())
    assert meta["config"]["adapter_init"] == "random"
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main(["finetune", "--output-dir", str(out), "--resume", "--adapter-init",
                 "weight_svd", "--no-progress", "--device", "cpu"]) == 2
    one_error_line(capsys, "adapter_init: 'random' -> 'weight_svd'")
    assert finetune(inputs, tmp_path / "proxy", *PROXY, "--adapter-init", "random") == 2
    one_error_line(capsys, "--adapter-init random only applies to the adapter mode")
    assert snapshot(tmp_path) == before
    # A run from before --adapter-init melded error_svd's A: so does its resume.
    run = json.loads((out / "run.json").read_text())
    del run["options"]["adapter_init"]
    (out / "run.json").write_text(json.dumps(run))
    assert main(["finetune", "--output-dir", str(out), "--resume", "--adapter-init", "random",
                 "--no-progress", "--device", "cpu"]) == 2
    one_error_line(capsys, "adapter_init: 'error_svd' -> 'random'")


def test_finetune_from_a_model_directory(inputs, tmp_path, capsys):
    from falqon.data import byte_tokenizer
    from workflow_testing import tiny_causal_lm

    model_dir = tmp_path / "model"
    tiny_causal_lm("llama", pad_token_id=256, bos_token_id=257, eos_token_id=258).save_pretrained(
        model_dir)
    out = tmp_path / "run"
    common = ["--data", inputs["data"], "--no-progress", "--no-plot", "--batch-size", "2",
              "--seq-len", "48", "--rank", "4", "--device", "cpu"]
    # No tokenizer files: the byte-level tokenizer stands in (the vocabulary has room for it).
    assert main(["finetune", "--model", str(model_dir), "--output-dir", str(out), "--steps", "3",
                 "--stop-after", "1", "--save-every", "1", *common]) == 0
    assert "has no tokenizer; using the byte-level tokenizer" in capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    # The model is its weights (a moved model resumes, other weights are refused) ...
    assert run["options"]["model"] == "weights:" + run["base_fingerprint"]
    assert run["base_model"] == str(model_dir.resolve())  # ... found where it was
    # PEFT LoRA's usual learning rate: the default for a (presumably pretrained) model.
    assert run["options"]["lr"] == 2e-4 and run["options"]["update_mode"] == "adapter"
    assert not (out / "base-model").exists()  # the user's directory is the base
    # Resume from a named checkpoint of the run.
    assert main(["finetune", "--output-dir", str(out), "--resume",
                 str(out / "checkpoints" / "step-0000001"), "--no-progress", "--device",
                 "cpu"]) == 0
    assert (out / "final" / "falqon_config.json").is_file()
    capsys.readouterr()
    byte_tokenizer().save_pretrained(model_dir)
    assert main(["finetune", "--model", str(model_dir), "--output-dir", str(tmp_path / "r2"),
                 "--steps", "1", *common]) == 0
    assert "has no tokenizer" not in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    assert main(["finetune", "--model", str(broken), "--output-dir", str(tmp_path / "r3"),
                 *common]) == 2
    one_error_line(capsys, "is not a loadable causal LM")
    assert not (tmp_path / "r3").exists()


def test_default_model_and_stdlib_data(tmp_path, capsys):
    """The shipped tiny-llama preset and the standard-library data, for one step."""
    out = tmp_path / "run"
    assert main(["finetune", "--output-dir", str(out), "--steps", "1", "--batch-size", "1",
                 "--seq-len", "32", "--no-progress", "--no-plot", "--eval-size", "1",
                 "--device", "cpu"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["model"] == "config:tiny-llama"
    assert run["options"]["data"].startswith("stdlib:python-")
    # The adapter mode by default, at its default learning rate for random weights.
    assert run["options"]["update_mode"] == "adapter" and run["options"]["lr"] == 2e-3
    assert run["template"] == "short"
    config = json.loads((out / "base-model" / "config.json").read_text())
    assert (config["hidden_size"], config["model_type"]) == (256, "llama")
    assert "falqon: melded 28 of 29 linear layers" in capsys.readouterr().out


def test_bad_inputs_give_one_line_and_leave_files_intact(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune(inputs, run, "--steps", "2", "--save-every", "1", "--keep-checkpoints",
                    "5", "--no-plot") == 0
    capsys.readouterr()
    before = snapshot(tmp_path)

    def fails(argv, match):
        assert main(argv) == 2
        one_error_line(capsys, match)
        assert snapshot(tmp_path) == before

    fresh = str(tmp_path / "fresh")
    base = ["finetune", "--output-dir", fresh, "--no-progress"]
    fails(base + ["--data", str(tmp_path / "missing.json")], "missing.json does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a", output}\n]')
    before = snapshot(tmp_path)
    fails(base + ["--data", str(bad)], "bad.json:3: invalid JSON")
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    before = snapshot(tmp_path)
    fails(base + ["--data", str(bad)], "bad.json:2: record 1 has no 'output' field")
    fails(base + ["--model", str(tmp_path / "run" / "checkpoints")], "is not a model")
    fails(base + ["--model", str(bad)], "is not a model")
    fails(base + ["--model", str(tmp_path / "nowhere")], "does not exist")
    fails(base + ["--model-config", "llama-7b"], "is neither a preset")
    # An output directory that holds a run: not without --resume, not with other options.
    fails(["finetune", "--output-dir", str(run), "--no-progress"], "already holds a run")
    fails(["finetune", "--output-dir", str(run), "--resume", "--lr", "0.01"],
          "holds a different run (lr: 0.05 -> 0.01)")
    fails(["finetune", "--output-dir", str(run), "--resume", "--data", str(inputs["config"])],
          "record 0 has no 'instruction' field")  # caught before anything else
    fails(["finetune", "--output-dir", str(tmp_path), "--no-progress"], "not empty and holds "
          "no falqon run")
    fails(["finetune", "--output-dir", str(tmp_path / "fresh"), "--resume"],
          "is not a falqon run (nothing to resume): run.json is missing")
    # A truncated checkpoint: resuming refuses it before loading anything.
    latest = run / "checkpoints" / "step-0000002"
    original = snapshot(tmp_path)
    for name in ("falqon_model.safetensors", "optimizer.pt", "trainer_state.json"):
        path = latest / name
        path.write_bytes(original[str(path.relative_to(tmp_path))][:-7])
        before = snapshot(tmp_path)
        fails(["finetune", "--output-dir", str(run), "--resume", "--no-progress"],
              "truncated or corrupt")
        path.write_bytes(original[str(path.relative_to(tmp_path))])
    before = snapshot(tmp_path)
    fails(["export", str(run), str(run)], "exists and is not empty")
    fails(["export", str(tmp_path / "bad.json"), str(tmp_path / "exp")], "is not a directory")


def test_bench_on_a_cpu_shows_no_speed_up(capsys):
    """On a device without FP8 tensor cores the timings are of the emulation: bench says so
    first, and headlines no ratio."""
    assert main(["bench", "--tokens", "32", "--in-features", "64", "--out-features", "64",
                 "--iters", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("falqon bench: these timings say nothing about FALQON's speed")
    assert any("FALQON layer" in line for line in printed)
    assert not any(re.search(r"\d\.\d\dx\)", line) for line in printed), printed


@pytest.mark.parametrize("cc, covered, expected", [
    ((8, 0), True, "has no FP8 tensor cores"), ((9, 0), False, "do not run on"),
    ((9, 0), True, None)])
def test_bench_tells_an_fp8_gpu_from_others(monkeypatch, cc, covered, expected):
    from falqon.cli import bench

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    monkeypatch.setattr("falqon.build_info", lambda: {"with_cuda": True,
                                                      "cuda_archs": ["9.0a" if covered else "8.9"]})
    monkeypatch.delenv("FALQON_FORCE_EMULATION", raising=False)
    why = bench.emulated_because(torch.device("cuda"))
    assert why is None if expected is None else expected in why


def test_info_and_version(capsys, monkeypatch):
    """`falqon info [--json]` and `falqon --version` work (info once exited 2, "unrecognized
    arguments: info")."""
    assert main(["info"]) == 0
    assert capsys.readouterr().out.startswith(f"falqon {falqon.__version__}")
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["falqon"] == falqon.__version__
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"falqon {falqon.__version__} (torch ")
    monkeypatch.setitem(sys.modules, "falqon.info", None)  # the module is absent
    assert main(["info"]) == 2
    one_error_line(capsys, "`falqon info` is not available")


def test_console_script_process(tmp_path):
    """A real process: exit status 2 and one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "falqon.cli", "finetune", "--data",
                           str(tmp_path / "x.jsonl"), "--output-dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"falqon: error: data file {tmp_path / 'x.jsonl'} does not exist"
    assert not (tmp_path / "o").exists()


def test_an_old_transformers_is_refused_in_one_line_before_anything_is_written(tmp_path,
                                                                                monkeypatch):
    from falqon.cli import trainer_loop

    trainer_loop.check_transformers("4.57.0")
    trainer_loop.check_transformers("5.24.0.dev0")
    with pytest.raises(FalqonError, match=r"needs transformers >= 4\.57 .*found 4\.56\.2"):
        trainer_loop.check_transformers("4.56.2")
    monkeypatch.setattr(trainer_loop.transformers, "__version__", "4.46.1")
    out = tmp_path / "run"
    assert main(["finetune", "--output-dir", str(out), "--steps", "1"]) == 2
    assert not out.exists()
