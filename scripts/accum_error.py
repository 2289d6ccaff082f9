"""Is cuBLASLt's FP8 fast accumulation accurate enough for the dgrad GEMM? (GPU with FP8 only.)

dx = fp8(g) W_q carries two errors: the E5M2 rounding of the gradient g (2 mantissa bits, a
relative step of up to 2^-2) and the GEMM's own accumulation and bf16 output rounding. Fast
accumulation (CUBLASLT_MATMUL_DESC_FAST_ACCUM) keeps the Hopper tensor cores' partial sums in
their reduced internal precision instead of promoting them to fp32 every few k-steps. This
script measures, at the LLaMA-7B shapes, for a gradient with the heavy-tailed entries of a real
backward (Student-t, 4 degrees of freedom) and for a Gaussian one:

  quantisation  ||dx_exact(fp8 g, W_q) - dx_exact(g, W_q)|| / ||dx_exact(g, W_q)||
  split         ||dx_gemm(fast=0) - dx_exact(fp8 g, W_q)|| / ||dx_exact(fp8 g, W_q)||
  fast          the same with fast=1

with dx_exact in float64. Fast accumulation is worth taking where its error stays far below the
quantisation error that dgrad carries anyway (the decision in benchmarks/NOTES.md).

    python scripts/accum_error.py [--M 2048] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

import falqon
from falqon.ops import E4M3, E5M2

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N): in_features, out_features


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(K: int, N: int, M: int, dist: str, gen: torch.Generator) -> dict:
    dev = "cuda"
    weight = (torch.randn(N, K, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
    if dist == "student_t":
        # t(4) = normal / sqrt(chi2(4) / 4), drawn from the same generator.
        chi2 = (torch.randn(M, N, 4, device=dev, generator=gen) ** 2).sum(-1)
        g = torch.randn(M, N, device=dev, generator=gen) / (chi2 / 4).sqrt()
    else:
        g = torch.randn(M, N, device=dev, generator=gen)
    g = (g * 1e-3).to(torch.bfloat16)
    wq, sw = falqon.quantize(weight, E4M3)
    gq, sg = falqon.quantize(g, E5M2)
    w_real = wq.double() * sw.double()
    exact_q = (gq.double() * sg.double()) @ w_real      # the GEMM's exact result
    exact_g = g.double() @ w_real                        # without the gradient's rounding
    wt = torch.ops.falqon_bench.transpose_fp8(wq)
    out = {}
    for fast in (False, True):
        dx = torch.ops.falqon_bench.scaled_gemm(wt, sw, gq, sg, torch.bfloat16, fast)
        out["fast" if fast else "split"] = rel(dx, exact_q)
    out["quantisation"] = rel(exact_q, exact_g)
    out["bf16_output_rounding"] = rel(exact_q.to(torch.bfloat16), exact_q)
    return {"K": K, "N": N, "M": M, "dist": dist, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--M", type=int, default=2048, help="gradient rows (default 2048)")
    p.add_argument("--out", type=pathlib.Path, help="also write the records as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("accum_error: needs a CUDA GPU with FP8 (compute capability 8.9 or newer)")
    gen = torch.Generator("cuda").manual_seed(0)
    rows = [measure(K, N, args.M, dist, gen) for K, N in SHAPES for dist in ("student_t", "normal")]
    print(f"{'K x N':>12} {'dist':>9} {'quantisation':>13} {'split':>10} {'fast':>10} "
          f"{'bf16 out':>10} {'fast/quant':>10}")
    for r in rows:
        print(f"{r['K']:>5} x {r['N']:<5} {r['dist']:>9} {r['quantisation']:13.3e} "
              f"{r['split']:10.3e} {r['fast']:10.3e} {r['bf16_output_rounding']:10.3e} "
              f"{r['fast'] / r['quantisation']:10.3e}")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                        "torch": torch.__version__, "records": rows}, indent=1))


if __name__ == "__main__":
    main()
