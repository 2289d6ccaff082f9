"""The proxy mode's update after an optimizer step, ProxyUpdater.step, on a model's whole layer set:
each layer's own topk_update_ (per_layer, the path before issue 13) against the grouped op
(ops.topk_update_many_, four launches whatever the layer count; ProxyUpdater's default on one
CUDA device). Both include the finite check (check_finite=True, one host read-back per step).

    python benchmarks/proxy_update.py                       # LLaMA-7B: 32 x 7 layers, r = 64
    python benchmarks/proxy_update.py --k 10,64 --transposed-copy
    python benchmarks/proxy_update.py --device cpu --decoder-layers 2 --scale 16   # a smoke run

Each timed step starts from the same random B (restored outside the timing): GPU time between
CUDA events around step() (median of --reps), the host's wall time of the call (it returns after
the read-back), and the kernels one step launches (torch.profiler). Prints a table and writes
benchmarks/results/proxy_update_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from falqon import MeldedLinear, ops  # noqa: E402
from falqon.training import ProxyUpdater  # noqa: E402

# LLaMA-7B's projections per decoder layer (in_features, out_features): q, k, v, o, gate, up, down.
LLAMA_7B = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
MODES = ("per_layer", "grouped")


def build(decoder_layers: int, scale: int, rank: int, transposed: bool, device: str) -> nn.Module:
    """MeldedLinear layers (proxy mode) with random FP8 weights and A: no meld (no SVD) needed."""
    layers = nn.ModuleList()
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(decoder_layers):
        for K, N in LLAMA_7B:
            K, N = K // scale, N // scale
            layer = MeldedLinear(K, N, rank=rank, topk=10, update_mode="proxy",
                                 transposed_copy=transposed, device=device)
            w = torch.randn(layer.weight.shape, device=device, generator=g) * 64
            w[N + rank:] = 0
            layer.weight.data.copy_(w.clamp(-448, 448).to(ops.E4M3))
            layer.refresh_weight_t()
            layers.append(layer)
    return nn.Sequential(*layers)


def time_mode(model, mode: str, k: int, saved_B: list, reps: int, device: str) -> dict:
    updater = ProxyUpdater(model, check_finite=True)
    updater.grouped = (lambda: mode == "grouped")  # the path to time, whatever the device
    for layer in updater.layers:
        layer.topk = k
    Bs = [layer.lora_B.data for layer in updater.layers]

    def restore():
        torch._foreach_copy_(Bs, saved_B)

    cuda = device == "cuda"
    gpu_ms, wall_ms = [], []
    for i in range(reps + 3):  # three warm-up steps (the grouped op caches its layer table)
        restore()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
        t0 = time.perf_counter()
        assert updater.step(), "a non-finite B: the random B must be finite"
        wall = (time.perf_counter() - t0) * 1e3
        if cuda:
            end.record()
            torch.cuda.synchronize()
        if i >= 3:
            wall_ms.append(wall)
            gpu_ms.append(start.elapsed_time(end) if cuda else wall)
    restore()
    kernels = None
    if cuda:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            updater.step()
            torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"mode": mode, "k": k, "layers": len(updater.layers),
            "gpu_ms": statistics.median(gpu_ms), "wall_ms": statistics.median(wall_ms),
            "gpu_events": kernels}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--decoder-layers", type=int, default=32)
    p.add_argument("--scale", type=int, default=1,
                   help="divide every dimension by this (1, 2, 4, 8 or 16: multiples of 16 stay)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--k", default="10", help="comma-separated k values (64: the warm-up's k = r)")
    p.add_argument("--transposed-copy", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="results file (default: results/proxy_update_<device>.json)")
    args = p.parse_args(argv)
    model = build(args.decoder_layers, args.scale, args.rank, args.transposed_copy, args.device)
    g = torch.Generator(device=args.device).manual_seed(1)
    saved_B = [torch.randn(m.lora_B.shape, device=args.device, generator=g) * 1e-3
               for m in model if isinstance(m, MeldedLinear)]
    records = []
    for k in (int(v) for v in args.k.split(",")):
        for mode in MODES:
            records.append(time_mode(model, mode, k, saved_B, args.reps, args.device))
    base = {r["k"]: r["gpu_ms"] for r in records if r["mode"] == "per_layer"}
    for r in records:
        r["speedup"] = base[r["k"]] / r["gpu_ms"] if r["gpu_ms"] else None
    print(common.format_table(
        ["mode", "k", "layers", "GPU ms", "wall ms", "GPU events", "speed-up"],
        [[r["mode"], r["k"], r["layers"], r["gpu_ms"], r["wall_ms"], r["gpu_events"],
          r["speedup"]] for r in records]))
    tag = common.device_tag(args.device)
    out = args.out or os.path.join(common.RESULTS_DIR, f"proxy_update_{tag}.json")
    common.write_json(out, common.run_metadata(args.device, __file__, argv), records,
                      settings=vars(args))
    print(f"wrote {out}")
    return records


if __name__ == "__main__":
    main()
