"""CUTLASS's stock SM90 FP8 GEMMs against cuBLASLt's (torch._scaled_mm) at the LLaMA-7B shapes:
the first measurement of the epilogue route for issue 12's layer bar (benchmarks/NOTES.md). Needs
the `nvidia-cutlass` wheel (its headers: cutlass_library/source/include) and nvcc; builds
fp8_gemm.cu with torch.utils.cpp_extension.load (a few minutes, cached in TORCH_EXTENSIONS_DIR).

    python benchmarks/cutlass_probe/probe.py            # M = 8192, the three 7B shapes

Prints a table (median ms of CUDA-event-timed calls, TFLOP/s, the output's largest difference
from cuBLASLt's relative to its largest magnitude) and writes
benchmarks/results/cutlass_probe_<gpu>.json.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402

KERNELS = ("coop_128x256_c1x2", "coop_256x128_c2x1", "pingpong_64x256_c1x2",
           "pingpong_128x128_c1x2", "pingpong_128x128_c2x1")
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))


def load_cutlass(name: str, sources: list[str]):
    """torch.utils.cpp_extension.load of CUDA sources against CUTLASS's headers (the
    `nvidia-cutlass` wheel's), for sm_90a."""
    import cutlass_library
    from torch.utils.cpp_extension import load

    source = pathlib.Path(cutlass_library.__file__).resolve().parent / "source"
    site = pathlib.Path(torch.__file__).resolve().parents[1]
    return load(name, sources,
                extra_include_paths=[str(source / "include"), str(source / "tools/util/include"),
                                     str(site / "nvidia/cu13/include")],
                extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-DNDEBUG",
                                   "-gencode=arch=compute_90a,code=sm_90a"],
                verbose=False)


def build():
    return load_cutlass("falqon_cutlass_probe", [str(HERE / "fp8_gemm.cu")])


def median_ms(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(mod, M: int, K: int, N: int, reps: int, warmup: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.float8_e4m3fn)
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.5).to(torch.float8_e4m3fn)
    sx, sw = torch.tensor(0.02, device="cuda"), torch.tensor(0.01, device="cuda")
    scale = sx * sw

    def cublaslt():
        return torch._scaled_mm(x, w.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    ref = cublaslt().float()
    flop = 2 * M * N * K
    rows = [{"kernel": "cublaslt (torch._scaled_mm)", "ms": median_ms(cublaslt, reps, warmup),
             "max_rel_diff": 0.0}]
    for name in KERNELS:
        fn = getattr(mod, name)
        try:
            diff = (fn(x, w, scale).float() - ref).abs().max() / ref.abs().max()
            rows.append({"kernel": name, "ms": median_ms(lambda: fn(x, w, scale), reps, warmup),
                         "max_rel_diff": diff.item()})
        except RuntimeError as exc:
            rows.append({"kernel": name, "skipped": str(exc).splitlines()[0]})
    for r in rows:
        r.update({"K": K, "N": N, "M": M})
        if "ms" in r:
            r["tflops"] = flop / r["ms"] / 1e9
    return rows


def main(argv=None):
    args = common.probe_args(__doc__, argv, reps=50, warmup=10)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("cutlass probe: needs a Hopper GPU (sm_90a kernels)")
    mod = build()
    records = [r for K, N in SHAPES for r in measure(mod, args.M, K, N, args.reps, args.warmup)]
    rows = [[f"{r['K']}->{r['N']}", r["kernel"], r.get("ms"), r.get("tflops"),
             r.get("max_rel_diff"), r.get("skipped")] for r in records]
    common.finish_probe("cutlass_probe", __file__, argv, args.out,
                        ["K->N", "kernel", "ms", "TFLOP/s", "max rel diff", "skipped"], rows,
                        records)


if __name__ == "__main__":
    main()
