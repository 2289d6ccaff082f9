"""benchmarks/layer.py and benchmarks/common.py on the CPU: a tiny sweep end to end (its times
mean nothing), the results file, the table, and the peers that cannot run listed with why; the
falqon methods' layers (mode and options); profile_layer.py's kernel groups and file names."""

from __future__ import annotations

import json

import pytest
import torch

from falqon_testing import REPO

import sys
sys.path.insert(0, str(REPO / "benchmarks"))
import common  # noqa: E402
import layer  # noqa: E402
import profile_layer  # noqa: E402


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
                     "falqon_delayed_wt", "falqon_adapter", "falqon_adapter_delayed",
                     "falqon_adapter_delayed_wt"}
    assert all(r["ms"] > 0 for r in recs if r["ms"] is not None)
    # The peers that cannot run here are listed with the reason, in the JSON and the output.
    assert "(test)" in res["skipped"]["qlora_nf4"]
    assert "fp8_lora_torchao" in res["skipped"]
    assert "skipped qlora_nf4: bitsandbytes is not importable" in printed
    # The table comes last, with speed-ups over bf16_lora and falqon's ratio to the floor.
    tail = printed.rstrip().split("\n\n")[-2:]
    assert tail[0].startswith("Layer fwd+bwd") and tail[1].startswith("Layer forward alone")
    assert "falqon x" in tail[0] and "falqon/floor" in tail[0]
    for m in layer.FALQON_METHODS:  # every falqon method's speed-up and ratio to the floor
        assert f" {m} x " in tail[0] and f" {m}/floor " in tail[0], m
    assert "| 64->32 | 16 | 8 |" in tail[0] and "| 32->48 |  5 | 8 |" in tail[0]
    assert table.read_text().strip() == "\n\n".join(tail).strip()


def _floor_ratio(table: str, method: str, row: str) -> str:
    """The cell of column "<method>/floor" in the table's row starting with `row`."""
    lines = table.splitlines()
    header = [c.strip() for c in lines[1].split("|")]
    line = next(l for l in lines if l.startswith(row))
    return [c.strip() for c in line.split("|")][header.index(f"{method}/floor")]


