"""Measurements behind the routes to issue 12's layer bar (benchmarks/NOTES.md, runs 81-84), at
M = 8192 and the LLaMA-7B layer shapes, on one Hopper GPU:

- gemm_scales: cuBLASLt FP8 GEMMs (fast accumulation, bf16 out) with per-tensor scales against
  outer-vector ones (a scale per row of x or g and per row of W'), the GEMMs a row-wise
  quantisation of x and of the gradient would run;
- route_gemms: the forward's GEMMs today (x_q against W' = [W; A], N + 64 outputs) and on the two
  routes that drop its pass over y: xa = x_q A_q^T first (64 outputs), then W alone (an epilogue
  adds the adapter) or W with B appended along k (K + 64);
- quantize: falqon.quantize (two passes: amax, then the cast) against a one-pass row-wise cast;
- l2: a second pass over 64 MiB right after a first one, walking forwards or backwards.

Needs nvcc (kernels.cu is built with torch.utils.cpp_extension.load, ~1 min). Timing is the
benchmarks' Timer (L2 flushed before each call, medians). Prints a table; writes
benchmarks/results/route_probe_<gpu>.json.

    python benchmarks/route_probe/probe.py
"""

from __future__ import annotations

import pathlib
import statistics
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
R16 = 64  # the adapter's rows in W' at r = 64
SCALAR, OUTER_VEC = 0, 3  # cublasLtMatmulMatrixScale_t


def build():
    from torch.utils.cpp_extension import load

    site = pathlib.Path(torch.__file__).resolve().parents[1]
    return load("falqon_route_probe", [str(HERE / "kernels.cu")],
                extra_include_paths=[str(site / "nvidia/cu13/include")],
                extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"],
                extra_ldflags=["-lcublasLt"], verbose=False)


def fp8(rows: int, cols: int, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(rows, cols, device="cuda") * std).to(torch.float8_e4m3fn)


def gemm_scales(ext, timer, M: int) -> list[dict]:
    """Per-tensor against outer-vector scales for the forward (a = W') and dgrad (a = W'^T)."""
    records = []
    workspace = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    for K, N in SHAPES:
        for what, m, k in (("forward", N + R16, K), ("dgrad", K, N + R16)):
            a, b = fp8(m, k, 0.5), fp8(M, k)
            out = torch.empty(M, m, device="cuda", dtype=torch.bfloat16)
            ref = None
            for label, mode in (("per-tensor", SCALAR), ("outer-vector", OUTER_VEC)):
                sa = torch.full((m if mode else 1,), 0.01, device="cuda")
                sb = torch.full((M if mode else 1,), 0.02, device="cuda")
                plan = ext.plan(m, M, k, mode, mode, True, sa, sb)
                rec = {"section": "gemm_scales", "case": f"{what} {K}->{N}", "variant": label,
                       "m": m, "n": M, "k": k}
                if plan < 0:
                    records.append({**rec, "skipped": "cuBLASLt offers no algorithm"})
                    continue
                us = timer.median(lambda: ext.run(plan, a, b, sa, sb, out, workspace)) * 1e3
                if ref is None:
                    ref = out.float()
                diff = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                records.append({**rec, "us": us, "tflops": 2 * m * M * k / us / 1e6,
                                "max_rel_diff": diff})
    return records


def route_gemms(timer, M: int) -> list[dict]:
    """torch._scaled_mm (cuBLASLt, per-tensor, fast accumulation) for each route's GEMMs."""
    one = torch.ones((), device="cuda")
    records = []
    for K, N in SHAPES:
        cases = {
            "today: x_q W'^T (N + 64 outputs)": (M, K, N + R16),
            "xa = x_q A_q^T (64 outputs)": (M, K, R16),
            "epilogue route: x_q W^T (N outputs)": (M, K, N),
            "k-concat route: [x_q | t] [W | B]^T (K + 64)": (M, K + R16, N),
        }
        for case, (m, k, n) in cases.items():
            a, b = fp8(m, k), fp8(n, k, 0.5)
            us = timer.median(lambda: torch._scaled_mm(
                a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                use_fast_accum=True)) * 1e3
            records.append({"section": "route_gemms", "case": f"{K}->{N}", "variant": case,
                            "m": m, "n": n, "k": k, "us": us, "tflops": 2 * m * n * k / us / 1e6})
    return records


def quantize(ext, timer, M: int) -> list[dict]:
    import falqon  # noqa: F401  registers torch.ops.falqon

    records = []
    for K in sorted({k for k, _ in SHAPES}):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        rec = {"section": "quantize", "case": f"x ({M} x {K}) bf16 -> e4m3", "bytes": M * K * 3}
        records.append({**rec, "variant": "falqon.quantize (per-tensor, two passes)",
                        "us": timer.median(lambda: torch.ops.falqon.quantize(
                            x, torch.float8_e4m3fn)) * 1e3})
        for threads in (128, 256):
            us = timer.median(lambda: ext.quant_rowwise(x, threads)) * 1e3
            q, s = ext.quant_rowwise(x, threads)
            err = ((q.float() * s[:, None] - x.float()).abs()
                   / x.float().abs().amax(1, keepdim=True)).max().item()
            records.append({**rec, "variant": f"row-wise, one pass ({threads} threads a row)",
                            "us": us, "max_err_of_row_amax": err})
    return records


def l2(ext, M: int, reps: int) -> list[dict]:
    """A second read pass right after a forward one (no flush between them)."""
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    records = []
    for blocks in (264, 1056):
        for reverse in (False, True):
            times = []
            for _ in range(reps):
                ext.l2_read(x, False, blocks)
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                ext.l2_read(x, reverse, blocks)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            records.append({"section": "l2", "case": f"second read of 64 MiB, {blocks} blocks",
                            "variant": "backwards" if reverse else "forwards",
                            "us": statistics.median(times)})
    return records


def main(argv=None) -> int:
    args = common.probe_args(__doc__, argv, reps=30)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("route probe: needs a Hopper GPU (sm_90a kernels, outer-vector scales)")
    ext = build()
    timer = common.Timer("cuda", warmup=args.warmup, reps=args.reps)
    records = (gemm_scales(ext, timer, args.M) + route_gemms(timer, args.M)
               + quantize(ext, timer, args.M) + l2(ext, args.M, args.reps))
    rows = [[r["section"], r["case"], r["variant"], r.get("us"), r.get("tflops"),
             r.get("skipped")] for r in records]
    common.finish_probe("route_probe", __file__, argv, args.out,
                        ["section", "case", "variant", "us", "TFLOP/s", "skipped"], rows, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
