"""`falqon finetune`'s run directories are never stranded: options checked and the model melded
before anything is written, an interrupted start continued, relocatable runs tied to their base
weights, the final save repaired, a lock, every option restored on --resume, disk errors in one
line; and the CLI's inputs: a YAML config, chat and prompt/completion data, --report-to,
progress bars. Tiny models on the CPU (tests/test_cli.py has the rest)."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

from falqon.cli import main
from workflow_testing import cli_finetune, records, snapshot, tiny_causal_lm

pytest.importorskip("transformers")

TINY_RUN = ["--batch-size", "2", "--seq-len", "64", "--rank", "4", "--lr", "0.05",
            "--no-progress", "--no-plot", "--device", "cpu", "--eval-every", "0"]


def finetune(inputs, out, *extra):
    return cli_finetune(inputs, out, TINY_RUN, *extra)


def resume(out, *extra):
    return main(["finetune", "--output-dir", str(out), "--resume", "--no-progress", *extra])


def one_error_line(capsys, match):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("falqon: error: "), err
    assert match in err[0], err[0]


def same_weights(a_dir, b_dir):
    a = load_file(str(a_dir / "falqon_model.safetensors"))
    b = load_file(str(b_dir / "falqon_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].flatten().view(torch.uint8),
                           b[key].flatten().view(torch.uint8)), key


@pytest.fixture(scope="module")
def straight(inputs, tmp_path_factory):
    """A 4-step run, uninterrupted: what every interrupted run below must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert finetune(inputs, out, "--steps", "4", "--save-every", "2") == 0
    return out


@pytest.mark.parametrize("option, message", [
    (["--rank", "1000"], "no layer can be melded"),
    (["--target-modules", "no_such_layer"], "no layer can be melded"),
    (["--report-to", "wandb"], "--report-to wandb needs the wandb package"),
])
def test_a_rejected_option_writes_nothing(inputs, tmp_path, capsys, monkeypatch, option,
                                          message):
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    assert finetune(inputs, out, "--steps", "2", *option) == 2
    one_error_line(capsys, message)
    assert not out.exists()


def test_nan_weights_are_refused_before_anything_is_written(inputs, tmp_path, capsys):
    from falqon.data import byte_tokenizer

    model_dir = tmp_path / "model"
    model = tiny_causal_lm("llama", pad_token_id=256, bos_token_id=257, eos_token_id=258)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(model_dir), "--data", inputs["data"], "--output-dir",
                 str(out), *TINY_RUN]) == 2
    one_error_line(capsys, "has non-finite weights: model.layers.0.self_attn.q_proj.weight")
    assert not out.exists()


def test_an_interrupted_start_is_continued(inputs, tmp_path, capsys, monkeypatch, straight):
    """A SIGINT before the first checkpoint: a plain re-run, or --resume, starts the run again
    and ends where an uninterrupted run does, bit for bit."""
    from falqon.cli.trainer_loop import FalqonTrainer

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    for i, again in enumerate((["--steps", "4", "--save-every", "2"], ["--resume"])):
        out = tmp_path / f"run{i}"
        with monkeypatch.context() as m:  # a SIGINT in the first step
            m.setattr(FalqonTrainer, "training_step", interrupted)
            assert finetune(inputs, out, "--steps", "4", "--save-every", "2") == 130
        assert (out / "run.json").is_file()
        assert not any((out / "checkpoints").glob("step-*"))
        cmd = finetune(inputs, out, *again) if i == 0 else resume(out)
        assert cmd == 0
        same_weights(straight / "final", out / "final")


def test_a_start_that_stopped_before_run_json_is_cleared(inputs, tmp_path, straight):
    out = tmp_path / "run"
    (out / "base-model.partial").mkdir(parents=True)
    (out / "base-model.partial" / "config.json").write_text("{")
    (out / ".falqon.lock").write_text("")
    assert finetune(inputs, out, "--steps", "4", "--save-every", "2") == 0
    assert not (out / "base-model.partial").exists()
    same_weights(straight / "final", out / "final")


def test_runs_are_relocatable_and_tied_to_their_base_weights(inputs, tmp_path, capsys,
                                                             straight):
    first = tmp_path / "first"
    assert finetune(inputs, first, "--steps", "4", "--save-every", "2", "--stop-after", "2") == 0
    run = json.loads((first / "run.json").read_text())
    assert run["base_model"] == "base-model" and run["base_fingerprint"].startswith("sha256:")
    moved = tmp_path / "moved"
    shutil.copytree(first, tmp_path / "copy")
    first.rename(moved)
    assert resume(moved) == 0  # a moved run resumes with its own base
    same_weights(straight / "final", moved / "final")
    # A copy whose base holds other weights of the same shapes is refused.
    other = tiny_causal_lm("llama", seed=5, pad_token_id=256, bos_token_id=257, eos_token_id=258)
    other.save_pretrained(tmp_path / "copy" / "base-model")
    capsys.readouterr()
    before = snapshot(tmp_path / "copy")
    assert resume(tmp_path / "copy") == 2
    one_error_line(capsys, "is not the one this run started from")
    assert snapshot(tmp_path / "copy") == before


