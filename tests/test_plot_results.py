"""benchmarks/plot_results.py: the speed-up plot and the README's results tables, from synthetic
results files and from the committed ones."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

from falqon_testing import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import plot_results  # noqa: E402

DEVICE = "Test GPU 80GB"


SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]


def _ms() -> float:
    return float(torch.empty(()).uniform_(0.2, 5.0))


def _write(path: pathlib.Path, date: str, records: list[dict]) -> None:
    path.write_text(json.dumps({"device": DEVICE, "torch": "2.11.0+cu130", "date": date,
                                "command": "test", "records": records}))


def _layer(shape, method, ms, M=8192, r=64, pass_="fwd_bwd"):
    return {"kind": "layer", "shape": list(shape), "M": M, "r": r, "method": method,
            "pass": pass_, "ms": ms}


@pytest.fixture
def synthetic_results(tmp_path):
    """Random layer and model results in two files, an older one with values that must lose."""
    results = tmp_path / "results"
    results.mkdir()
    layer = {(s, m): _ms() for s in SHAPES for m in ("bf16_lora", "falqon", "fp8_lora_torchao")}
    records = [_layer(s, m, v) for (s, m), v in layer.items()]
    records += [_layer(s, "falqon", _ms(), pass_="fwd") for s in SHAPES]  # not in the table
    records += [_layer(s, "falqon", _ms(), M=2048) for s in SHAPES]  # another M: not shown
    records.append({**_layer(SHAPES[0], "qlora_nf4", 0.0), "skipped": "no bitsandbytes here"})
    del records[-1]["ms"]
    _write(results / "layer_new.json", "2026-11-22T12:00:00+00:00", records)
    stale = [_layer(s, "falqon", 1000.0 + _ms()) for s in SHAPES]
    _write(results / "layer_old.json", "2026-11-01T12:00:00+00:00", stale)
    steps = {"bf16_lora": _ms(), "falqon": _ms()}
    model = [{"kind": "model", "model": "llama-7b", "tokens": 8192, "method": m, "s_per_step": v,
              "tokens_per_s": 8192 / v, "peak_gib": 10 * _ms()} for m, v in steps.items()]
    model[1]["update_ms"] = _ms()
    model.append({"kind": "model", "model": "llama-7b", "tokens": 8192,
                  "method": "fp8_lora_torchao", "skipped": "torchao is not importable"})
    model.append({"kind": "meld", "model": "llama-7b", "seconds": 3 * _ms()})
    _write(results / "model_test.json", "2026-11-22T13:00:00+00:00", model)
    # A profile file: records of another kind, and another device that must not get a section.
    (results / "profile_test.json").write_text(json.dumps({
        "device": "Profiled GPU", "date": "2026-11-22", "records": [
            {"kind": "profile", "group": "fwd GEMMs", "ms": _ms(), "share": 0.5, "count": 7}]}))
    return results, layer, steps, model


def test_plot_and_readme_table(synthetic_results, tmp_path):
    results, layer, steps, model = synthetic_results
    readme = tmp_path / "README.md"
    before, after = "# Project\n\nintro text\n\n", "\n\n## Later section\nkept\n"
    readme.write_text(before + plot_results.BEGIN + "\nold table\n" + plot_results.END + after)
    plot_results.main(["--results-dir", str(results), "--readme", str(readme),
                       "--snippet", str(tmp_path / "snippet.md")])

    png = results / "speedup.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert height > 200 and width > 400
    assert not (tmp_path / "snippet.md").exists()

    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "old table" not in text
    block = text[len(before):-len(after)]
    assert "![speed-up over bf16_lora](results/speedup.png)" in block
    assert "| shape (K -> N) | bf16_lora | falqon | qlora_nf4 | fp8_lora_torchao |" in block
    for shape in SHAPES:
        base, fal, tao = (layer[(shape, m)] for m in ("bf16_lora", "falqon", "fp8_lora_torchao"))
        qlora = "skipped" if shape == SHAPES[0] else "-"  # skipped there, absent elsewhere
        row = (f"| {shape[0]} -> {shape[1]} | {base:.2f} | {fal:.2f} ({base / fal:.2f}x) | "
               f"{qlora} | {tao:.2f} ({base / tao:.2f}x) |")
        assert row in block
    assert "1000." not in block  # the older file's values lost to the newer file's
    assert "M = 2048" not in block and block.count("| 4096 -> 4096 |") == 1
    assert "Profiled GPU" not in block and block.count("### ") == 1
    s_b, s_f = steps["bf16_lora"], steps["falqon"]
    assert (f"| falqon | {s_f:.3f} | {8192 / s_f:.0f} | {model[1]['peak_gib']:.1f} | "
            f"{model[1]['update_ms']:.1f} | {s_b / s_f:.2f}x | - |") in block  # no loss recorded
    assert "Loss:" not in block and "falqon_adapter" not in block
    assert f"| bf16_lora | {s_b:.3f} |" in block and "| fp8_lora_torchao | skipped |" in block
    assert "not run: fp8_lora_torchao (llama-7b): torchao is not importable" in block
    assert "not run: qlora_nf4 (layer 4096 -> 4096): no bitsandbytes here" in block
    assert f"falqon.meld of llama-7b: {model[3]['seconds']:.1f} s." in block

    # Idempotent: a second run rewrites the same block.
    plot_results.main(["--results-dir", str(results), "--readme", str(readme)])
    assert readme.read_text() == text


def test_table_with_adapter_methods(tmp_path):
    """The adapter methods take their columns after the proxy ones; the model table shows each
    method's loss (first -> final) and how it was taken."""
    results = tmp_path / "results"
    results.mkdir()
    methods = ("fp8_floor", "falqon_adapter", "bf16_lora", "falqon_adapter_delayed_wt", "falqon")
    layer = {(s, m): _ms() for s in SHAPES for m in methods}
    _write(results / "layer.json", "2026-11-30 10:00 UTC",
           [_layer(s, m, v) for (s, m), v in layer.items()])
    losses = {"bf16_lora": (10.4, 6.68), "falqon": (10.4, 11.19), "falqon_adapter": (10.4, 6.9)}
    model = [{"kind": "model", "model": "llama-7b", "tokens": 8192, "method": m,
              "s_per_step": _ms(), "tokens_per_s": 1.0, "peak_gib": 1.0, "first_loss": a,
              "final_loss": b, "loss_steps": 13, "lr": 1e-4} for m, (a, b) in losses.items()]
    _write(results / "model.json", "2026-11-30 11:00 UTC", model)
    readme = tmp_path / "README.md"
    readme.write_text(plot_results.BEGIN + plot_results.END)
    plot_results.main(["--results-dir", str(results), "--readme", str(readme)])
    block = readme.read_text()
    assert ("| shape (K -> N) | bf16_lora | falqon | falqon_adapter | falqon_adapter_delayed_wt | "
            "fp8_floor |") in block
    base, ada = layer[(SHAPES[1], "bf16_lora")], layer[(SHAPES[1], "falqon_adapter")]
    assert f"| {ada:.2f} ({base / ada:.2f}x) |" in block
    lines = block.splitlines()
    rows = {m: next(l for l in lines if l.startswith(f"| {m} | ")) for m in losses}
    cells = {m: [c.strip() for c in row.split("|")[1:-1]] for m, row in rows.items()}
    assert cells["falqon_adapter"][4] == "-" and cells["falqon_adapter"][6] == "10.40 -> 6.90"
    assert cells["falqon"][6] == "10.40 -> 11.19" and cells["bf16_lora"][6] == "10.40 -> 6.68"
    assert [lines.index(rows[m]) for m in ("bf16_lora", "falqon", "falqon_adapter")] == \
        sorted(lines.index(rows[m]) for m in losses)
    assert ("Loss: training loss on one random batch repeated every step (AdamW, lr 0.0001, "
            "after 13 optimizer steps)") in block
    assert "proxy update ms" in block and "speedup.png" in block


