"""Where one melded layer's fwd+bwd spends its GPU time: kernels grouped by role, against the
wall time of the same iterations, so that idle gaps (host overhead, launch latency) show.

    python benchmarks/profile_layer.py                 # the three LLaMA-7B shapes, M = 8192, r = 64
    python benchmarks/profile_layer.py --shapes 4096x4096 --M 2048
    python benchmarks/profile_layer.py --amax-history-len 16   # delayed scaling
    python benchmarks/profile_layer.py --update-mode adapter   # falqon's adapter mode

Prints a table per shape (us per iteration) and writes benchmarks/results/profile_layer_<gpu>.json
(the proxy mode, the paper's method and the default here), profile_layer_adapter_<gpu>.json (the
adapter mode), with _delayed<H> / _wt after the GPU's name for those options.

The adapter mode's own work shows in three groups: "16-bit GEMMs (adapter)" (every GEMM that is
not an FP8 one: the forward's y = y_base + scaling xa B^T and the backward's u = scaling g B,
cuBLASLt bf16/fp16 kernels), "adapter operand: u amax" (adapter_partials_kernel, delayed scaling
only: current scaling takes u's amax in the fused pass), "adapter operand: cast"
(adapter_cast_kernel, which casts [g | u] with current scaling, u alone with delayed scaling) and,
on Hopper with current scaling, "adapter operand: u row pass" (adapter_u_rows_kernel: u and the
operand's amax in one pass over g, after which the fused pass casts g and u and no
adapter_cast_kernel runs). B is drawn non-zero there (normal, std 0.01), as a trained adapter's.
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

# Kernel name patterns, first match wins. FP8 GEMMs before 16-bit ones: cuBLASLt's Hopper kernels
# are named nvjet_sm90_* or nvjet_*, the FP8 ones nvjet_sm90_q* / nvjet_q* (qqtst, qrtst, ...),
# and CUTLASS/xmma FP8 kernels carry e4m3/e5m2/f8 in their names.
FP8_GEMM = re.compile(r"nvjet_(sm\d+a?_)?q|e4m3|e5m2|f8f8|_f8_|fp8|qgmma", re.I)
GEMM_GROUP = "bf16 gemm (dB)"  # the proxy mode's non-FP8 GEMMs (none on its fused path)
ADAPTER_GEMM_GROUP = "16-bit GEMMs (adapter)"  # the adapter mode's: xa B^T and g B
GROUPS = [
    # Hopper (csrc/cuda/adapter_y.cu): the forward's y = y_base + scaling xa B^T in one pass over y.
    ("adapter term: y pass", re.compile(r"adapter_y_kernel", re.I)),
    # Hopper, current scaling (csrc/cuda/adapter_u.cu): u = scaling g B with g's amax, one pass
    # over row blocks of g, and B^T's conversion for it.
    ("adapter operand: u row pass", re.compile(r"adapter_u_rows|adapter_b_t", re.I)),
    ("adapter operand: u amax", re.compile(r"adapter_partials", re.I)),
    ("adapter operand: cast", re.compile(r"adapter_cast", re.I)),
    # The backward's one read of g: its amax pass (current scaling) or its cast (delayed), with dB.
    # On Hopper after the u row pass: the cast of g and u with dB (grad_cast_product_kernel).
    ("g pass + dB (fused)", re.compile(r"grad_quantize_product|grad_cast_product", re.I)),
    ("dB split reduce", re.compile(r"grad_b_reduce", re.I)),
    ("amax history record", re.compile(r"record_amax", re.I)),
    ("quantize: amax pass", re.compile(r"amax_kernel|amax", re.I)),
    ("quantize: cast pass", re.compile(
        r"scaled_map_kernel|quantize_kernel|quantiz|CastOp|cast_fp8|fp8_cast|scale_cast", re.I)),
    ("transpose", re.compile(r"transpose", re.I)),
    ("topk", re.compile(r"topk|row_score|update_rows", re.I)),
    ("fp8 gemm", FP8_GEMM),
    # With cuBLASLt's split-K reduce (the adapter's u = g B GEMM uses one, H200 run).
    (GEMM_GROUP, re.compile(r"gemm|gemv|cutlass|sm90|xmma|ampere|nvjet|splitKreduce", re.I)),
    ("copy/fill", re.compile(r"copy|fill|memset|memcpy", re.I)),
    ("elementwise/reduce", re.compile(r"elementwise|reduce|vectorized", re.I)),
]


def group_of(name: str, update_mode: str = "proxy") -> str:
    """The row of a kernel: GROUPS' first match, "other" for none. The non-FP8 GEMMs are the
    adapter's in the adapter mode."""
    group = next((g for g, pat in GROUPS if pat.search(name)), "other")
    if group == GEMM_GROUP and update_mode == "adapter":
        return ADAPTER_GEMM_GROUP
    return group