def test_a_cut_final_save_is_repaired_on_resume(inputs, tmp_path, capsys, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "final" / "falqon_config.json").unlink()  # killed mid-save (before final/ by rename)
    capsys.readouterr()
    assert resume(out) == 0
    assert "had finished training; its model saved to" in capsys.readouterr().out
    same_weights(straight / "final", out / "final")
    assert resume(out) == 0
    assert "already complete" in capsys.readouterr().out


def test_a_second_run_in_the_same_directory_is_refused(inputs, tmp_path, capsys, straight):
    from falqon.cli.run_dir import RunLock

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    with RunLock(out):
        before = snapshot(out)
        assert resume(out) == 2
        one_error_line(capsys, "is in use by another falqon run (pid ")
        assert finetune(inputs, out, "--steps", "4", "--save-every", "2") == 2
        one_error_line(capsys, "is in use by another falqon run")
    assert snapshot(out) == before


def test_every_option_is_restored_on_resume(inputs, tmp_path):
    out = tmp_path / "run"
    assert finetune(inputs, out, "--steps", "5", "--save-every", "1", "--keep-checkpoints", "3",
                    "--eval-every", "2", "--stop-after", "1") == 0
    assert resume(out, "--stop-after", "4") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["step-0000002", "step-0000003", "step-0000004"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    # Given again, an option is the new value, for this and the next resume.
    assert resume(out, "--keep-checkpoints", "1") == 0
    assert json.loads((out / "run.json").read_text())["settings"]["keep_checkpoints"] == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000005"]


def test_a_full_disk_is_one_line_and_the_run_resumes(inputs, tmp_path, capsys, monkeypatch,
                                                     straight):
    import falqon.checkpoint as C

    real = C.save_file
    calls = []

    def full(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) > 1:  # the first checkpoint is written, the second is not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(C, "save_file", full)
    out = tmp_path / "run"
    assert finetune(inputs, out, "--steps", "4", "--save-every", "2") == 2
    one_error_line(capsys, "No space left on device")
    monkeypatch.setattr(C, "save_file", real)
    assert resume(out) == 0
    same_weights(straight / "final", out / "final")


def test_kill_and_resume_a_real_process(inputs, tmp_path, capsys):
    """SIGKILL a running `falqon finetune` (its lock refuses a second run meanwhile), resume it:
    its checkpoint equals an uninterrupted run's, bit for bit. The process is stopped (SIGSTOP)
    as soon as a checkpoint shows, so the lock check does not race its training; it may have
    saved more checkpoints by then, so the run is resumed 4 steps past its last one."""
    out = tmp_path / "killed"
    opts = ["--model-config", inputs["config"], "--data", inputs["data"], *TINY_RUN,
            "--steps", "400", "--save-every", "2", "--keep-checkpoints", "200"]
    proc = subprocess.Popen([sys.executable, "-m", "falqon.cli", "finetune", "--output-dir",
                             str(out), *opts], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "step-0000004").is_dir():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGSTOP)
        assert resume(out) == 2
        one_error_line(capsys, "is in use by another falqon run")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    last = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert 4 <= last < 400
    stop = str(last + 4)
    assert resume(out, "--device", "cpu", "--stop-after", stop) == 0
    straight = tmp_path / "straight"
    assert main(["finetune", "--output-dir", str(straight), *opts, "--stop-after", stop]) == 0
    step = f"step-{last + 4:07d}"
    same_weights(straight / "checkpoints" / step, out / "checkpoints" / step)

    def losses(run):
        return [json.loads(line).get("loss") for line in
                (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(out) == losses(straight)


def test_a_kill_mid_save_keeps_the_last_checkpoint(inputs, tmp_path, monkeypatch, straight):
    """Interrupted while the Trainer writes a checkpoint (its optimizer written, its RNG state
    not): the checkpoint is not in checkpoints/ (the Trainer writes into .partial/, falqon
    renames it once whole), the previous one is, and --resume ends where an uninterrupted run
    does, bit for bit."""
    from falqon.cli.trainer_loop import FalqonTrainer

    def killed(self, output_dir):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(FalqonTrainer, "_save_rng_state", killed)
        assert finetune(inputs, out, "--steps", "4", "--save-every", "2") == 130
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == []
    assert (out / "checkpoints" / ".partial" / "checkpoint-2" / "optimizer.pt").is_file()
    assert resume(out) == 0
    same_weights(straight / "final", out / "final")


def test_a_checkpoint_of_the_old_loop_is_refused_in_one_line(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(inputs, out, "--steps", "4", "--save-every", "2", "--stop-after", "2") == 0
    checkpoint = out / "checkpoints" / "step-0000002"
    (checkpoint / "falqon_run_checkpoint.json").unlink()  # as falqon's own loop wrote them
    (checkpoint / "training_state.safetensors").write_bytes(b"")
    capsys.readouterr()
    assert resume(out) == 2
    one_error_line(capsys, "was written by falqon's own training loop")


def test_a_yaml_config_file_beside_the_flags(inputs, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_config: {inputs['config']}\ndata: {inputs['data']}\n"
                      "rank: 4\nsteps: 2\nbatch-size: 2\nseq_len: 64\nlr: 0.05\n"
                      "no_progress: true\nno_plot: true\ndevice: cpu\neval_every: 0\n"
                      "target_modules: [q_proj, v_proj]\n")
    out = tmp_path / "run"
    assert main(["finetune", "--config", str(config), "--output-dir", str(out),
                 "--steps", "3"]) == 0
    options = json.loads((out / "run.json").read_text())["options"]
    assert (options["steps"], options["rank"]) == (3, 4)  # the flag overrides the file
    assert options["target_modules"] == ["q_proj", "v_proj"]
    capsys.readouterr()
    config.write_text("rank: 4\nranks: 8\n")
    assert main(["finetune", "--config", str(config), "--output-dir", str(tmp_path / "x")]) == 2
    one_error_line(capsys, "'ranks' is not a finetune option")
    config.write_text("rank: [4\n")
    assert main(["finetune", "--config", str(config), "--output-dir", str(tmp_path / "x")]) == 2
    one_error_line(capsys, "run.yaml:2: invalid YAML")
    assert not (tmp_path / "x").exists()


def chat_model(path, template=True):
    from falqon.data import byte_tokenizer

    tiny_causal_lm("llama", pad_token_id=256, bos_token_id=257, eos_token_id=258).save_pretrained(
        path)
    tok = byte_tokenizer()
    if template:
        tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>"
                             "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(path)
    return path


def test_chat_data_through_the_chat_template(tmp_path, capsys):
    chats = [{"messages": [{"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": r["output"]}]} for r in records(24)]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in chats))
    common = ["--data", str(data), *TINY_RUN, "--steps", "1"]
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(chat_model(tmp_path / "m")), "--output-dir",
                 str(out), *common]) == 0
    assert (out / "final" / "falqon_config.json").is_file()
    capsys.readouterr()
    assert main(["finetune", "--model", str(chat_model(tmp_path / "plain", template=False)),
                 "--output-dir", str(tmp_path / "r2"), *common]) == 2
    one_error_line(capsys, "the tokenizer has no chat template")
    assert not (tmp_path / "r2").exists()