def test_layer_method_subset(tmp_path, capsys, one_thread):
    """--methods runs only the methods named (what a short GPU call uses); each falqon method's
    ratio to the floor is its median over the floor's, from the records."""
    out = tmp_path / "layer.json"
    methods = ["bf16_lora", "fp8_floor", "falqon_adapter", "falqon_adapter_delayed_wt"]
    assert layer.main(["--device", "cpu", "--shapes", "64x32", "--M", "16", "--r", "8",
                       "--reps", "2", "--warmup", "1", "--methods", ",".join(methods),
                       "--out", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert [r["method"] for r in recs if r["pass"] == "fwd_bwd"] == methods
    assert all(r["ms"] for r in recs)
    table = capsys.readouterr().out.rstrip().split("\n\n")[-2]
    assert "falqon/floor" not in table and "falqon_wt" not in table
    ms = {r["method"]: r["ms"] for r in recs if r["pass"] == "fwd_bwd"}
    for m in methods[2:]:
        assert _floor_ratio(table, m, "| 64->32 |") == f"{ms[m] / ms['fp8_floor']:.3f}"


@pytest.mark.parametrize("method,mode,history,transposed", [
    ("falqon", "proxy", 0, False), ("falqon_wt", "proxy", 0, True),
    ("falqon_delayed", "proxy", layer.DELAYED_HISTORY, False),
    ("falqon_delayed_wt", "proxy", layer.DELAYED_HISTORY, True),
    ("falqon_adapter", "adapter", 0, False),
    ("falqon_adapter_delayed", "adapter", layer.DELAYED_HISTORY, False),
    ("falqon_adapter_delayed_wt", "adapter", layer.DELAYED_HISTORY, True),
])
def test_falqon_methods_build_their_layers(method, mode, history, transposed):
    """Every proxy method stays the paper's mode (what it measured before the adapter mode became
    falqon's default); the adapter methods time a non-zero B (no shortcut)."""
    weight = torch.randn(32, 64, dtype=layer.DTYPE) * 0.02
    ctx = layer.Context(topk=4)
    module = layer.BUILDERS[method](weight, 8, ctx).module
    assert module.update_mode == mode and module.amax_history_len == history
    assert (module.weight_t is not None) == transposed
    b = module.lora_B.detach()
    if mode == "adapter":
        assert b.abs().min() > 0 and 0.005 < float(b.std()) < 0.02
        assert 8 not in ctx.melded  # the floor's operands come from a proxy layer
    else:
        assert not b.any()


def test_profile_layer_kernel_groups():
    """Kernel names seen on the H100 (results/profile_layer*_h100.json) keep their rows; the
    adapter mode's kernels get their own, and its non-FP8 GEMMs are "16-bit GEMMs (adapter)"."""
    g = profile_layer.group_of
    fp8 = ["nvjet_sm90_qqtst_128x256_128x4_1x2_h_bz_coopA_TNN",
           "nvjet_sm90_qrtst_128x256_128x4_2x1_v_bz_coopA_TNN", "nvjet_qqtst_128x256_64x4_2x1_v",
           "sm90_xmma_gemm_e4m3e4m3_bf16_tn_n_tilesize128x128x128",
           "cutlass3x_sm90_tensorop_gemm_f8_f8_f32_bf16"]
    sixteen = ["nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNN", "nvjet_hsh_128x64_64x4_1x2_h_bz_NNT",
               "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1",
               "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn",
               "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x128x64",
               # Seen on the H200 in the adapter mode (u = g B, profile_layer --update-mode adapter)
               "nvjet_sm90_tst_256x128_64x4_1x2_h_bx_coopA_TNT",
               "nvjet_sm90_tss_64x128_64x8_1x2_h_bz_splitK_NNN",
               "void cublasLt::splitKreduce_kernel<32, 16, int, float, float, float, float, false"]
    for mode in ("proxy", "adapter"):
        assert all(g(n, mode) == "fp8 gemm" for n in fp8), mode
        other = "bf16 gemm (dB)" if mode == "proxy" else "16-bit GEMMs (adapter)"
        assert all(g(n, mode) == other for n in sixteen), mode
        assert g("void falqon::cuda::(anonymous namespace)::adapter_partials_kernel(float const*,"
                 " long, float const*, long, unsigned int*)", mode) == "adapter operand: u amax"
        assert g("void falqon::cuda::(anonymous namespace)::adapter_cast_kernel<c10::BFloat16, "
                 "false>(c10::BFloat16 const*, int, long", mode) == "adapter operand: cast"
    kernels = {
        "void falqon::cuda::(anonymous namespace)::amax_kernel<c10::BFloat16, 8>(c10::B":
            "quantize: amax pass",
        "void falqon::cuda::(anonymous namespace)::scaled_map_kernel<c10::BFloat16, 8, falqon":
            "quantize: cast pass",
        "void falqon::cuda::(anonymous namespace)::grad_quantize_product_kernel<c10::BFloat16, 4":
            "g pass + dB (fused)",
        "void falqon::cuda::(anonymous namespace)::grad_cast_product_kernel<c10::BFloat16, false>":
            "g pass + dB (fused)",
        "void falqon::cuda::(anonymous namespace)::adapter_u_rows_kernel<c10::BFloat16>(CUtensorMap":
            "adapter operand: u row pass",
        "void falqon::cuda::(anonymous namespace)::adapter_b_t_kernel<c10::BFloat16, float>(f":
            "adapter operand: u row pass",
        "void falqon::cuda::(anonymous namespace)::adapter_y_kernel<c10::BFloat16>(CUtensorMap":
            "adapter term: y pass",
        "void falqon::cuda::(anonymous namespace)::grad_b_reduce_kernel<float>(float const*":
            "dB split reduce",
        "void falqon::cuda::(anonymous namespace)::transpose_fp8_kernel<true>(unsigned char":
            "transpose",
        "falqon::cuda::(anonymous namespace)::record_amax_kernel(float*, long, float const*)":
            "amax history record",
        "void falqon::cuda::(anonymous namespace)::delayed_quantize_kernel<c10::BFloat16, 8, t":
            "quantize: cast pass",
        "Memset (Device)": "copy/fill",
    }
    for name, group in kernels.items():
        assert g(name) == group and g(name, "adapter") == group, name


def test_profile_layer_options_and_names():
    args = profile_layer.parse_args([])
    assert args.update_mode == "proxy" and args.amax_history_len == 0
    name = profile_layer.output_name
    # The committed files' names (the proxy mode) are unchanged; the adapter mode's differ.
    assert name("h100", "proxy", 0, False) == "profile_layer_h100.json"
    assert name("h100", "proxy", 16, True) == "profile_layer_h100_delayed16_wt.json"
    assert name("h200", "adapter", 0, False) == "profile_layer_adapter_h200.json"
    assert name("h200", "adapter", 16, True) == "profile_layer_adapter_h200_delayed16_wt.json"
    assert profile_layer.parse_args(["--update-mode", "adapter"]).update_mode == "adapter"
    with pytest.raises(SystemExit):
        profile_layer.parse_args(["--update-mode", "lora"])


def test_parse_options():
    args = layer.parse_args(["--quick"])
    assert args.shape_list == layer.SHAPES["7b"] and args.M == [8192] and args.r == [64]
    args = layer.parse_args(["--shapes", "13b,256x512", "--M", "1,2", "--methods", "falqon"])
    assert args.shape_list == layer.SHAPES["13b"] + [(256, 512)]
    assert args.M == [1, 2] and args.method_list == ["falqon"]
    assert len(layer.parse_args([]).shape_list) == 6
    args = layer.parse_args(["--quick", "--methods", "bf16_lora,fp8_floor,falqon,falqon_adapter,"
                             "falqon_adapter_delayed_wt"])
    assert args.method_list == ["bf16_lora", "fp8_floor", "falqon", "falqon_adapter",
                                "falqon_adapter_delayed_wt"]
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
