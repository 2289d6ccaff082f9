"""One layer's fwd+bwd as a training loop sees it: back to back, the host launching while the GPU
runs, where layer.py hides the host behind a GPU sleep before each timed call. At small M the
host's launch work can exceed the GPU's, and then it, not the kernels, sets the step time.

    python benchmarks/route_probe/host_probe.py                 # 4096 -> 4096, r = 64
    python benchmarks/route_probe/host_probe.py --shape 11008x4096 --Ms 512 --M 2048

For each method and M: host_us, the median host time of issuing one fwd+bwd (no
synchronisation: the launches only); loop_us, the wall time a fwd+bwd of 50 back to back with one
synchronisation at the end; gpu_us, the CUDA-event time of one fwd+bwd after a GPU sleep (the GPU's
time alone, as layer.py measures it). Prints a table; writes
benchmarks/results/host_probe_<gpu>.json.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402
import layer as layer_bench  # noqa: E402

METHODS = ("bf16_lora", "falqon_adapter", "falqon")
LOOP = 50


def host_and_loop(fwd_bwd, x, g, reps: int) -> tuple[float, float]:
    host = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd_bwd(x, g)
        host.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(LOOP):
        fwd_bwd(x, g)
    torch.cuda.synchronize()
    return statistics.median(host), (time.perf_counter() - t0) * 1e6 / LOOP


def main(argv=None):
    args = common.probe_args(__doc__, argv, reps=20, warmup=5, extra=[
        ("--shape", {"default": "4096x4096", "help": "KxN"}),
        ("--Ms", {"default": "256,1024,2048", "help": "with --M"}),
        ("--r", {"type": int, "default": 64}),
        ("--methods", {"default": ",".join(METHODS)})])
    if not torch.cuda.is_available():
        sys.exit("host_probe: needs a CUDA GPU")
    K, N = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    weight = (torch.randn(N, K, device="cuda") * 0.02).to(layer_bench.DTYPE)
    ctx = layer_bench.Context(10)
    timer = common.Timer("cuda", warmup=args.warmup, reps=args.reps, flush_l2=False)
    records = []
    for method in args.methods.split(","):
        bench = getattr(layer_bench, f"build_{method}")(weight, args.r, ctx)
        for M in sorted({int(m) for m in args.Ms.split(",")} | {args.M}):
            x = torch.randn(M, K, device="cuda", dtype=layer_bench.DTYPE).requires_grad_()
            g = torch.randn(M, N, device="cuda", dtype=layer_bench.DTYPE)
            for _ in range(args.warmup):
                bench.fwd_bwd(x, g)
            host_us, loop_us = host_and_loop(bench.fwd_bwd, x, g, args.reps)
            gpu_us = 1e3 * timer.median(lambda: bench.fwd_bwd(x, g))
            records.append({"method": method, "K": K, "N": N, "M": M, "r": args.r,
                            "host_us": host_us, "loop_us": loop_us, "gpu_us": gpu_us})
        del bench
        common.free_memory()
    rows = [[r["method"], f"{K}->{N}", r["M"], r["host_us"], r["loop_us"], r["gpu_us"]]
            for r in records]
    common.finish_probe("host_probe", __file__, argv, args.out,
                        ["method", "shape", "M", "host us", "loop us", "gpu us"], rows, records)


if __name__ == "__main__":
    main()
