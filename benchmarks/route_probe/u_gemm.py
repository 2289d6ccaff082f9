"""The adapter mode's two small products over the gradient g (M x N, bf16) through stock cuBLAS, at
M = 8192 and N = 4096 / 11008, r = 64 (benchmarks/NOTES.md, next device calls after run 91):

- u = g B (M x r): falqon's cuBLASLt call writes fp32 u in 25.2 / 56.2 us (run 89's profile, a
  64x80 tile; split-K at 11,008); here cuBLAS's torch.mm with bf16 out, the transposed product
  u^T = B^T g^T, and fp32 out where torch.mm takes out_dtype;
- dB^T = xa^T g (r x N), the product falqon's fused backward pass forms with mma.sync (29 / 68 us
  with g's amax), the same three ways;
- one read of g (torch.amax), the bandwidth either product could reach.

Pure torch, no falqon build. Timing is the benchmarks' Timer (L2 flushed before each call,
medians). Prints a table; writes benchmarks/results/u_gemm_probe_<gpu>.json.

    python benchmarks/route_probe/u_gemm.py
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


def variants(g: torch.Tensor, B: torch.Tensor, xa: torch.Tensor) -> dict[str, tuple]:
    """name -> (callable, bytes of g read): u's and dB's products, and g's read alone."""
    Bt = B.t().contiguous()       # (r, N)
    xat = xa.t().contiguous()     # (r, M)

    def fp32_out(a, b):
        return torch.mm(a, b, out_dtype=torch.float32)

    return {
        "read g (amax)": lambda: torch.amax(g),
        "u = g B, bf16 out": lambda: torch.mm(g, B),
        "u^T = B^T g^T, bf16 out": lambda: torch.mm(Bt, g.t()),
        "u = g B, fp32 out": lambda: fp32_out(g, B),
        "u^T = B^T g^T, fp32 out": lambda: fp32_out(Bt, g.t()),
        "dB^T = xa^T g, bf16 out": lambda: torch.mm(xat, g),
        "dB = g^T xa, bf16 out": lambda: torch.mm(g.t(), xa),
        "dB^T = xa^T g, fp32 out": lambda: fp32_out(xat, g),
    }


def measure(timer, M: int, N: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(N)
    g = torch.randn(M, N, device="cuda", generator=gen).to(torch.bfloat16)
    B = (torch.randn(N, RANK, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    xa = torch.randn(M, RANK, device="cuda", generator=gen).to(torch.bfloat16)
    records = []
    for name, fn in variants(g, B, xa).items():
        record = {"M": M, "N": N, "r": RANK, "variant": name}
        try:
            fn()
        except (RuntimeError, TypeError) as e:  # e.g. no out_dtype in this torch
            record["skipped"] = str(e).splitlines()[0][:80]
            records.append(record)
            continue
        us = timer.median(fn) * 1e3
        record.update(us=round(us, 1), tb_per_s_of_g=round(g.numel() * 2 / us / 1e6, 2))
        records.append(record)
    return records


def main(argv=None) -> int:
    args = common.probe_args(__doc__, argv, reps=30)
    if not torch.cuda.is_available():
        sys.exit("u_gemm probe: needs a CUDA GPU")
    timer = common.Timer("cuda", warmup=args.warmup, reps=args.reps)
    records = [r for N in WIDTHS for r in measure(timer, args.M, N)]
    rows = [[r["N"], r["variant"], r.get("us"), r.get("tb_per_s_of_g"), r.get("skipped")]
            for r in records]
    common.finish_probe("u_gemm_probe", __file__, argv, args.out,
                        ["N", "variant", "us", "TB/s of g", "skipped"], rows, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
