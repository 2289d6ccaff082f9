"""The adapter mode's forward as one CUTLASS GEMM (adapter_gemm.cuh: the FP8 K loop over x_q and
W_q, then the adapter's k-tiles xa' B^T in bf16 into the same accumulators, each row scaled by
s_x s_w in the epilogue) against today's forward (MeldedLinear in the adapter mode: x quantised
per row, cuBLASLt's FP8 GEMM over W' = [W; A], then a cuBLASLt GEMM that adds scaling xa B^T
while it copies y out of the strided product). The new route needs xa before its GEMM: here a
cuBLASLt FP8 GEMM x_q A_q^T scaled by `scaling` alone (torch._scaled_mm), so that xa' is in the
accumulators' units. Issue 12's epilogue route (benchmarks/NOTES.md). Needs the `nvidia-cutlass`
wheel (its headers) and nvcc; builds adapter_gemm_a.cu / _b.cu / _c.cu / _bind.cpp (the kernels in
adapter_gemm.cuh: cooperative and ping-pong schedules) with torch.utils.cpp_extension.load. Runs
98-103 and 115-116 of benchmarks/NOTES.md: the route pays only at 4096 -> 11008, and little.

    python benchmarks/cutlass_probe/adapter_probe.py          # M = 8192, r = 64, the 7B shapes
    python benchmarks/cutlass_probe/adapter_probe.py --sweep  # also 48 tile orders a shape

Each shape: today's forward and its parts; the adapter kernels against CUTLASS's stock kernels of
the same tiles (probe.py's fp8_gemm.cu) and cuBLASLt's GEMM over W, alternately; with --sweep the
persistent scheduler's tile orders, the best rechecked against cuBLASLt and the whole new forward.

Prints a table (median us a call of 20 calls queued between two CUDA events; each output's largest
difference from a float64 reference of the same FP8 operands, relative to the reference's largest
magnitude) and writes benchmarks/results/adapter_probe_<gpu>.json.
"""

from __future__ import annotations

import pathlib
import sys

import torch
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402
import probe  # noqa: E402
from probe import SHAPES  # noqa: E402

import falqon  # noqa: E402

KERNELS = ("adapter_256x128_c2x1", "adapter_256x128_c1x2", "adapter_128x256_c1x2",
           "adapter_128x256_c2x1", "adapter_pp128x128_c1x2", "adapter_pp128x128_c2x1")
# The persistent scheduler's tile order, a run-time choice: raster (0 CUTLASS's heuristic, 1 along
# M, 2 along N) and swizzle (tiles grouped for L2 reuse).
ORDERS = [(raster, swizzle) for raster in (0, 1, 2) for swizzle in (1, 2, 4, 8)]
RANK = 64
B_STD = 0.01  # layer.py's ADAPTER_B_STD: B like a trained adapter's