def test_speed_ups_stay_within_one_run(tmp_path):
    """A newer layer run that measured some methods again gets its own table; the older table
    keeps the methods it measured last, each table's ratios over its own bf16_lora. A model row
    from an older run is over that run's bf16_lora, and the note says so."""
    results = tmp_path / "results"
    results.mkdir()
    old = {(s, m): _ms() for s in SHAPES for m in ("bf16_lora", "falqon", "falqon_adapter")}
    new = {(s, m): _ms() for s in SHAPES for m in ("bf16_lora", "falqon_adapter")}
    _write(results / "layer_old.json", "2026-11-29 23:01 UTC",
           [_layer(s, m, v) for (s, m), v in old.items()])
    _write(results / "layer_new.json", "2026-12-01 11:54 UTC",
           [_layer(s, m, v) for (s, m), v in new.items()])

    def step(method, s):
        return {"kind": "model", "model": "llama-7b", "tokens": 8192, "method": method,
                "s_per_step": s, "tokens_per_s": 8192 / s, "peak_gib": 1.0}

    old_steps = {"bf16_lora": _ms(), "falqon": _ms()}
    new_steps = {"bf16_lora": _ms(), "falqon_adapter": _ms()}
    _write(results / "model_old.json", "2026-11-29 23:01 UTC",
           [step(m, v) for m, v in old_steps.items()])
    _write(results / "model_new.json", "2026-12-01 11:58 UTC",
           [step(m, v) for m, v in new_steps.items()])
    readme = tmp_path / "README.md"
    readme.write_text(plot_results.BEGIN + plot_results.END)
    plot_results.main(["--results-dir", str(results), "--readme", str(readme)])
    block = readme.read_text()

    first = block.index("(layer_new.json, 2026-12-01)")
    second = block.index("(layer_old.json, 2026-11-29)")
    assert first < second
    assert block[first:second].count("| shape (K -> N) | bf16_lora | falqon_adapter |") == 1
    assert block[second:].count("| shape (K -> N) | bf16_lora | falqon |") == 1
    for s in SHAPES:
        b, a = new[(s, "bf16_lora")], new[(s, "falqon_adapter")]
        assert f"| {s[0]} -> {s[1]} | {b:.2f} | {a:.2f} ({b / a:.2f}x) |" in block[first:second]
        b, f = old[(s, "bf16_lora")], old[(s, "falqon")]
        assert f"| {s[0]} -> {s[1]} | {b:.2f} | {f:.2f} ({b / f:.2f}x) |" in block[second:]
    assert f"{old[(SHAPES[0], 'falqon_adapter')]:.2f} (" not in block  # measured again since
    assert "a method measured again in a newer run is shown from that run only" in block

    rows = {line.split("|")[1].strip(): line for line in block.splitlines()
            if line.startswith("| bf16_lora | ") or line.startswith("| falqon")}
    assert rows["bf16_lora"].startswith(f"| bf16_lora | {new_steps['bf16_lora']:.3f} |")
    ratio = old_steps["bf16_lora"] / old_steps["falqon"]
    assert f"| {ratio:.2f}x |" in rows["falqon"]
    ratio = new_steps["bf16_lora"] / new_steps["falqon_adapter"]
    assert f"| {ratio:.2f}x |" in rows["falqon_adapter"]
    assert "over the bf16_lora of its own run" in block


