"""CPU smoke tests of the model benchmark and the results plot/table generator (benchmarks/model.py,
plot_results.py) on tiny configurations (the step profile's: test_profile_step_cpu.py)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

from falqon_testing import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import model as bench_model  # noqa: E402
import model_build  # noqa: E402
import plot_results  # noqa: E402
import proxy_update  # noqa: E402

import falqon  # noqa: E402

HAS_MELD = all(hasattr(falqon, n) for n in ("meld", "attach", "FalqonConfig"))
requires_meld = pytest.mark.skipif(not HAS_MELD, reason="falqon.meld / falqon.attach are not in "
                                   "this checkout (the workflow branch)")
TINY = ["--device", "cpu", "--model", "tiny", "--rank", "8", "--batch", "2", "--seq", "32"]
DEVICE = "Test GPU 80GB"


# ---- plot_results -------------------------------------------------------------------------------

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


# ---- model.py ----------------------------------------------------------------------------------

def test_model_argument_errors():
    for bad in (["--methods", "falqon,nope"], ["--layers", "99"], ["--steps", "0"],
                ["--device", "cpu", "--batch", "0"]):
        with pytest.raises(SystemExit):
            bench_model.parse_args(bad)
    args = bench_model.parse_args(["--quick", "--device", "cpu"])
    assert (args.layers, args.warmup, args.steps) == (8, 1, 3)
    assert bench_model.model_name("llama-7b", 8) == "llama-7b-8L"
    assert bench_model.model_name("llama-7b", 32) == "llama-7b"


@pytest.mark.slow
def test_model_benchmark_cpu(tmp_path, one_thread):
    out = tmp_path / "results" / "model_cpu.json"
    records = bench_model.main(TINY + ["--warmup", "1", "--steps", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["records"] == records
    assert data["device"] and data["torch"] == torch.__version__
    assert data["date"] and "benchmarks/model.py" in data["command"]
    by_method = {r["method"]: r for r in records if r["kind"] == "model"}
    # Every method is listed once, run or skipped with its reason; none is dropped.
    assert sorted(by_method) == sorted(bench_model.METHODS)
    assert len([r for r in records if r["kind"] == "model"]) == len(bench_model.METHODS)
    for r in by_method.values():
        assert r["tokens"] == 64 and r["model"] == "tiny"
        if "skipped" in r:
            assert r["skipped"].strip()
        else:
            assert r["s_per_step"] > 0 and r["steps"] == 2
            assert r["tokens_per_s"] == pytest.approx(64 / r["s_per_step"])
            assert r["step_s_min"] <= r["s_per_step"] <= r["step_s_max"]
            assert torch.isfinite(torch.tensor(r["final_loss"]))
    assert "skipped" not in by_method["bf16_lora"]
    # PEFT LoRA r = 8 on 7 projections x 2 layers of a 64-wide model (intermediate 176).
    per_layer = 8 * (4 * (64 + 64) + 2 * (64 + 176) + (176 + 64))
    assert by_method["bf16_lora"]["trainable_params"] == 2 * per_layer
    melds = [r for r in records if r["kind"] == "meld"]
    if HAS_MELD:
        for m, options in bench_model.FALQON_OPTIONS.items():
            fal = by_method[m]
            if m in bench_model.FUSED:  # falqon.fuse's methods are for the GPU
                assert "CUDA" in fal["skipped"], fal
                continue
            assert "skipped" not in fal, fal.get("skipped")
            assert fal["update_mode"] == options["update_mode"]
            lora_B = 2 * 8 * (4 * 64 + 2 * 176 + 64)  # per layer: q, k, v, o, gate, up, down
            lora_A = 2 * 8 * (6 * 64 + 176)  # (r x in_features each) where A is trained too
            assert fal["trainable_params"] == lora_B + lora_A * bool(options.get("train_a")), m
            if options["update_mode"] == "proxy":  # the proxy update, timed inside the step
                assert 0 < fal["update_ms"] < 1e3 * fal["s_per_step"]
            else:
                assert "update_ms" not in fal
        for m in ("bf16_lora_liger", "qlora_nf4_liger"):
            assert "CUDA" in by_method[m]["skipped"], by_method[m]
        # One meld record, from the first falqon method run.
        assert len(melds) == 1 and melds[0]["seconds"] > 0 and melds[0]["layers"] == 14
        assert melds[0]["method"] == "falqon"
        check_losses(by_method)
    else:
        assert "falqon.meld" in by_method["falqon"]["skipped"] and not melds

    # The plot/table generator reads what model.py wrote.
    readme = tmp_path / "README.md"
    readme.write_text(plot_results.BEGIN + plot_results.END)
    plot_results.main(["--results-dir", str(out.parent), "--readme", str(readme)])
    assert "| bf16_lora | " in readme.read_text()
    assert "(AdamW, lr 0.0001, after 3 optimizer steps)" in readme.read_text()


def check_losses(by_method: dict) -> None:
    """The loss sanity of model.py's records (one repeated batch, lr 1e-4, every method the same
    number of steps): LoRA's and the adapter mode's losses fall; the proxy mode's updates round
    away in the E4M3 weights, so its loss moves far less (on this tiny model, not at all)."""
    ran = {m: r for m, r in by_method.items() if "skipped" not in r}
    assert {r["loss_steps"] for r in ran.values()} == {3}  # 1 warm-up + 1 sizing + 2 timed
    assert all(r["lr"] == 1e-4 for r in ran.values())
    drop = {m: r["first_loss"] - r["final_loss"] for m, r in ran.items()}
    for m in ("bf16_lora", "falqon_adapter", "falqon_adapter_delayed_wt"):
        assert drop[m] > 1e-4, (m, drop)
    for m in ("falqon", "falqon_delayed_wt"):
        assert abs(drop[m]) < 0.1 * drop["falqon_adapter"], (m, drop)


@requires_meld
@pytest.mark.slow
def test_model_benchmark_method_subset(tmp_path, one_thread):
    """--methods runs only the methods named, in that order; the meld record comes from the first
    falqon method (here the adapter mode's), and --lr reaches the optimizer and the records."""
    out = tmp_path / "model.json"
    records = bench_model.main(TINY + ["--warmup", "0", "--steps", "1", "--lr", "3e-4",
                                       "--methods", "falqon_adapter,bf16_lora", "--out", str(out)])
    assert [r["method"] for r in records if r["kind"] == "model"] == ["falqon_adapter",
                                                                      "bf16_lora"]
    melds = [r for r in records if r["kind"] == "meld"]
    assert len(melds) == 1 and melds[0]["method"] == "falqon_adapter"
    by_method = {r["method"]: r for r in records if r["kind"] == "model"}
    assert all("skipped" not in r and r["lr"] == 3e-4 for r in by_method.values())
    # --warmup 0: the adapter's checked step still runs (2 updates before the last forward); the
    # first loss of bf16_lora is its sizing step's.
    assert by_method["falqon_adapter"]["loss_steps"] == 2
    assert by_method["bf16_lora"]["loss_steps"] == 1
    assert json.loads(out.read_text())["config"]["optimizer"] == "AdamW(lr=0.0003)"
    assert json.loads(out.read_text())["config"]["checkpointing"] == "non_reentrant"


@requires_meld
def test_model_benchmark_reentrant_checkpointing_gives_the_same_losses(tmp_path, one_thread):
    """--checkpointing reentrant changes how the recompute is driven, not what it computes: the
    same losses as the default (non-reentrant) run, and the kind in the results' config."""
    losses = {}
    for kind in ("non_reentrant", "reentrant"):
        out = tmp_path / f"{kind}.json"
        records = bench_model.main(TINY + ["--warmup", "0", "--steps", "1", "--methods",
                                           "falqon_adapter,bf16_lora", "--checkpointing", kind,
                                           "--out", str(out)])
        losses[kind] = [(r["first_loss"], r["final_loss"]) for r in records
                        if r["kind"] == "model"]
        assert json.loads(out.read_text())["config"]["checkpointing"] == kind
    assert losses["reentrant"] == losses["non_reentrant"]


# ---- large models: presets, what fits, layer-by-layer builds, meld records ----------------------

GIB = 2 ** 30


def test_presets_are_llama_13b_and_llama2_70b():
    """The presets have the published parameter counts; the 70B one is built by transformers with
    grouped-query attention (on the meta device: no memory)."""
    from falqon.loading import empty_model

    for name, params in (("llama-13b", 13_015_864_320), ("llama2-70b", 68_976_648_192)):
        shape = bench_model.SHAPES[name]
        layers = shape["num_hidden_layers"]
        assert layers * sum(k * n for k, n in model_build.projection_shapes(shape)) + \
            model_build.other_params(shape, layers) == params
    model = empty_model(model_build.llama_config(bench_model.SHAPES["llama2-70b"], 80, 512))
    assert sum(p.numel() for p in model.parameters()) == 68_976_648_192
    assert model.model.layers[79].self_attn.k_proj.weight.shape == (1024, 8192)


def test_what_fits_a_141_gb_gpu():
    """The estimates that decide "does not fit" before a method is built."""

    def need(model, method, tokens):
        shape = bench_model.SHAPES[model]
        return model_build.needed_bytes(method, bench_model.FALQON_OPTIONS.get(method), shape,
                                        shape["num_hidden_layers"], 64, tokens)

    # bf16 weights alone: 128 GiB; with the adapters, their AdamW state and the activations of
    # 4 x 512 tokens, over the 135 GiB the issue allows (an H200 has ~139 GiB).
    assert need("llama2-70b", "bf16_lora", 4 * 512) > 135 * GIB
    assert need("llama2-70b", "fp8_lora_torchao", 4 * 512) > 135 * GIB  # keeps the bf16 weights
    for method in ("falqon", "falqon_adapter"):  # FP8 weights: 64 GiB
        assert 64 * GIB < need("llama2-70b", method, 16 * 512) < 100 * GIB
    assert need("llama2-70b", "qlora_nf4", 16 * 512) < 60 * GIB  # NF4: half of FP8
    assert all(need("llama-13b", m, 16 * 512) < 40 * GIB for m in bench_model.METHODS)
    # A 70B model's bf16 weights take more than half the device: built layer by layer.
    args = bench_model.parse_args(["--device", "cpu", "--model", "llama2-70b",
                                   "--memory-gib", "139"])
    assert model_build.build_layerwise(args)
    args = bench_model.parse_args(["--device", "cpu", "--model", "llama-13b",
                                   "--memory-gib", "139"])
    assert not model_build.build_layerwise(args)


@requires_meld
@pytest.mark.slow
def test_model_benchmark_large_model_path(tmp_path, one_thread, monkeypatch):
    """What a 70B run does, on the tiny model with a small pretend device: bf16 LoRA recorded as
    not fitting (with the bytes it needs), falqon built layer by layer (a synthetic meld record),
    a step out of memory run again at half the batch, the meld from a checkpoint written to disk
    (cold and warm page cache, the files removed), and the records merged into the file."""
    shape = bench_model.SHAPES["tiny"]
    tokens = 2 * 32
    fal = model_build.needed_bytes("falqon_adapter", {"update_mode": "adapter"}, shape, 2, 8,
                                   tokens)
    bf16 = model_build.needed_bytes("bf16_lora", None, shape, 2, 8, tokens)
    assert fal < bf16
    out = tmp_path / "model_cpu.json"
    kept = {"kind": "model", "model": "other", "method": "falqon", "skipped": "another run"}
    stale = {"kind": "model", "model": "tiny", "method": "falqon_adapter", "skipped": "stale"}
    out.write_text(json.dumps({"device": common_device(), "records": [kept, stale]}))
    real_step = bench_model.train_step

    def step(model, optimizer, batch, args):
        if batch.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (pretend)")
        return real_step(model, optimizer, batch, args)

    monkeypatch.setattr(bench_model, "train_step", step)
    disk = tmp_path / "disk"
    disk.mkdir()
    records = bench_model.main(TINY[:-4] + [
        "--batch", "4", "--min-batch", "2", "--seq", "32", "--warmup", "0", "--steps", "1",
        "--methods", "bf16_lora,falqon_adapter", "--build", "layerwise", "--meld-from-disk",
        "--disk-dir", str(disk), "--memory-gib", str((fal + bf16) / 2 / GIB), "--out", str(out)])
    by = {(r["kind"], r.get("method"), r.get("page_cache")): r for r in records}
    lora = by[("model", "bf16_lora", None)]
    assert lora["fits"] is False and lora["needs_bytes"] == bf16 > lora["device_bytes"]
    assert lora["skipped"].startswith("does not fit: it needs about")
    adapter = by[("model", "falqon_adapter", None)]
    assert "skipped" not in adapter, adapter.get("skipped")
    assert (adapter["batch"], adapter["tokens"], adapter["batches_out_of_memory"]) == (2, 64, [4])
    synthetic = by[("meld", "falqon_adapter", None)]
    assert synthetic["source"] == "synthetic" and synthetic["layers"] == 14
    for cache in ("cold", "warm"):
        r = next(r for r in records if r.get("page_cache") == cache)
        assert r["source"] == "disk" and r["layers"] == 14 and r["seconds"] > 0
        assert r["shards"] >= 1 and r["bf16_gib"] > 0
    assert list(disk.iterdir()) == []  # the checkpoint is removed
    saved = json.loads(out.read_text())["records"]
    assert saved == [kept] + records  # the stale record replaced, the other model's kept
    # Out of memory down to --min-batch: recorded as not fitting, with the bytes it needs.
    again = bench_model.main(TINY[:-4] + [
        "--batch", "4", "--min-batch", "4", "--seq", "32", "--warmup", "0", "--steps", "1",
        "--methods", "falqon_adapter", "--out", str(out)])
    oom = again[0]
    assert oom["fits"] is False and oom["needs_bytes"] == model_build.needed_bytes(
        "falqon_adapter", {"update_mode": "adapter"}, shape, 2, 8, 4 * 32)
    assert oom["skipped"].startswith("does not fit: out of memory (CUDA out of memory (pretend))")
    saved = json.loads(out.read_text())["records"]
    assert saved[-1] == oom and adapter not in saved and synthetic in saved

    readme = tmp_path / "README.md"
    readme.write_text(plot_results.BEGIN + plot_results.END)
    plot_results.main(["--results-dir", str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert "| bf16_lora | does not fit (needs >= 0 GiB) |" in text
    assert "falqon.meld_from_config of tiny (seeded random weights" in text
    assert "falqon.meld_pretrained of tiny from its safetensors files" in text
    assert "page cache cold" in text and "page cache warm" in text


def test_fused_methods_are_fused_on_the_layerwise_build_too(tmp_path):
    """A fused method built layer by layer (a model too large to build whole) gets falqon.fuse
    like one built whole: on a CPU that is a skip with the fuse reason, never an unfused record
    under the fused method's name (what the first 70B run recorded)."""
    records = bench_model.main(TINY[:-4] + [
        "--batch", "2", "--seq", "32", "--warmup", "0", "--steps", "1",
        "--methods", "falqon_fused", "--build", "layerwise", "--out", str(tmp_path / "m.json")])
    (fused,) = [r for r in records if r.get("kind") == "model"]
    assert fused["skipped"].startswith("falqon.fuse is measured on a CUDA GPU only"), fused


def common_device() -> str:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import common

    return common.device_name("cpu")


def test_fused_method_setup(monkeypatch):
    """A fused method is its base method's model with falqon.fuse's backend put on it; the
    record keeps what was fused; a missing Liger is a clean skip, a partial fusion an error.
    (falqon.fuse itself is tested in test_fusion.py; here its answer is given.)"""
    args = bench_model.parse_args(TINY)
    args.device = torch.device("cuda")  # the fused methods run on a GPU only; the model is CPU's
    full = dict.fromkeys(bench_model.LIGER_FUSIONS, 1)
    answers = {"bf16_lora_liger": falqon.FuseReport("liger", "liger", full),
               "falqon_fused_compile": falqon.FuseReport("compile", "compile",
                                                         {"compiled_layers": 2}),
               "falqon_fused_cudagraphs": falqon.FuseReport("compile", "compile",
                                                            {"compiled_layers": 2},
                                                            compile_mode="reduce-overhead")}
    calls = []

    def fake_fuse(model, backend, **options):
        calls.append((type(model).__name__, backend, options))
        if isinstance(answers.get("next"), Exception):
            raise answers["next"]
        return answers["next"]

    monkeypatch.setattr(falqon, "fuse", fake_fuse)
    monkeypatch.setattr(bench_model, "sync", lambda device: None)
    for method in ("bf16_lora_liger", "falqon_fused_compile", "falqon_fused_cudagraphs"):
        answers["next"], info = answers[method], {}
        model = bench_model.build_model("tiny", 2, 32, torch.device("cpu"), torch.float32)
        bench_model.SETUP[method](model, args, info)
        assert info["fuse"]["backend"] == bench_model.FUSED[method][1]
        assert info["fuse"]["fused"] == answers[method].fused
        assert info["fuse"].get("compile_mode") == answers[method].compile_mode
    assert calls == [("PeftModelForCausalLM", "liger", {}), ("LlamaForCausalLM", "compile", {}),
                     ("LlamaForCausalLM", "compile", {"compile_mode": "reduce-overhead"})]
    assert bench_model.FALQON_OPTIONS["falqon_fused"] == {"update_mode": "adapter"}
    for answer, error in ((falqon.FalqonError("needs Liger Kernel"), bench_model.common.Skip),
                          (falqon.FuseReport("liger", "liger", {"rms_norm": 5}), RuntimeError),
                          (falqon.FuseReport("auto", "off"), RuntimeError)):
        answers["next"] = answer
        model = bench_model.build_model("tiny", 2, 32, torch.device("cpu"), torch.float32)
        with pytest.raises(error):
            bench_model.SETUP["qlora_nf4_liger" if error is bench_model.common.Skip else
                              "bf16_lora_liger"](model, args, {})


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


def test_proxy_update_benchmark_runs_both_paths(tmp_path):
    """benchmarks/proxy_update.py on the CPU, tiny: both paths of ProxyUpdater.step timed (the
    grouped one forced, as on CUDA), a table printed and the JSON written."""
    out = tmp_path / "proxy_update.json"
    records = proxy_update.main(["--device", "cpu", "--decoder-layers", "1", "--scale", "16",
                                 "--reps", "1", "--k", "4", "--out", str(out)])
    assert [r["mode"] for r in records] == ["per_layer", "grouped"]
    assert all(r["layers"] == 7 and r["gpu_ms"] > 0 for r in records)
    saved = json.loads(out.read_text())
    assert saved["records"] == json.loads(json.dumps(records)) and saved["settings"]["k"] == "4"


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


def test_model_table_compares_tokens_per_second_across_batches():
    import model as M

    base = {"kind": "model", "method": "bf16_lora", "s_per_step": 1.7, "tokens_per_s": 2048 / 1.7,
            "peak_gib": 136.0, "tokens": 2048, "first_loss": 11.0, "final_loss": 8.0,
            "lr": 1e-4, "loss_steps": 3}
    fast = dict(base, method="falqon_fused", s_per_step=3.4, tokens_per_s=8192 / 3.4,
                tokens=8192, peak_gib=82.0)
    table = M.format_table([base, fast])
    row = next(line for line in table.splitlines() if line.startswith("| falqon_fused"))
    assert "2.000" in row  # 4x the tokens in 2x the time: 2x the tokens/s (not 0.5x by s/step)
