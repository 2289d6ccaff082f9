"""CPU smoke tests of the model benchmark, the step profile and the results plot/table generator
(benchmarks/model.py, profile_step.py, plot_results.py) on tiny configurations."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

from falqon_testing import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import model as bench_model  # noqa: E402
import plot_results  # noqa: E402
import profile_step  # noqa: E402

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
            f"{model[1]['update_ms']:.1f} | {s_b / s_f:.2f}x |") in block
    assert f"| bf16_lora | {s_b:.3f} |" in block and "| fp8_lora_torchao | skipped |" in block
    assert "not run: fp8_lora_torchao (llama-7b): torchao is not importable" in block
    assert "not run: qlora_nf4 (layer 4096 -> 4096): no bitsandbytes here" in block
    assert f"falqon.meld of llama-7b: {model[3]['seconds']:.1f} s." in block

    # Idempotent: a second run rewrites the same block.
    plot_results.main(["--results-dir", str(results), "--readme", str(readme)])
    assert readme.read_text() == text


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
        fal = by_method["falqon"]
        assert "skipped" not in fal, fal.get("skipped")
        assert 0 < fal["update_ms"] < 1e3 * fal["s_per_step"]
        assert fal["trainable_params"] == 2 * 8 * (4 * 64 + 2 * 176 + 64)  # the lora_B's
        assert len(melds) == 1 and melds[0]["seconds"] > 0 and melds[0]["layers"] == 14
    else:
        assert "falqon.meld" in by_method["falqon"]["skipped"] and not melds

    # The plot/table generator reads what model.py wrote.
    readme = tmp_path / "README.md"
    readme.write_text(plot_results.BEGIN + plot_results.END)
    plot_results.main(["--results-dir", str(out.parent), "--readme", str(readme)])
    assert "| bf16_lora | " in readme.read_text()


# ---- profile_step.py ---------------------------------------------------------------------------

def test_classify_gpu_kernel_names():
    c = profile_step.classify
    fwd = ["falqon::melded_linear", "falqon_bench::forward"]
    dgrad = ["falqon::melded_linear_grad_input",
             "GeneratedBackwardFor_falqon_melded_linear_defaultBackward"]
    node = ["aten::mm", "GeneratedBackwardFor_falqon_melded_linear_defaultBackward"]
    assert c("sm90_xmma_gemm_e4m3e4m3_bf16_tn_n_tilesize128x128x128", fwd, "forward", True) == \
        "fwd GEMMs"
    assert c("void fused_quantize_kernel<__nv_bfloat16>(...)", fwd, "forward", True) == "quantise"
    assert c("void amax_kernel<__nv_bfloat16, 8>(...)", dgrad, "backward", True) == "quantise"
    assert c("nvjet_qqtst_128x256_64x4_2x1_v_bz_coopB_TNT", dgrad, "backward", True) == \
        "dgrad GEMMs"
    assert c("transpose_fp8_kernel(...)", dgrad, "backward", True) == "transpose"
    assert c("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", node, "backward", True) == "dB"
    assert c("void at::native::elementwise_kernel<...>", fwd, "forward", True) == "other"
    # Both gradients in one op: the FP8 GEMM is dx's, the fused read of g quantise, its split
    # reduce dB; the CPU reference's own GEMM there (outside its grad_input call) is dB's.
    both = ["falqon::melded_linear_backward",
            "GeneratedBackwardFor_falqon_melded_linear_defaultBackward"]
    assert c("nvjet_sm90_qqtst_128x256_128x4_1x2_h_bz_coopA_TNN", both, "backward", True) == \
        "dgrad GEMMs"
    assert c("grad_quantize_product_kernel<c10::BFloat16, 4, false>", both, "backward",
             True) == "quantise"
    assert c("grad_b_reduce_kernel<float>", both, "backward", True) == "dB"
    assert c("transpose_fp8_kernel(...)", both, "backward", True) == "transpose"
    assert c("aten::mm", ["aten::mm"] + both, "backward", False) == "dB"
    assert c("aten::mm", ["aten::mm", "falqon::melded_linear_grad_input"] + both, "backward",
             False) == "dgrad GEMMs"
    assert c("sm90_xmma_gemm_e4m3", ["falqon::melded_linear", profile_step.RECOMPUTE] + node,
             "backward", True) == "recompute"
    assert c("pytorch_flash::flash_fwd_kernel<...>", ["aten::_flash_attention_forward"],
             "forward", True) == "attention"
    assert c("nvjet_tst_256x128", ["aten::mm", "MmBackward0"], "backward", True) == \
        "lm_head GEMMs"
    assert c("void at::native::vectorized_elementwise_kernel<mul>", ["aten::mul"], "forward",
             True) == "norms/elementwise"
    assert c("topk_update_kernel", ["falqon::topk_update_"], "proxy_update", True) == \
        "proxy update"
    assert c("multi_tensor_apply_kernel", ["aten::_foreach_addcdiv_"], "optimizer", True) == \
        "optimizer step"


def test_gpu_units_skip_annotation_mirrors():
    from types import SimpleNamespace as NS

    cpu = torch.autograd.DeviceType.CPU
    ms = [float(torch.empty(()).uniform_(1, 100)) for _ in range(3)]
    events = [
        NS(name="falqon_bench::forward", device_type=cpu,
           kernels=[NS(name="falqon_bench::forward", duration=sum(ms))]),
        NS(name="aten::mm", device_type=cpu, kernels=[NS(name="nvjet_tst", duration=ms[0]),
                                                      NS(name="splitKreduce", duration=ms[1])]),
        NS(name="aten::add", device_type=cpu, kernels=[NS(name="elementwise", duration=ms[2])]),
        NS(name="nvjet_tst", device_type=torch.autograd.DeviceType.CUDA, kernels=[]),
    ]
    got = [(n, us) for n, us, _ in profile_step.units(events, on_gpu=True)]
    assert got == [("nvjet_tst", ms[0]), ("splitKreduce", ms[1]), ("elementwise", ms[2])]


@requires_meld
@pytest.mark.slow
def test_profile_step_cpu(tmp_path, one_thread):
    out = tmp_path / "profile_cpu.json"
    result = profile_step.main(TINY + ["--warmup", "1", "--timed-steps", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["records"] == result["records"] and saved["step_ms"] == result["step_ms"]
    assert saved["device"] and saved["torch"] == torch.__version__
    cats = {c["group"]: c for c in result["records"]}
    assert all(c["kind"] == "profile" for c in result["records"])
    assert list(cats) == list(profile_step.CATEGORIES)
    assert sum(c["ms"] for c in cats.values()) == pytest.approx(result["sum_ms"])
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
    for name in ("fwd GEMMs", "dgrad GEMMs", "quantise", "dB", "attention", "norms/elementwise",
                 "lm_head GEMMs", "loss", "recompute", "optimizer step", "proxy update"):
        assert cats[name]["ms"] > 0, name
    # One melded forward GEMM per projection outside the recompute, one dgrad GEMM per
    # projection: 7 x 2 layers each (the CPU reference runs one aten::mm per op).
    assert cats["fwd GEMMs"]["count"] == 14 and cats["dgrad GEMMs"]["count"] == 14
    assert result["recompute_breakdown_ms"].get("fwd GEMMs", 0) > 0
    assert result["checkpointed_modules"] >= 2 and result["step_ms"] > 0
