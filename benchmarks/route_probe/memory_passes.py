"""The adapter mode's two memory-bound passes that are not over g, alone, at M = 8192 and the
LLaMA-7B shapes (benchmarks/NOTES.md, run 124):

- the forward's adapter term y = y_base + scaling xa B^T (y_base strided in the (M, N + 64)
  product, r = 64): adapter_y.cu's pass ("kernel") against cuBLASLt's GEMM with y_base as C
  ("gemm"), bytes = a read of y_base and a write of y;
- the dgrad's transpose of W' ((N + 64) x K FP8), bytes = its read and its write.

Needs falqon built with sm_90a on a Hopper GPU (the kernel side). Timing is the benchmarks' Timer
(L2 flushed before each call, medians). Prints a table; writes
benchmarks/results/memory_passes_<gpu>.json.

    python benchmarks/route_probe/memory_passes.py
"""

from __future__ import annotations

import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402

import falqon  # noqa: E402,F401  (registers torch.ops.falqon_bench)

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (K, N)
RANK = 64


def measure(timer, M: int, K: int, N: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(N + K)
    product = torch.randn(M, N + RANK, device="cuda", generator=gen).to(torch.bfloat16)
    y_base = product[:, :N]
    xa = product[:, N:].contiguous()
    b = (torch.randn(N, RANK, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    w = torch.randint(0, 256, (N + RANK, K), dtype=torch.uint8, device="cuda",
                      generator=gen).view(torch.float8_e4m3fn)
    records = []
    y_bytes = 2 * M * N * 2
    for impl in ("kernel", "gemm"):
        us = timer.median(lambda: torch.ops.falqon_bench.adapter_output(y_base, xa, b, 0.5, impl)) * 1e3
        records.append({"K": K, "N": N, "M": M, "pass": f"adapter term ({impl})", "us": round(us, 1),
                        "tb_per_s": round(y_bytes / us / 1e6, 2)})
    us = timer.median(lambda: torch.ops.falqon_bench.transpose_fp8(w)) * 1e3
    records.append({"K": K, "N": N, "M": M, "pass": "transpose of W'", "us": round(us, 1),
                    "tb_per_s": round(2 * w.numel() / us / 1e6, 2)})
    return records


def main(argv=None) -> int:
    args = common.probe_args(__doc__, argv, reps=30)
    if not torch.cuda.is_available():
        sys.exit("memory_passes probe: needs a CUDA GPU")
    timer = common.Timer("cuda", warmup=args.warmup, reps=args.reps)
    records = [r for K, N in SHAPES for r in measure(timer, args.M, K, N)]
    rows = [[f"{r['K']} -> {r['N']}", r["pass"], r["us"], r["tb_per_s"]] for r in records]
    common.finish_probe("memory_passes", __file__, argv, args.out,
                        ["shape", "pass", "us", "TB/s"], rows, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
