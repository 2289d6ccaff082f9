"""`falqon finetune` on the GPU: a tiny run end to end, stopped and resumed, then exported."""

import json

import pytest
import torch

from falqon.cli import main
from falqon_testing import requires_fp8_cuda
from workflow_testing import records, tiny_config_file, write_json

pytestmark = [pytest.mark.gpu, requires_fp8_cuda]


def test_finetune_resume_export_on_gpu(tmp_path, capsys):
    pytest.importorskip("transformers")
    config = str(tiny_config_file(tmp_path))
    data = str(write_json(tmp_path / "data.json", records(32)))
    out = tmp_path / "run"
    argv = ["finetune", "--model-config", config, "--data", data, "--output-dir", str(out),
            "--steps", "8", "--batch-size", "4", "--seq-len", "64", "--rank", "4", "--lr",
            "0.05", "--eval-every", "4", "--no-progress", "--device", "cuda"]
    assert main(argv + ["--stop-after", "4"]) == 0
    assert main(["finetune", "--output-dir", str(out), "--resume", "--no-progress",
                 "--device", "cuda", "--export", str(tmp_path / "fp8")]) == 0
    printed = capsys.readouterr().out
    assert "on cuda" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert json.loads((out / "run.json").read_text())["options"]["dtype"] == "bfloat16"
    qconfig = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "float-quantized"
