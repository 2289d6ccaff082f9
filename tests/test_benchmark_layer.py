"""benchmarks/layer.py and benchmarks/common.py on the CPU: a tiny sweep end to end (its times
mean nothing), the results file, the table, and the peers that cannot run listed with why."""

from __future__ import annotations

import json

import pytest
import torch

from falqon_testing import REPO

import sys
sys.path.insert(0, str(REPO / "benchmarks"))
import common  # noqa: E402
import layer  # noqa: E402


def test_layer_benchmark_end_to_end_on_cpu(tmp_path, capsys, monkeypatch, one_thread):
    def no_bnb():
        raise common.Skip("bitsandbytes is not importable: (test)")
    monkeypatch.setattr(common, "import_bitsandbytes", no_bnb)
    out, table = tmp_path / "layer.json", tmp_path / "table.txt"
    assert layer.main(["--device", "cpu", "--shapes", "64x32,32x48", "--M", "16,5", "--r", "8",
                       "--reps", "2", "--warmup", "1", "--out", str(out),
                       "--table-out", str(table)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    for key in ("device", "torch", "date", "command", "records", "skipped", "reps"):
        assert key in res, key
    assert "benchmarks/layer.py" in res["command"] or "layer.py" in res["command"]
    recs = res["records"]
    # Every (shape, M, r, method, pass) has a record: a time, or ms None and the reason.
    assert len(recs) == 2 * 2 * 1 * len(layer.METHODS) * 2
    for r in recs:
        assert set(("kind", "shape", "M", "r", "method", "pass", "ms")) <= set(r), r
        assert r["kind"] == "layer" and r["pass"] in ("fwd", "fwd_bwd")
        assert (r["ms"] is None) == ("skipped" in r), r
    timed = {r["method"] for r in recs if r["ms"] is not None}
    assert timed == {"bf16_lora", "fp8_floor", "falqon", "falqon_wt", "falqon_delayed",
                     "falqon_delayed_wt"}
    assert all(r["ms"] > 0 for r in recs if r["ms"] is not None)
    # The peers that cannot run here are listed with the reason, in the JSON and the output.
    assert "(test)" in res["skipped"]["qlora_nf4"]
    assert "fp8_lora_torchao" in res["skipped"]
    assert "skipped qlora_nf4: bitsandbytes is not importable" in printed
    # The table comes last, with speed-ups over bf16_lora and falqon's ratio to the floor.
    tail = printed.rstrip().split("\n\n")[-2:]
    assert tail[0].startswith("Layer fwd+bwd") and tail[1].startswith("Layer forward alone")
    assert "falqon x" in tail[0] and "falqon/floor" in tail[0]
    assert "| 64->32 | 16 | 8 |" in tail[0] and "| 32->48 |  5 | 8 |" in tail[0]
    assert table.read_text().strip() == "\n\n".join(tail).strip()


def test_parse_options():
    args = layer.parse_args(["--quick"])
    assert args.shape_list == layer.SHAPES["7b"] and args.M == [8192] and args.r == [64]
    args = layer.parse_args(["--shapes", "13b,256x512", "--M", "1,2", "--methods", "falqon"])
    assert args.shape_list == layer.SHAPES["13b"] + [(256, 512)]
    assert args.M == [1, 2] and args.method_list == ["falqon"]
    assert len(layer.parse_args([]).shape_list) == 6
    with pytest.raises(SystemExit):
        layer.parse_args(["--methods", "lora_fp4"])
    with pytest.raises(SystemExit):
        layer.parse_args(["--shapes", "100x64"])  # not a multiple of 16
    with pytest.raises(SystemExit):
        layer.parse_args(["--shapes", "7B-ish"])


@pytest.mark.parametrize("name,tag", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA L40S", "l40s"), ("Tesla T4", "t4"),
])
def test_device_tag(name, tag):
    assert common.device_tag("cuda", name) == tag
    assert common.device_tag("cpu") == "cpu"


def test_format_table():
    text = common.format_table(["a", "ms"], [["x", 1.5], ["yy", None], ["z", 12.345]])
    lines = text.splitlines()
    assert lines[0] == "| a  |    ms |"
    assert lines[1] == "|----|------:|"
    assert lines[2:] == ["| x  | 1.500 |", "| yy |     - |", "| z  | 12.35 |"]


def test_timer_cpu_counts_calls():
    calls = []
    t = common.Timer("cpu", warmup=2, reps=3)
    times = t(lambda: calls.append(1))
    assert len(calls) == 5 and len(times) == 3 and all(v >= 0 for v in times)
