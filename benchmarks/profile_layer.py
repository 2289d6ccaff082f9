"""Where one melded layer's fwd+bwd spends its GPU time: kernels grouped by role, against the
wall time of the same iterations, so that idle gaps (host overhead, launch latency) show.

    python benchmarks/profile_layer.py                 # the three LLaMA-7B shapes, M = 8192, r = 64
    python benchmarks/profile_layer.py --shapes 4096x4096 --M 2048
    python benchmarks/profile_layer.py --amax-history-len 16   # delayed scaling

Prints a table per shape (us per iteration) and writes benchmarks/results/profile_layer_<gpu>.json.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import falqon  # noqa: E402

# Kernel name patterns, first match wins. FP8 GEMMs before bf16 ones: cuBLASLt's Hopper kernels
# are all named nvjet_sm90_*, the FP8 ones nvjet_sm90_q* (qqtst, qrtst, ...), and CUTLASS/xmma
# FP8 kernels carry e4m3/e5m2/f8 in their names.
GROUPS = [
    # The backward's one read of g: its amax pass (current scaling) or its cast (delayed), with dB.
    ("g pass + dB (fused)", re.compile(r"grad_quantize_product", re.I)),
    ("dB split reduce", re.compile(r"grad_b_reduce", re.I)),
    ("amax history record", re.compile(r"record_amax", re.I)),
    ("quantize: amax pass", re.compile(r"amax_kernel|amax", re.I)),
    ("quantize: cast pass", re.compile(
        r"scaled_map_kernel|quantize_kernel|quantiz|CastOp|cast_fp8|fp8_cast|scale_cast", re.I)),
    ("transpose", re.compile(r"transpose", re.I)),
    ("topk", re.compile(r"topk|row_score|update_rows", re.I)),
    ("fp8 gemm", re.compile(r"nvjet_sm\d+a?_q|e4m3|e5m2|f8f8|_f8_|fp8|qgmma", re.I)),
    ("bf16 gemm (dB)", re.compile(r"gemm|cutlass|sm90|xmma|ampere|nvjet", re.I)),
    ("copy/fill", re.compile(r"copy|fill|memset|memcpy", re.I)),
    ("elementwise/reduce", re.compile(r"elementwise|reduce|vectorized", re.I)),
]


def group_of(name: str) -> str:
    return next((g for g, pat in GROUPS if pat.search(name)), "other")


def profile_shape(K: int, N: int, M: int, r: int, iters: int, amax_history_len: int = 0,
                  transposed_copy: bool = False) -> dict:
    layer = falqon.MeldedLinear.from_linear(
        torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16), rank=r,
        amax_history_len=amax_history_len, transposed_copy=transposed_copy)
    x = (torch.randn(M, K, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

    def step():
        x.grad = layer.lora_B.grad = None
        layer(x).backward(g)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
    wall_us = start.elapsed_time(end) * 1e3 / iters
    kernels = collections.Counter()
    names = collections.defaultdict(collections.Counter)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            grp = group_of(evt.name)
            kernels[grp] += evt.device_time / iters
            names[grp][evt.name[:90]] += evt.device_time / iters
    busy = sum(kernels.values())
    return {"shape": [K, N], "M": M, "r": r, "amax_history_len": amax_history_len,
            "transposed_copy": transposed_copy,
            "wall_us": wall_us, "gpu_busy_us": busy,
            "idle_us": wall_us - busy, "groups_us": dict(kernels),
            "kernels_us": {g: dict(c.most_common(6)) for g, c in names.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096",
                        help="KxN (in x out) list")
    parser.add_argument("--M", type=int, default=8192)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--amax-history-len", type=int, default=0,
                        help="0: current scaling (default); H > 0: delayed scaling with H amaxes "
                             "(the warm-up iterations fill the history)")
    parser.add_argument("--transposed-copy", action="store_true",
                        help="keep the persistent transposed weight (no transpose in backward)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    records = []
    for spec in args.shapes.split(","):
        K, N = (int(v) for v in spec.lower().split("x"))
        rec = profile_shape(K, N, args.M, args.r, args.iters, args.amax_history_len,
                            args.transposed_copy)
        records.append(rec)
        print(f"\n{K}->{N}, M={args.M}, r={args.r}: wall {rec['wall_us']:.0f} us/iter, "
              f"GPU busy {rec['gpu_busy_us']:.0f}, idle {rec['idle_us']:.0f}")
        for grp, us in sorted(rec["groups_us"].items(), key=lambda kv: -kv[1]):
            print(f"  {grp:22s} {us:8.1f} us")
            for name, kus in rec["kernels_us"][grp].items():
                print(f"      {kus:8.1f}  {name}")
    suffix = (f"_delayed{args.amax_history_len}" if args.amax_history_len else "") + (
        "_wt" if args.transposed_copy else "")
    out = args.out or common.RESULTS_DIR / f"profile_layer_{common.device_tag('cuda')}{suffix}.json"
    common.write_json(out, common.run_metadata("cuda", __file__, sys.argv[1:]), records)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
