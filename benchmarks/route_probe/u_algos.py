"""The adapter mode's u = scaling g B (the backward's skinny GEMM over g, 25 / 56 us in run 97's
profile at 4096 / 11008 columns, ~2.6 / 3.2 TB/s of g) through every algorithm cuBLASLt's
heuristic offers for falqon's layout, not only its first choice (which falqon takes): the
question run 92 left open (benchmarks/NOTES.md). Builds u_algos.cpp with
torch.utils.cpp_extension.load (needs nvcc and cublasLt.h; no falqon build).

    python benchmarks/route_probe/u_algos.py        # M = 8192, N = 4096 / 11008, r = 64

Prints a table (median us a call of 20 calls queued between two CUDA events, TB/s of g, each
algorithm's largest difference from the first's) and writes
benchmarks/results/u_algos_<gpu>.json.
"""

from __future__ import annotations

import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402

WIDTHS = (4096, 11008)
RANK = 64
SCALING = 10.0
BATCH = 20


def build():
    """u_algos.cpp (host code only) linked against the toolkit's libcublasLt, or the one of
    torch's nvidia-cublas wheel."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    site = pathlib.Path(torch.__file__).resolve().parents[1]
    libdirs = [pathlib.Path(CUDA_HOME or "/usr/local/cuda") / "lib64", site / "nvidia/cu13/lib"]
    ldflags = []
    for libdir in libdirs:
        libs = sorted(libdir.glob("libcublasLt.so*"), key=lambda p: len(p.name))
        if libs:
            ldflags = [f"-L{libdir}", f"-l:{libs[0].name}", f"-Wl,-rpath,{libdir}"]
            break
    return load("falqon_u_algos_probe", [str(HERE / "u_algos.cpp")],
                extra_include_paths=[str(site / "nvidia/cu13/include")],
                extra_cflags=["-O2"], extra_ldflags=ldflags, with_cuda=True, verbose=False)


def measure(mod, M: int, N: int, reps: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    B = (0.01 * torch.randn(N, RANK, device="cuda")).to(torch.bfloat16)
    u = torch.empty(M, RANK, device="cuda", dtype=torch.float32)
    mod.run(g, B, u, SCALING, 0, 1)
    first = u.clone()
    rows = []
    for index, tile, splitk, stages, ws in mod.algos(M, N, RANK, 16):
        us = common.batched_gpu_us(lambda calls: mod.run(g, B, u, SCALING, index, calls),
                                   reps, warmup, BATCH)
        mod.run(g, B, u, SCALING, index, 1)
        rows.append({"M": M, "N": N, "r": RANK, "algo": index, "tile_id": tile, "splitk": splitk,
                     "stages_id": stages, "workspace": ws, "us": us,
                     "tb_s": g.numel() * g.element_size() / us / 1e6,
                     "max_diff_vs_first": ((u - first).abs().max() / first.abs().max()).item()})
    return rows


def main(argv=None):
    args = common.probe_args(__doc__, argv, reps=10, warmup=5)
    if not torch.cuda.is_available():
        sys.exit("u_algos: needs a CUDA GPU")
    mod = build()
    records = [r for N in WIDTHS for r in measure(mod, args.M, N, args.reps, args.warmup)]
    rows = [[r["N"], r["algo"], r["tile_id"], r["splitk"], r["stages_id"], r["us"], r["tb_s"],
             r["max_diff_vs_first"]] for r in records]
    common.finish_probe("u_algos", __file__, argv, args.out,
                        ["N", "algo", "tile id", "split-k", "stages id", "us", "TB/s of g",
                         "max diff vs first"], rows, records)


if __name__ == "__main__":
    main()
