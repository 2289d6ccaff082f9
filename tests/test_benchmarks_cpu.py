"""CPU smoke tests of the model benchmark (benchmarks/model.py) and the proxy-update benchmark on
tiny configurations (the step profile's: test_profile_step_cpu.py; the results table's:
test_plot_results.py)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from falqon_testing import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import model as bench_model  # noqa: E402
import model_build  # noqa: E402
import plot_results  # noqa: E402  # model.py's JSON must render in the README's tables
import proxy_update  # noqa: E402

import falqon  # noqa: E402

HAS_MELD = all(hasattr(falqon, n) for n in ("meld", "attach", "FalqonConfig"))
requires_meld = pytest.mark.skipif(not HAS_MELD, reason="falqon.meld / falqon.attach are not in "
                                   "this checkout (the workflow branch)")
TINY = ["--device", "cpu", "--model", "tiny", "--rank", "8", "--batch", "2", "--seq", "32"]


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