def test_committed_results_render(tmp_path):
    """The committed results (benchmarks/results/*.json, made before the adapter mode) render:
    every method of every layer and model file gets its row or column."""
    readme = tmp_path / "README.md"
    readme.write_text(plot_results.BEGIN + plot_results.END)
    results = REPO / "benchmarks" / "results"
    plot_results.main(["--results-dir", str(results), "--readme", str(readme),
                       "--png", str(tmp_path / "speedup.png")])
    block = readme.read_text()
    records, _ = plot_results.load_records(results)
    methods = {r["method"] for r in records if r["kind"] in ("layer", "model")}
    assert methods and all(f" {m} |" in block for m in methods), methods - set(block.split())
    assert (tmp_path / "speedup.png").is_file()
    for r in records:
        if r["kind"] == "model" and "final_loss" in r:  # files before first_loss: final alone
            assert f"| {r['final_loss']:.2f} |" in block or f"-> {r['final_loss']:.2f} |" in block


def test_table_goes_to_snippet_without_markers(synthetic_results, tmp_path):
    results, *_ = synthetic_results
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    snippet = tmp_path / "docs" / "results_snippet.md"
    plot_results.main(["--results-dir", str(results), "--readme", str(readme),
                       "--snippet", str(snippet)])
    assert readme.read_text() == "# no markers here\n"
    text = snippet.read_text()
    assert plot_results.BEGIN in text and plot_results.END in text
    assert "(../results/speedup.png)" in text  # relative to the snippet's folder


