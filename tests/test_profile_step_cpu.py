"""CPU tests of the step profile (benchmarks/profile_step.py): how GPU kernels and CPU ops are
classified into the step's groups, and the profile of a tiny model's step in both update modes."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from falqon_testing import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import profile_step  # noqa: E402

import falqon  # noqa: E402

requires_meld = pytest.mark.skipif(not all(hasattr(falqon, n) for n in ("meld", "attach",
                                                                        "FalqonConfig")),
                                   reason="falqon.meld / falqon.attach are not in this checkout")
TINY = ["--device", "cpu", "--model", "tiny", "--rank", "8", "--batch", "2", "--seq", "32"]


def test_profile_step_fused_is_the_adapter_mode_on_a_gpu(capsys):
    # --fused profiles model.py's falqon_fused: its update mode is the adapter's, and Liger
    # Kernel's kernels need CUDA; both are one-line usage errors, not a traceback mid-build.
    for argv, message in ((["--fused", "--update-mode", "proxy"], "trains in the adapter mode"),
                          (["--fused", "--update-mode=proxy"], "trains in the adapter mode"),
                          (["--fused", "--device", "cpu"], "needs a CUDA GPU")):
        with pytest.raises(SystemExit) as exc:
            profile_step.parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert profile_step.parse_args([]).update_mode == "proxy"
    if torch.cuda.is_available():
        args = profile_step.parse_args(["--fused"])
        assert args.fused and args.update_mode == "adapter"


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
    # MeldedLinear's own autograd boundary (ops._MeldedLinearFunction) names its node apart.
    assert c("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", ["aten::mm", "_MeldedLinearFunctionBackward"],
             "backward", True) == "dB"
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


def test_classify_adapter_mode_kernels():
    """In the adapter mode the melded ops' non-FP8 GEMMs are B's (forward xa B^T, backward
    u = g B); its operand kernels are quantise. The proxy mode's groups stay as they were."""
    c = profile_step.classify
    fwd = ["falqon::melded_linear", "falqon_bench::forward"]
    both = ["falqon::melded_linear_backward",
            "GeneratedBackwardFor_falqon_melded_linear_defaultBackward"]
    bf16 = "nvjet_sm90_tst_128x64_64x4_1x2_h_bz_coopA_NNT"
    fp8 = "nvjet_sm90_qqtst_128x256_128x4_1x2_h_bz_coopA_TNN"
    assert c(bf16, fwd, "forward", True, adapter=True) == "adapter GEMMs"
    # Hopper's pass over y (adapter_y.cu) in its place
    y_pass = "void falqon::cuda::(anonymous namespace)::adapter_y_kernel<c10::BFloat16>(CUtensorMa"
    assert c(y_pass, fwd, "forward", True, adapter=True) == "adapter GEMMs"
    assert c(fp8, fwd, "forward", True, adapter=True) == "fwd GEMMs"
    assert c(bf16, fwd, "forward", True) == "fwd GEMMs"  # proxy: unchanged
    assert c(bf16, both, "backward", True, adapter=True) == "adapter GEMMs"
    assert c("nvjet_qqtst_128x256_64x4_2x1_v_bz_coopB_TNT", both, "backward", True,
             adapter=True) == "dgrad GEMMs"
    assert c(bf16, ["aten::mm"] + both, "backward", True, adapter=True) == "dB"  # fp32 path
    assert c(bf16, both, "backward", True) == "dB"
    for kernel in ("void falqon::cuda::(anonymous namespace)::adapter_partials_kernel(float co",
                   "void falqon::cuda::(anonymous namespace)::adapter_cast_kernel<c10::BFloat16,",
                   # Hopper's row pass over g, B^T's conversion for it, the wgmma cast pass
                   "void falqon::cuda::(anonymous namespace)::adapter_u_rows_kernel<c10::BFloat",
                   "void falqon::cuda::(anonymous namespace)::adapter_b_t_kernel<c10::BFloat16,",
                   "void falqon::cuda::(anonymous namespace)::grad_cast_product_kernel<c10::BFl"):
        assert c(kernel, both, "backward", True, adapter=True) == "quantise"
    # The CPU reference: the forward's adapter product is its addmm, the FP8 product its mm.
    assert c("aten::addmm", ["aten::addmm"] + fwd, "forward", False, adapter=True) == \
        "adapter GEMMs"
    assert c("aten::mm", ["aten::mm"] + fwd, "forward", False, adapter=True) == "fwd GEMMs"
    assert c(bf16, fwd + [profile_step.RECOMPUTE], "backward", True, adapter=True) == "recompute"
    assert profile_step.categories(True) == profile_step.ADAPTER_CATEGORIES
    assert "adapter GEMMs" not in profile_step.CATEGORIES
    assert "proxy update" not in profile_step.ADAPTER_CATEGORIES


def test_gpu_units_skip_annotation_mirrors_count_compiled_kernels():
    from types import SimpleNamespace as NS

    cpu = torch.autograd.DeviceType.CPU
    ms = [float(torch.empty(()).uniform_(1, 100)) for _ in range(4)]
    triton = "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0"
    events = [
        NS(name="falqon_bench::forward", device_type=cpu,
           kernels=[NS(name="falqon_bench::forward", duration=sum(ms))]),
        NS(name="aten::mm", device_type=cpu, kernels=[NS(name="nvjet_tst", duration=ms[0]),
                                                      NS(name="splitKreduce", duration=ms[1])]),
        NS(name="aten::add", device_type=cpu, kernels=[NS(name="elementwise", duration=ms[2])]),
        # Inductor's launch: a range named after its kernel.
        NS(name=triton, device_type=cpu, kernels=[NS(name=triton, duration=ms[3])]),
        NS(name="nvjet_tst", device_type=torch.autograd.DeviceType.CUDA, kernels=[]),
    ]
    got = [(n, us) for n, us, _ in profile_step.units(events, on_gpu=True)]
    assert got == [("nvjet_tst", ms[0]), ("splitKreduce", ms[1]), ("elementwise", ms[2]),
                   (triton, ms[3])]
    assert profile_step.classify(triton, [triton, "CompiledFunction"], "backward",
                                 True) == profile_step.COMPILED
    assert profile_step.classify(triton, [triton, profile_step.RECOMPUTE], "backward",
                                 True) == "recompute"


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
    assert result["update_mode"] == "proxy" and saved["update_mode"] == "proxy"


@requires_meld
@pytest.mark.slow
def test_profile_step_adapter_cpu(tmp_path, one_thread):
    """--update-mode adapter: model.py's falqon_adapter, no proxy update (no phase, no group) and
    the adapter's GEMMs in their own group, one per projection outside the recompute."""
    out = tmp_path / "profile_adapter_cpu.json"
    result = profile_step.main(TINY + ["--warmup", "1", "--timed-steps", "1", "--update-mode",
                                       "adapter", "--out", str(out)])
    assert json.loads(out.read_text())["update_mode"] == "adapter"
    cats = {c["group"]: c for c in result["records"]}
    assert list(cats) == list(profile_step.ADAPTER_CATEGORIES)
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
    assert cats["adapter GEMMs"]["count"] == 14 and cats["adapter GEMMs"]["ms"] > 0
    assert cats["fwd GEMMs"]["count"] == 14 and cats["dgrad GEMMs"]["count"] == 28  # with u's
    assert result["recompute_breakdown_ms"].get("adapter GEMMs", 0) > 0
    assert "proxy update" not in profile_step.format_table(result)
    assert "adapter GEMMs: " in profile_step.format_table(result)
    assert profile_step.parse_args(["--device", "cpu"]).update_mode == "proxy"
