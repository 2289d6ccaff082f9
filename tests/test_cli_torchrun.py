"""`falqon finetune` under torchrun: two gloo processes on the CPU train the tiny model with DDP,
rank 0 alone writes, and the result is the one-process run's (each rank runs one of the step's
two micro-batches, so every forward is the one process's and DDP's mean of the gradients, the
loss scaled by the world size, is its sum: bit-identical on the CPU's reference ops); a
one-process --resume continues the two-process run; a bad option fails once, exit 2 on both."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from falqon.cli import main
from workflow_testing import records, tiny_config_file, write_json

pytest.importorskip("transformers")
TORCHRUN = pathlib.Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(),
                                reason="needs torchrun and torch.distributed")
ROOT = pathlib.Path(__file__).resolve().parents[1]
# Two micro-batches per step: one per process under torchrun, both in one process alone.
RUN = ["--batch-size", "2", "--grad-accum", "2", "--seq-len", "64", "--rank", "4", "--lr", "0.05",
       "--no-progress", "--device", "cpu", "--eval-every", "0", "--no-plot"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return ["--model-config", str(tiny_config_file(root)),
            "--data", str(write_json(root / "data.json", records(24)))]


def torchrun(*argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--standalone",
                           "-m", "falqon.cli", "finetune", *argv],
                          capture_output=True, text=True, env=env, timeout=300)


def final(out: pathlib.Path) -> dict:
    return load_file(str(out / "final" / "falqon_model.safetensors"))


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8),
                                              y.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("mode", ["proxy", pytest.param("adapter", marks=pytest.mark.slow)])
def test_two_processes_train_like_one_and_one_resumes_them(inputs, tmp_path, mode):
    extra = ["--update-mode", mode] + (["--topk", "4"] if mode == "proxy" else [])
    two, one = tmp_path / "two", tmp_path / "one"
    done = torchrun(*inputs, "--output-dir", str(two), "--steps", "3", "--save-every", "2",
                    *RUN, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("falqon: melded") == 1  # rank 0 alone prints
    assert sorted(p.name for p in two.iterdir()) == [".falqon.lock", "base-model", "checkpoints",
                                                     "final", "metrics.jsonl", "run.json"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-0000002",
                                                                       "step-0000003"]
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert json.loads((two / "run.json").read_text())["options"]["grad_accum"] == 2
    assert main(["finetune", *inputs, "--output-dir", str(one), "--steps", "3", *RUN,
                 *extra]) == 0
    a, b = final(two), final(one)
    assert any("lora_B" in k for k in a) and a.keys() == b.keys()
    assert all(same(a[k], b[k]) for k in a)  # B and the FP8 weights, bit for bit
    one_rows = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == \
        pytest.approx([r["loss"] for r in one_rows if "loss" in r], rel=1e-6)
    # One process resumes the two-process run from its step-2 checkpoint: the same last step.
    shutil.rmtree(two / "final")
    assert main(["finetune", "--output-dir", str(two), "--resume",
                 str(two / "checkpoints" / "step-0000002")]) == 0
    a = final(two)
    assert all(same(a[k], b[k]) for k in a)


def test_an_error_is_one_line_from_rank_0_and_exit_2_on_every_rank(inputs, tmp_path):
    bad = RUN[:RUN.index("--grad-accum")] + ["--grad-accum", "3"] + \
        RUN[RUN.index("--grad-accum") + 2:]
    done = torchrun(*inputs, "--output-dir", str(tmp_path / "run"), "--steps", "2", *bad)
    errors = [line for line in done.stderr.splitlines() if "falqon: error:" in line]
    assert len(errors) == 1 and "--grad-accum 3 is not a multiple of the 2 processes" in errors[0]
    # Every rank exits with 2; torchrun's agent reports the ranks it saw fail, and may stop a
    # rank that had not exited yet with SIGTERM (-15) once the first one has failed.
    codes = {int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", done.stderr)}
    assert done.returncode != 0 and 2 in codes and codes <= {2, -15}, done.stderr[-3000:]
    assert not (tmp_path / "run").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_fused_loss_is_found_under_ddp(tmp_path):
    """lm_loss_sum asks fusion_report whether the model computes its loss fused; the training loop
    passes it the DDP wrapper."""
    import torch.distributed as dist

    from falqon import fusion

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        setattr(model, fusion.MARK, "report")
        assert fusion.fusion_report(torch.nn.parallel.DistributedDataParallel(model)) == "report"
    finally:
        dist.destroy_process_group()