def test_no_results_writes_no_plot(tmp_path):
    (tmp_path / "results").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(plot_results.BEGIN + plot_results.END)
    plot_results.main(["--results-dir", str(tmp_path / "results"), "--readme", str(readme)])
    assert not (tmp_path / "results" / "speedup.png").exists()
    assert "No results yet" in readme.read_text()


def test_model_tables_name_their_runs_when_rows_mix_runs():
    one = {"date": "2026-11-30T01:00", "file": "a.json"}
    assert plot_results._runs_note({"bf16_lora": one, "falqon": one}) is None
    note = plot_results._runs_note({"bf16_lora": one, "falqon": {"date": "2026-11-29T10:00",
                                                                  "file": "b.json"}})
    assert note == ("Rows from more than one run: falqon from b.json (2026-11-29); bf16_lora "
                    "from a.json (2026-11-30).")
    # runs that checkpoint differently say so; a method measured twice in a run shows both
    note = plot_results._runs_note({
        "bf16_lora": {**one, "checkpointing": "reentrant"},
        "falqon": {"date": "2026-11-29T10:00", "file": "b.json", "checkpointing": "non_reentrant",
                   "repeats": [0.4191, 0.417]}})
    assert note == ("Rows from more than one run: falqon from b.json (2026-11-29, non_reentrant "
                    "checkpointing); bf16_lora from a.json (2026-11-30, reentrant checkpointing)."
                    " Measured more than once in one run (in the order measured; the table shows"
                    " the last): falqon 0.419 / 0.417 s.")


def test_a_method_measured_twice_in_one_file_keeps_both_times(tmp_path):
    rec = {"kind": "model", "model": "llama-7b", "method": "falqon_fused", "lr": 1e-4}
    (tmp_path / "m.json").write_text(json.dumps({
        "device": "H200", "date": "2026-11-30 09:00 UTC", "config": {"checkpointing": "reentrant"},
        "records": [{**rec, "s_per_step": 0.419}, {**rec, "s_per_step": 0.417}]}))
    records, _ = plot_results.load_records(tmp_path)
    assert len(records) == 1 and records[0]["s_per_step"] == 0.417
    assert records[0]["repeats"] == [0.419, 0.417] and records[0]["checkpointing"] == "reentrant"


def test_readme_table_shows_the_distributed_records(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    tps = 1000 * _ms()
    base = {"kind": "distributed", "model": "llama-7b", "batch_per_gpu": 16, "seq": 512,
            "method": "falqon_adapter", "s_per_step": 8192 / tps}
    records = [{**base, "mode": "single", "gpus": 1, "tokens_per_s": tps, "peak_gib": 12.5,
                "scaling": 1.0, "peak_ratio": 1.0, "ranks_identical": None},
               {**base, "mode": "ddp", "gpus": 2, "tokens_per_s": 1.9 * tps, "peak_gib": 13.0,
                "scaling": 1.9, "peak_ratio": 1.04, "ranks_identical": True},
               {**base, "mode": "fsdp2", "gpus": 2, "tokens_per_s": 1.5 * tps, "peak_gib": 9.0,
                "scaling": 1.5, "peak_ratio": 0.72, "ranks_identical": False},
               {**base, "mode": "fsdp2_offload", "gpus": 2, "skipped": "RuntimeError: no GPU"}]
    _write(results / "distributed_test.json", "2026-11-30T12:00:00+00:00", records)
    readme = tmp_path / "README.md"
    readme.write_text(plot_results.BEGIN + "\n" + plot_results.END + "\n")
    plot_results.main(["--results-dir", str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert "Several GPUs, llama-7b, 16 x 512 tokens per GPU" in text
    assert f"| ddp | 2 | falqon_adapter | {1.9 * tps:.0f} | 1.90x | 13.0 | 1.04 | yes |" in text
    assert "| fsdp2 | 2 | falqon_adapter |" in text and "| 0.72 | NO |" in text
    assert "- not run: falqon_adapter (fsdp2_offload llama-7b): RuntimeError: no GPU" in text
