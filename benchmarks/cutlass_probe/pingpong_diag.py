"""Where the ping-pong adapter kernel loses its time. Run 115 measured CUTLASS's stock ping-pong
128x128 FP8 kernel at cuBLASLt's speed, but adapter_gemm.cuh's kernel on the same schedule 40%
slower, where on the cooperative schedule it cost 3-7% over its stock kernel. This probe puts the
stock kernel (scalar scale), the same tile with adapter_gemm.cuh's row-scale epilogue but the stock
mainloop (rowscale_pp128x128_c1x2), and the adapter kernel side by side, alternately, with each
output's largest difference from a float64 reference of its own FP8 operands.

    python benchmarks/cutlass_probe/pingpong_diag.py          # the table, results/pingpong_diag_<gpu>.json
    python benchmarks/cutlass_probe/pingpong_diag.py --ncu    # one call of each CUTLASS kernel at
                                                              # 4096 -> 4096, for ncu's
                                                              # --kernel-name regex:device_kernel

Needs the `nvidia-cutlass` wheel and nvcc, as adapter_probe.py.
"""

from __future__ import annotations

import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import adapter_probe  # noqa: E402
import common  # noqa: E402
import probe  # noqa: E402
from probe import SHAPES  # noqa: E402

ROUNDS = 3


def base_reference(case: adapter_probe.Case):
    """float64 alpha[m] x_q W_q^T: what the row-scale kernel without the adapter computes."""
    scale = case.s.double().reshape(-1, 1) * case.layer.weight_scale.double()
    return scale * (case.q.double() @ case.w.double().t())


def rel_diff(y, ref) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def kernels(case: adapter_probe.Case, mod, stock):
    """(label, call, float64 reference or None) for each kernel compared."""
    scale = case.layer.weight_scale * case.s.max()
    base = base_reference(case)
    one_scale = scale.double() * (case.q.double() @ case.w.double().t())
    return (
        ("cuBLASLt GEMM over W alone (row scales)", case.parts[adapter_probe.W_ONLY], base),
        ("stock pingpong_128x128_c1x2 (scalar scale)",
         lambda: stock.pingpong_128x128_c1x2(case.q, case.w, scale), one_scale),
        ("rowscale_pp128x128_c1x2 (stock mainloop, row-scale epilogue)",
         case.adapter(mod.rowscale_pp128x128_c1x2, (0, 1)), base),
        ("adapter_pp128x128_c1x2", case.adapter(mod.adapter_pp128x128_c1x2, (0, 1)), case.ref),
        ("adapter_128x256_c1x2 (cooperative)", case.adapter(mod.adapter_128x256_c1x2, (0, 1)),
         case.ref),
    )


def measure(mod, stock, M: int, K: int, N: int, reps: int, warmup: int) -> list[dict]:
    rows = []
    with torch.no_grad():
        case = adapter_probe.Case(M, K, N)
        listed = kernels(case, mod, stock)
        diffs = {label: rel_diff(fn(), ref) for label, fn, ref in listed}
        for round_ in range(ROUNDS):
            for label, fn, _ in listed:
                rows.append({"route": f"round {round_}: {label}",
                             "us": adapter_probe.gpu_us(fn, reps, warmup),
                             "max_rel_diff": diffs[label]})
    for r in rows:
        r.update({"K": K, "N": N, "M": M})
    return rows


def ncu_calls(mod, stock, M: int) -> None:
    """One call of each CUTLASS kernel at 4096 -> 4096, after everything else the case needs."""
    with torch.no_grad():
        case = adapter_probe.Case(M, 4096, 4096)
        calls = [fn for label, fn, _ in kernels(case, mod, stock) if "cuBLASLt" not in label]
        torch.cuda.synchronize()
        for fn in calls:
            fn()
        torch.cuda.synchronize()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = common.probe_args(__doc__, argv, reps=60, warmup=10,
                             extra=[("--ncu", {"action": "store_true"})])
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("pingpong diag: needs a Hopper GPU (sm_90a kernels)")
    mod = adapter_probe.build()
    stock = probe.build()
    if args.ncu:
        ncu_calls(mod, stock, args.M)
        return
    records = [r for K, N in SHAPES for r in measure(mod, stock, args.M, K, N, args.reps,
                                                     args.warmup)]
    rows = [[f"{r['K']}->{r['N']}", r["route"], r["us"], r["max_rel_diff"]] for r in records]
    common.finish_probe("pingpong_diag", __file__, argv, args.out,
                        ["K->N", "kernel", "us", "max rel diff"], rows, records)


if __name__ == "__main__":
    main()
