"""`falqon finetune --fuse {auto,liger,compile,off}` on the CPU: auto fuses nothing there, a
missing Liger is refused before anything is written, and a Liger-fused run (its kernels replaced
by reference code, tests/test_fusion.py's FakeLiger) trains through the fused loss with the
losses of an unfused run."""

from __future__ import annotations

import json

import pytest

from falqon.fusion import liger
from test_fusion import FakeLiger, hide_liger, on_a_gpu, skip_compiling
from workflow_testing import cli_finetune

pytest.importorskip("transformers")

TINY_RUN = ["--batch-size", "2", "--seq-len", "64", "--rank", "4", "--lr", "0.05", "--steps", "3",
            "--no-progress", "--no-plot", "--device", "cpu", "--eval-every", "0"]


def finetune(inputs, out, *extra):
    return cli_finetune(inputs, out, TINY_RUN, *extra)


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_fuse_option_values(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        finetune(inputs, tmp_path / "run", "--fuse", "triton")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fuse: invalid choice: 'triton'" in err[0], err
    assert not (tmp_path / "run").exists()


def test_missing_liger_writes_nothing(inputs, tmp_path, capsys, monkeypatch):
    hide_liger(monkeypatch)
    out = tmp_path / "run"
    assert finetune(inputs, out, "--fuse", "liger") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'falqon[fast]'" in err[0], err
    assert not out.exists()


def test_liger_run_trains_through_the_fused_loss(inputs, tmp_path, capsys, monkeypatch):
    assert finetune(inputs, tmp_path / "auto") == 0  # --fuse auto: nothing on the CPU
    assert "falqon.fuse" not in capsys.readouterr().out
    run = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert run["settings"]["fuse"] == "auto"

    fake = FakeLiger()
    monkeypatch.setattr(liger, "load", lambda: fake)
    monkeypatch.setattr(liger, "on_gpu", lambda t: True)
    assert finetune(inputs, tmp_path / "liger", "--fuse", "liger") == 0
    assert "falqon.fuse('liger'): Liger Kernel (rms_norm x5, swiglu x2, rope x2, " \
           "fused_linear_cross_entropy x1)" in capsys.readouterr().out
    # 3 steps of one micro-batch (the fused loss) and the evals at steps 0 and 3 (in eval mode
    # Liger's forward makes the logits).
    assert fake.calls["lce"] == 5 and fake.fused_losses == 3
    assert losses(tmp_path / "liger") == pytest.approx(losses(tmp_path / "auto"), rel=1e-5)
    run = json.loads((tmp_path / "liger" / "run.json").read_text())
    assert run["settings"]["fuse"] == "liger"


def test_fuse_lines_say_what_a_gpu_run_gets(capsys, monkeypatch):
    """On a GPU the line is printed whatever auto chose (its reasons are worth reading), and a
    compiled run says that its first step compiles."""
    from falqon.cli import finetune as cli_finetune_module
    from workflow_testing import tiny_causal_lm

    on_a_gpu(monkeypatch, compile_unavailable="no Triton here")
    monkeypatch.setattr(liger, "unavailable", lambda m: "Liger Kernel is not installed")
    cli_finetune_module._fuse(tiny_causal_lm("llama"), "auto")
    out = capsys.readouterr().out
    assert "compile: no Triton here" in out and "liger: Liger Kernel is not installed" in out
    on_a_gpu(monkeypatch)
    skip_compiling(monkeypatch)
    cli_finetune_module._fuse(tiny_causal_lm("llama"), "auto")
    out = capsys.readouterr().out
    assert "falqon.fuse('auto'): torch.compile (compiled_layers x2)" in out
    assert "compile at the first step" in out