def gpu_us(fn, reps: int, warmup: int, batch: int = 20) -> float:
    """Median us a call of `fn`, `batch` calls queued between two CUDA events (common's)."""
    return common.batched_gpu_us(lambda n: [fn() for _ in range(n)], max(1, reps // batch) + 2,
                                 warmup, batch)


def build():
    return probe.load_cutlass("falqon_adapter_gemm_probe", [
        str(HERE / name) for name in ("adapter_gemm_a.cu", "adapter_gemm_b.cu",
                                      "adapter_gemm_c.cu", "adapter_gemm_bind.cpp")])


def melded_layer(K: int, N: int):
    lin = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = falqon.MeldedLinear.from_linear(lin, rank=RANK, update_mode="adapter")
    with torch.no_grad():
        layer.lora_B.normal_(std=B_STD)
    return layer


def xa_prime(q, layer, scaling):
    """xa' = scaling x_q A_q^T through cuBLASLt (torch._scaled_mm): the raw FP8 sum times
    `scaling` (a device scalar), in the adapter GEMM's accumulator units."""
    one = torch.ones((), device=q.device)
    return torch._scaled_mm(q, layer.weight[layer.out_features:].t(), scale_a=one,
                            scale_b=scaling, out_dtype=torch.bfloat16, use_fast_accum=True)


def new_forward(kernel, order, layer, x, scaling, b16):
    """quantize_rows, xa' (xa_prime), alpha = s_x s_w, the adapter GEMM (`scaling` a device
    scalar and B's bf16 copy made once, as a step would make them)."""
    q, s = falqon.ops.quantize_rows(x)
    alpha = s.reshape(-1) * layer.weight_scale
    return kernel(q, layer.weight[:layer.out_features], xa_prime(q, layer, scaling), b16, alpha,
                  *order)


def reference(layer, x):
    """float64 y of the same FP8 operands: s_x s_w x_q W_q^T + scaling xa B^T with
    xa = s_x s_w x_q A_q^T."""
    N = layer.out_features
    q, s = falqon.ops.quantize_rows(x)
    scale = s.double().reshape(-1, 1) * layer.weight_scale.double()
    w = layer.weight.double()
    product = scale * (q.double() @ w.t())
    xa = product[:, N:N + layer.rank]
    return product[:, :N] + layer.scaling * (xa @ layer.lora_B.double().t())


class Case:
    """One shape's melded layer, input and the operands of both forwards, made once."""

    def __init__(self, M: int, K: int, N: int):
        torch.manual_seed(0)
        self.layer = layer = melded_layer(K, N)
        self.N = N
        self.x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        self.ref = reference(layer, self.x)
        self.q, self.s = falqon.ops.quantize_rows(self.x)
        self.w = layer.weight[:N]
        r16 = layer.weight.shape[0] - N
        self.scaling = torch.tensor(layer.scaling, device="cuda", dtype=torch.float32)
        self.xa = xa_prime(self.q, layer, self.scaling)
        one = torch.ones((), device="cuda")
        self.alpha = self.s.reshape(-1) * layer.weight_scale
        self.b16 = nn.functional.pad(layer.lora_B.detach().to(torch.bfloat16),
                                     (0, r16 - layer.rank))
        s_w = layer.weight_scale.reshape(1, 1).expand(1, layer.weight.shape[0]).contiguous()
        rows_scale = self.s.reshape(-1, 1)
        self.parts = {
            "quantize_rows": lambda: falqon.ops.quantize_rows(self.x),
            "cuBLASLt GEMM over W' (today's, row scales)": lambda: torch._scaled_mm(
                self.q, layer.weight.t(), scale_a=rows_scale, scale_b=s_w,
                out_dtype=torch.bfloat16, use_fast_accum=True),
            W_ONLY: lambda: torch._scaled_mm(
                self.q, self.w.t(), scale_a=rows_scale, scale_b=s_w[:, :N].contiguous(),
                out_dtype=torch.bfloat16, use_fast_accum=True),
            "cuBLASLt xa GEMM (x_q A_q^T, r16 outputs)": lambda: torch._scaled_mm(
                self.q, layer.weight[N:].t(), scale_a=one, scale_b=one,
                out_dtype=torch.bfloat16, use_fast_accum=True),
        }

    def diff(self, y) -> float:
        return ((y.double() - self.ref).abs().max() / self.ref.abs().max()).item()

    def adapter(self, kernel, order):
        return lambda: kernel(self.q, self.w, self.xa, self.b16, self.alpha, *order)


W_ONLY = "cuBLASLt GEMM over W alone (row scales)"


def time_parts(case: Case, reps: int, warmup: int) -> list[dict]:
    rows = [{"route": "today: MeldedLinear forward (adapter)",
             "us": gpu_us(lambda: case.layer(case.x), reps, warmup),
             "max_rel_diff": case.diff(case.layer(case.x))}]
    for name, fn in case.parts.items():
        try:
            rows.append({"route": f"  part: {name}", "us": gpu_us(fn, reps, warmup)})
        except RuntimeError as exc:
            rows.append({"route": f"  part: {name}", "skipped": str(exc).splitlines()[0]})
    return rows


def compare_with_stock(case: Case, mod, stock, reps: int, warmup: int) -> list[dict]:
    """The adapter kernels against CUTLASS's stock ones (fp8_gemm.cu: the same tiles, one scalar
    scale, no adapter k-tile) and cuBLASLt's GEMM over W, alternately, three rounds: what the
    adapter's k-tile and row-scale epilogue cost, apart from CUTLASS against cuBLASLt."""
    scale = case.layer.weight_scale * case.s.max()
    kernels = (("cuBLASLt GEMM over W alone", case.parts[W_ONLY]),
               ("stock coop_256x128_c2x1", lambda: stock.coop_256x128_c2x1(case.q, case.w, scale)),
               ("adapter_256x128_c2x1", case.adapter(mod.adapter_256x128_c2x1, (0, 1))),
               ("stock coop_128x256_c1x2", lambda: stock.coop_128x256_c1x2(case.q, case.w, scale)),
               ("adapter_128x256_c1x2", case.adapter(mod.adapter_128x256_c1x2, (0, 1))),
               ("stock pingpong_128x128_c1x2",
                lambda: stock.pingpong_128x128_c1x2(case.q, case.w, scale)),
               ("adapter_pp128x128_c1x2", case.adapter(mod.adapter_pp128x128_c1x2, (0, 1))),
               ("stock pingpong_128x128_c2x1",
                lambda: stock.pingpong_128x128_c2x1(case.q, case.w, scale)),
               ("adapter_pp128x128_c2x1", case.adapter(mod.adapter_pp128x128_c2x1, (0, 1))))
    return [{"route": f"  compare {round_}: {label}", "us": gpu_us(fn, reps, warmup)}
            for round_ in range(3) for label, fn in kernels]


def sweep_orders(case: Case, mod, reps: int, warmup: int) -> list[dict]:
    """Every kernel at every tile order; then the best against cuBLASLt's GEMM over W again,
    alternately (the GPU's clocks fall under long runs of FP8 GEMMs), and the whole new forward."""
    rows, best = [], None
    for name in KERNELS:
        for order in ORDERS:
            label = f"  part: {name} raster {order[0]} swizzle {order[1]}"
            try:
                us = gpu_us(case.adapter(getattr(mod, name), order), reps // 2, 3)
            except RuntimeError as exc:
                rows.append({"route": label, "skipped": str(exc).splitlines()[0]})
                continue
            rows.append({"route": label, "us": us})
            if best is None or us < best[0]:
                best = (us, name, order)
    if best is None:
        return rows
    _, name, order = best
    kernel = getattr(mod, name)
    for _ in range(2):
        rows.append({"route": "  recheck: cuBLASLt GEMM over W alone",
                     "us": gpu_us(case.parts[W_ONLY], reps, warmup)})
        rows.append({"route": f"  recheck: {name} raster {order[0]} swizzle {order[1]}",
                     "us": gpu_us(case.adapter(kernel, order), reps, warmup)})

    def forward():
        return new_forward(kernel, order, case.layer, case.x, case.scaling, case.b16)

    rows.append({"route": f"new: {name} raster {order[0]} swizzle {order[1]} "
                          "(with xa GEMM, quantize_rows)",
                 "us": gpu_us(forward, reps, warmup), "max_rel_diff": case.diff(forward())})
    return rows


def measure(mod, stock, M: int, K: int, N: int, reps: int, warmup: int, sweep: bool) -> list[dict]:
    with torch.no_grad():
        case = Case(M, K, N)
        rows = time_parts(case, reps, warmup) + compare_with_stock(case, mod, stock, reps, warmup)
        if sweep:
            rows += sweep_orders(case, mod, reps, warmup)
    for r in rows:
        r.update({"K": K, "N": N, "M": M, "r": RANK})
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    sweep = "--sweep" in argv
    argv = [a for a in argv if a != "--sweep"]
    args = common.probe_args(__doc__, argv, reps=100, warmup=10)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("adapter probe: needs a Hopper GPU (sm_90a kernels)")
    mod = build()
    stock = probe.build()
    records = [r for K, N in SHAPES
               for r in measure(mod, stock, args.M, K, N, args.reps, args.warmup, sweep)]
    rows = [[f"{r['K']}->{r['N']}", r["route"], r.get("us"), r.get("max_rel_diff"),
             r.get("skipped")] for r in records]
    common.finish_probe("adapter_probe", __file__, argv, args.out,
                        ["K->N", "route", "us", "max rel diff", "skipped"], rows, records)


if __name__ == "__main__":
    main()