def test_report_to_and_progress_bars(inputs, tmp_path, capsys, monkeypatch):
    logged = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)), finish=lambda: logged.append(kw))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    argv = [a for a in TINY_RUN if a != "--no-progress"]
    assert main(["finetune", "--model-config", inputs["config"], "--data", inputs["data"],
                 "--output-dir", str(tmp_path / "run"), *argv, "--steps", "2",
                 "--report-to", "wandb"]) == 0
    err = capsys.readouterr().err
    assert "falqon tokenise" in err and "falqon eval" in err and "falqon meld" in err
    assert (0, {"eval/loss": logged[0][1]["eval/loss"]}) == logged[0]
    assert [s for s, v in logged[1:-1] if "train/loss" in v] == [1, 2]
    assert logged[-1]["id"] == json.loads((tmp_path / "run" / "run.json").read_text())["id"]


def test_a_resume_keeps_the_checkpoints_proxy_update_counters(inputs, tmp_path):
    """The proxy-update counter (which sets the warm-up k) is the checkpoint's, not the Trainer's
    global_step: a step skipped for a non-finite B is not counted."""
    out = tmp_path / "run"
    assert finetune(inputs, out, "--update-mode", "proxy", "--topk", "4", "--steps", "4",
                    "--save-every", "2", "--stop-after", "2") == 0
    meta_file = out / "checkpoints" / "step-0000002" / "falqon_config.json"
    meta = json.loads(meta_file.read_text())
    assert meta["state"] == {"step": 2, "skipped_steps": 0}
    meta["state"] = {"step": 1, "skipped_steps": 1}  # as if step 2 had been skipped
    meta_file.write_text(json.dumps(meta))
    assert resume(out) == 0
    state = json.loads((out / "final" / "falqon_config.json").read_text())["state"]
    assert state == {"step": 3, "skipped_steps": 1}


def test_a_trained_A_run_resumes_bit_exact(inputs, tmp_path):
    """--train-a (A trained too): stopped and resumed through the Trainer's checkpoint, the run
    ends with the straight run's B, lora_A and A rows, bit for bit."""
    straight = tmp_path / "straight"
    assert finetune(inputs, straight, "--steps", "4", "--save-every", "2", "--train-a") == 0
    out = tmp_path / "run"
    assert finetune(inputs, out, "--steps", "4", "--save-every", "2", "--train-a",
                    "--stop-after", "2") == 0
    assert resume(out) == 0
    same_weights(straight / "final", out / "final")
    options = json.loads((out / "run.json").read_text())["options"]
    assert options["train_a"] is True and options["adapter_gain"] == 2.0