def profile_shape(K: int, N: int, M: int, r: int, iters: int, amax_history_len: int = 0,
                  transposed_copy: bool = False, update_mode: str = "proxy") -> dict:
    layer = falqon.MeldedLinear.from_linear(
        torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16), rank=r,
        amax_history_len=amax_history_len, transposed_copy=transposed_copy,
        update_mode=update_mode)
    if update_mode == "adapter":
        with torch.no_grad():
            layer.lora_B.normal_(std=0.01)  # a trained adapter's B: no zero shortcut
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
            grp = group_of(evt.name, update_mode)
            kernels[grp] += evt.device_time / iters
            names[grp][evt.name[:90]] += evt.device_time / iters
    busy = sum(kernels.values())
    return {"shape": [K, N], "M": M, "r": r, "amax_history_len": amax_history_len,
            "transposed_copy": transposed_copy, "update_mode": update_mode,
            "wall_us": wall_us, "gpu_busy_us": busy,
            "idle_us": wall_us - busy, "groups_us": dict(kernels),
            "kernels_us": {g: dict(c.most_common(6)) for g, c in names.items()}}


def output_name(tag: str, update_mode: str, amax_history_len: int, transposed_copy: bool) -> str:
    """profile_layer[_adapter]_<tag>[_delayed<H>][_wt].json: the proxy mode's names unchanged."""
    mode = "_adapter" if update_mode == "adapter" else ""
    suffix = (f"_delayed{amax_history_len}" if amax_history_len else "") + (
        "_wt" if transposed_copy else "")
    return f"profile_layer{mode}_{tag}{suffix}.json"


def parse_args(argv=None) -> argparse.Namespace:
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
    parser.add_argument("--update-mode", choices=falqon.config.UPDATE_MODES, default="proxy",
                        help="proxy (default here: the paper's method, what the committed "
                             "profiles measured) or adapter (falqon's default mode)")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    records = []
    for spec in args.shapes.split(","):
        K, N = (int(v) for v in spec.lower().split("x"))
        rec = profile_shape(K, N, args.M, args.r, args.iters, args.amax_history_len,
                            args.transposed_copy, args.update_mode)
        records.append(rec)
        print(f"\n{K}->{N}, M={args.M}, r={args.r}, {args.update_mode} mode: wall "
              f"{rec['wall_us']:.0f} us/iter, GPU busy {rec['gpu_busy_us']:.0f}, "
              f"idle {rec['idle_us']:.0f}")
        for grp, us in sorted(rec["groups_us"].items(), key=lambda kv: -kv[1]):
            print(f"  {grp:24s} {us:8.1f} us")
            for name, kus in rec["kernels_us"][grp].items():
                print(f"      {kus:8.1f}  {name}")
    out = args.out or common.RESULTS_DIR / output_name(
        common.device_tag("cuda"), args.update_mode, args.amax_history_len, args.transposed_copy)
    common.write_json(out, common.run_metadata("cuda", __file__, argv), records)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
