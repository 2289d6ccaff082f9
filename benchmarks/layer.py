"""One layer, FALQON against its peers: forward + backward (input gradient needed) and the forward
alone, at LLaMA-7B/13B shapes, medians of CUDA-event timings after warm-up, random data, every
method in one process (the protocol of BENCHMARKS.md).

Methods (a peer that cannot be imported or run is listed with the reason, never dropped):
  bf16_lora         PEFT's LoRA layer around a frozen bf16 nn.Linear (r, alpha = r, dropout 0,
                    A and B trainable, B non-zero so that no shortcut applies)
  fp8_floor         the two FP8 GEMMs alone (torch._scaled_mm, pre-quantised operands, per-tensor
                    scales, bf16 out): x_q W'_q^T (M x (N + r16), fast accumulation) and, for the
                    backward, g_q (E5M2) W_q (from a transposed copy made outside the timing), with
                    fast accumulation where falqon's dgrad uses it (FALQON_FAST_ACCUM_DGRAD, on by
                    default): the same GEMMs as falqon's
  falqon            falqon.MeldedLinear.from_linear(update_mode="proxy"), the paper's method, on
                    the CUDA ops (dx through a transpose of the FP8 weight in the backward, or
                    however the kernels do it by default); B is not in its forward and the
                    proxy update (after an optimizer step) is not timed here
  falqon_wt         the same with the persistent transposed copy (transposed_copy=True)
  falqon_delayed    falqon with delayed scaling (amax_history_len=16): x and g quantised in one
                    pass at the scale of the amaxes recorded by earlier calls (the warm-up calls
                    fill the history before the timing)
  falqon_delayed_wt the same with the persistent transposed copy
  falqon_adapter    update_mode="adapter" (falqon's default): y = x W^T + scaling (x A^T) B^T
                    with B a trained adapter (non-zero here, normal std 0.01, so that no
                    shortcut applies); an extra 16-bit GEMM in the forward, an extra skinny GEMM
                    (g B) and small kernels in the backward, dx from one FP8 GEMM over every row
                    of W'; current scaling, no transposed copy
  falqon_adapter_delayed
                    the adapter mode with delayed scaling (amax_history_len=16) alone: no
                    transposed copy, so no memory beyond the amax histories
  falqon_adapter_delayed_wt
                    the adapter mode with delayed scaling (amax_history_len=16) and the
                    persistent transposed copy (of every row of W'), like falqon_delayed_wt
  qlora_nf4         PEFT LoRA over a bitsandbytes Linear4bit (NF4, bf16 compute)
  fp8_lora_torchao  torchao float8 training (convert_to_float8_training, tensorwise dynamic
                    scaling) on the frozen base, compiled with torch.compile as torchao intends,
                    and PEFT's bf16 LoRA adapter beside it

    python benchmarks/layer.py --quick            # the three 7B shapes, M = 8192, r = 64
    python benchmarks/layer.py                    # the whole sweep: 7B + 13B, M 2048/8192/16384, r 16/64
    python benchmarks/layer.py --quick --methods bf16_lora,fp8_floor,falqon,falqon_adapter

Writes benchmarks/results/layer_<device>.json and prints a table last: each method's median ms,
its speed-up over bf16_lora, and each falqon method's ratio to fp8_floor.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: python benchmarks/layer.py
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    import common
else:
    from . import common

SHAPES = {
    "7b": [(4096, 4096), (4096, 11008), (11008, 4096)],        # (in K, out N): q/k/v/o, up/gate, down
    "13b": [(5120, 5120), (5120, 13824), (13824, 5120)],
}
METHODS = ["bf16_lora", "fp8_floor", "falqon", "falqon_wt", "falqon_delayed", "falqon_delayed_wt",
           "falqon_adapter", "falqon_adapter_delayed", "falqon_adapter_delayed_wt", "qlora_nf4",
           "fp8_lora_torchao"]
# The falqon methods: the table gives each one's ratio to fp8_floor.
FALQON_METHODS = [m for m in METHODS if m.startswith("falqon")]
# History length of the falqon_delayed methods (Transformer Engine's default is 1024; any H gives
# the same kernels, the history only decides the scale).
DELAYED_HISTORY = 16
ADAPTER_B_STD = 0.01  # the adapter methods' B: non-zero, like a trained adapter's
PASSES = ("fwd_bwd", "fwd")
# The floor's dgrad GEMM accumulates as falqon's does (csrc/cuda/gemm.cu reads the same variable).
FAST_ACCUM_DGRAD = common.env_flag("FALQON_FAST_ACCUM_DGRAD", True)
DTYPE = torch.bfloat16


@dataclass
class Bench:
    """A method built for one (shape, r): its forward and its forward + backward on (x, g), and
    the module they call (None for the floor, which calls GEMMs alone)."""

    fwd: callable
    fwd_bwd: callable
    note: str = ""
    module: nn.Module | None = None


# ---- the methods --------------------------------------------------------------------------------

def _peft_lora(base: nn.Module, r: int, loaded_in_4bit: bool = False) -> nn.Module:
    """PEFT's LoRA layer around `base` (r, alpha = r, dropout 0), adapters in bf16, B non-zero.
    Built through get_peft_model, whose signature is stable across PEFT releases."""
    from peft import LoraConfig, get_peft_model

    holder = nn.Module()
    holder.linear = base
    # What transformers sets on a 4-bit model; PEFT picks its bitsandbytes LoRA layer by it.
    holder.is_loaded_in_4bit = loaded_in_4bit
    cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["linear"], bias="none")
    try:
        model = get_peft_model(holder, cfg, autocast_adapter_dtype=False)
    except TypeError:  # PEFT before autocast_adapter_dtype
        model = get_peft_model(holder, cfg)
    layer = model.base_model.model.linear
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(DTYPE)
                if "lora_B" in name:   # PEFT starts B at zero; a trained adapter is not
                    p.normal_(std=0.01)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    return layer


def _module_bench(layer: nn.Module) -> Bench:
    params = [p for p in layer.parameters() if p.requires_grad]

    def fwd(x, g):
        layer(x)

    def fwd_bwd(x, g):
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(g)

    return Bench(fwd, fwd_bwd, module=layer)


def _frozen_linear(weight: torch.Tensor) -> nn.Linear:
    N, K = weight.shape
    lin = nn.Linear(K, N, bias=False, device=weight.device, dtype=DTYPE)
    with torch.no_grad():
        lin.weight.copy_(weight)
    lin.weight.requires_grad_(False)
    return lin


def build_bf16_lora(weight, r, ctx):
    return _module_bench(_peft_lora(_frozen_linear(weight), r))


def build_falqon(weight, r, ctx, transposed_copy=False, amax_history_len=0,
                 update_mode="proxy"):
    """A melded layer of `weight`. Proxy mode: B stays zero (its forward ignores B). Adapter mode:
    B drawn non-zero (ADAPTER_B_STD), as a trained adapter's, so that its GEMMs do real work."""
    import falqon

    layer = falqon.MeldedLinear.from_linear(_frozen_linear(weight), rank=r, topk=ctx.topk,
                                            transposed_copy=transposed_copy,
                                            amax_history_len=amax_history_len,
                                            update_mode=update_mode)
    if update_mode == "adapter":
        with torch.no_grad():
            layer.lora_B.normal_(std=ADAPTER_B_STD)
    elif not amax_history_len:
        ctx.melded[r] = layer   # the floor uses the same FP8 operands
    return _module_bench(layer)


def build_falqon_wt(weight, r, ctx):
    return build_falqon(weight, r, ctx, transposed_copy=True)


def build_falqon_delayed(weight, r, ctx):
    # The layer is in training mode: every timed and warm-up call records x's and g's amaxes, so
    # from the second call on both are quantised at the delayed scale in one pass.
    return build_falqon(weight, r, ctx, amax_history_len=DELAYED_HISTORY)


def build_falqon_delayed_wt(weight, r, ctx):
    return build_falqon(weight, r, ctx, transposed_copy=True, amax_history_len=DELAYED_HISTORY)


def build_falqon_adapter(weight, r, ctx):
    return build_falqon(weight, r, ctx, update_mode="adapter")


def build_falqon_adapter_delayed(weight, r, ctx):
    return build_falqon(weight, r, ctx, amax_history_len=DELAYED_HISTORY, update_mode="adapter")


def build_falqon_adapter_delayed_wt(weight, r, ctx):
    return build_falqon(weight, r, ctx, transposed_copy=True, amax_history_len=DELAYED_HISTORY,
                        update_mode="adapter")


def build_fp8_floor(weight, r, ctx):
    import falqon

    if r not in ctx.melded:
        build_falqon(weight, r, ctx)
    layer = ctx.melded[r]
    N = layer.out_features
    w = layer.weight                                   # W' = [W; A; 0], (N + r16, K), E4M3
    w_rows_t = w[:N].t().contiguous()                  # (K, N): made outside the timing
    s_w = layer.weight_scale
    cache = {}

    def operands(x, g):
        # Pre-quantised operands, outside the timing; computed once per (x, g).
        key = (x.data_ptr(), g.data_ptr())
        if key not in cache:
            cache.clear()
            cache[key] = (*falqon.quantize(x.detach(), torch.float8_e4m3fn),
                          *falqon.quantize(g, torch.float8_e5m2))
        return cache[key]

    def fwd(x, g):
        xq, sx, _, _ = operands(x, g)
        torch._scaled_mm(xq, w.t(), sx, s_w, out_dtype=DTYPE, use_fast_accum=True)

    def fwd_bwd(x, g):
        xq, sx, gq, sg = operands(x, g)
        torch._scaled_mm(xq, w.t(), sx, s_w, out_dtype=DTYPE, use_fast_accum=True)
        # mat2 must be column-major: (K, N) contiguous, transposed, is W_q (N, K) column-major.
        # Fast accumulation as falqon's dgrad GEMM runs it (FALQON_FAST_ACCUM_DGRAD, default on).
        torch._scaled_mm(gq, w_rows_t.t(), sg, s_w, out_dtype=DTYPE,
                         use_fast_accum=FAST_ACCUM_DGRAD)

    return Bench(fwd, fwd_bwd, "operands quantised outside the timing")


def _shared_base(ctx, kind: str, weight, make) -> nn.Module:
    """The frozen base layer of a peer, made once per shape and shared by its ranks."""
    if weight.device.type != "cuda":
        raise common.Skip(f"{kind} needs a CUDA device here")
    key = (kind, tuple(weight.shape))
    if key not in ctx.bases:
        ctx.bases[key] = make()
    return ctx.bases[key]


def build_qlora_nf4(weight, r, ctx):
    bnb = common.import_bitsandbytes()

    def make():
        N, K = weight.shape
        base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DTYPE, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False,
                                        quant_type="nf4")
        return base.cuda()   # quantises to NF4 on the move

    base = _shared_base(ctx, "bitsandbytes NF4", weight, make)
    return _module_bench(_peft_lora(base, r, loaded_in_4bit=True))


def build_fp8_lora_torchao(weight, r, ctx):
    convert = common.import_torchao_float8()

    def make():
        holder = nn.Module()
        holder.linear = _frozen_linear(weight)
        convert(holder)   # swaps the nn.Linear for a Float8Linear (a subclass of nn.Linear)
        holder.linear.weight.requires_grad_(False)
        return holder.linear

    base = _shared_base(ctx, "torchao float8 training", weight, make)
    layer = _peft_lora(base, r)
    # torchao's float8 casts are meant to be fused by torch.compile; compile the base only (the
    # LoRA adapter is PEFT's eager code, as in bf16_lora). Under compile the frozen weight's
    # gradient GEMM, which the float8 autograd function computes, is dead code and dropped.
    layer.base_layer = torch.compile(layer.base_layer, dynamic=False)
    return _module_bench(layer)


BUILDERS = {
    "bf16_lora": build_bf16_lora, "fp8_floor": build_fp8_floor, "falqon": build_falqon,
    "falqon_wt": build_falqon_wt, "falqon_delayed": build_falqon_delayed,
    "falqon_delayed_wt": build_falqon_delayed_wt, "falqon_adapter": build_falqon_adapter,
    "falqon_adapter_delayed": build_falqon_adapter_delayed,
    "falqon_adapter_delayed_wt": build_falqon_adapter_delayed_wt,
    "qlora_nf4": build_qlora_nf4, "fp8_lora_torchao": build_fp8_lora_torchao,
}


class Context:
    """What the methods of one shape share: the melded layers (per r) and quantised bases."""

    def __init__(self, topk: int):
        self.topk = topk
        self.melded: dict[int, nn.Module] = {}
        self.bases: dict[tuple, nn.Module] = {}


# ---- the sweep ------------------------------------------------------------------------------------

def parse_shapes(spec: str) -> list[tuple[int, int]]:
    if spec == "all":
        return SHAPES["7b"] + SHAPES["13b"]
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        if part in SHAPES:
            out += SHAPES[part]
        else:
            try:
                K, N = (int(v) for v in part.split("x"))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"--shapes takes 7b, 13b, all or KxN (in x out) items, got {part!r}") from None
            out.append((K, N))
    return out


def int_list(spec: str) -> list[int]:
    try:
        return [int(v) for v in spec.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {spec!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all", help="7b, 13b, all, or KxN items (default all)")
    p.add_argument("--M", type=int_list, default=[2048, 8192, 16384], help="tokens per call")
    p.add_argument("--r", type=int_list, default=[16, 64], help="LoRA ranks")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--quick", action="store_true",
                   help="the three 7B shapes, M = 8192, r = 64 (overrides --shapes/--M/--r)")
    p.add_argument("--reps", type=int, default=40, help="timed calls per measurement (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before them")
    p.add_argument("--topk", type=int, default=10, help="falqon's k (the update is not timed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cuda", "cpu"), help="cpu gives meaningless times (smoke test)")
    p.add_argument("--out", default=None,
                   help="JSON results (default benchmarks/results/layer_<device>.json)")
    p.add_argument("--table-out", default=None, help="also write the final table to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.M, args.r = "7b", [8192], [64]
    try:
        args.shape_list = parse_shapes(args.shapes)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.method_list) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    bad = [(K, N) for K, N in args.shape_list if K % 16 or N % 16]
    if bad:
        p.error(f"FP8 GEMMs need in and out features that are multiples of 16: {bad}")
    return args


def _skip_records(K, N, Ms, r, method, why) -> list[dict]:
    return [{"kind": "layer", "shape": [K, N], "M": M, "r": r, "method": method, "pass": p,
             "ms": None, "skipped": why} for M in Ms for p in PASSES]


def run(args) -> tuple[list[dict], dict]:
    """Every (shape, r, M, method, pass) gets a record: its median ms, or ms None and the reason
    it was skipped."""
    device = args.device
    timer = common.Timer(device, warmup=args.warmup, reps=args.reps)
    if device == "cuda":
        # torchao's compiled base recompiles per shape and M: keep dynamo from falling back to
        # eager after its default of 8 recompiles.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
    records, skipped, unavailable = [], {}, {}
    for K, N in args.shape_list:
        gen = torch.Generator(device=device).manual_seed(K * 7919 + N)
        weight = torch.randn(N, K, device=device, dtype=DTYPE, generator=gen) * 0.02
        ctx = Context(args.topk)
        for r in args.r:
            benches = {}
            for m in args.method_list:
                if m in unavailable:   # not importable or not runnable on this device
                    records += _skip_records(K, N, args.M, r, m, unavailable[m])
                    continue
                try:
                    benches[m] = BUILDERS[m](weight, r, ctx)
                except common.Skip as exc:
                    unavailable[m] = skipped[m] = str(exc)
                    records += _skip_records(K, N, args.M, r, m, skipped[m])
                except Exception as exc:  # fails to build at this shape: listed, with why
                    why = f"failed to build: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                    skipped.setdefault(m, f"{why} (first at {K}x{N} r={r})")
                    records += _skip_records(K, N, args.M, r, m, why)
            for M in args.M:
                x = torch.randn(M, K, device=device, dtype=DTYPE, generator=gen).requires_grad_()
                g = torch.randn(M, N, device=device, dtype=DTYPE, generator=gen)
                for m, bench in benches.items():
                    for pass_ in PASSES:
                        fn = getattr(bench, pass_)
                        rec = {"kind": "layer", "shape": [K, N], "M": M, "r": r, "method": m,
                               "pass": pass_}
                        try:
                            rec["ms"] = round(timer.median(lambda: fn(x, g)), 5)
                        except Exception as exc:
                            rec["ms"] = None
                            rec["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                            skipped.setdefault(m, f"failed to run (first at {K}x{N} M={M} "
                                                  f"r={r}): {rec['skipped']}")
                        if bench.note:
                            rec["note"] = bench.note
                        records.append(rec)
                        ms = ("skipped: " + rec["skipped"] if rec["ms"] is None
                              else f"{rec['ms']:.3f} ms")
                        print(f"  {K:>5}->{N:<5} M={M:<5} r={r:<3} {m:<25} {pass_:<7} {ms}",
                              flush=True)
                del x, g
            del benches
            common.free_memory()
        del weight, ctx
        common.free_memory()
    return records, skipped


def tables(records: list[dict], methods: list[str], reps: int) -> str:
    """One table per pass: ms per method, speed-up over bf16_lora, each falqon method's ratio to
    fp8_floor ("<method>/floor")."""
    ok = {(tuple(r["shape"]), r["M"], r["r"], r["method"], r["pass"]): r["ms"]
          for r in records if r.get("ms") is not None}
    keys = list(dict.fromkeys((tuple(r["shape"]), r["M"], r["r"]) for r in records))  # in run order
    present = [m for m in methods if any(k[3] == m for k in ok)]
    speed = [m for m in present if m != "bf16_lora"]
    # Without a falqon method or the floor, the one column ("falqon/floor") stays, all "-".
    floored = [m for m in present if m in FALQON_METHODS] if "fp8_floor" in present else []
    floored = floored or ["falqon"]
    out = []
    for pass_ in PASSES:
        title = ("fwd+bwd (input grad needed)" if pass_ == "fwd_bwd" else "forward alone")
        headers = ["K->N", "M", "r"] + [f"{m} ms" for m in present] + \
                  [f"{m} x" for m in speed] + [f"{m}/floor" for m in floored]
        rows = []
        for shape, M, r in keys:
            ms = {m: ok.get((shape, M, r, m, pass_)) for m in present}
            base = ms.get("bf16_lora")
            ups = [base / ms[m] if base and ms.get(m) else None for m in speed]
            floor = ms.get("fp8_floor")
            ratios = [ms[m] / floor if floor and ms.get(m) else None for m in floored]
            rows.append([f"{shape[0]}->{shape[1]}", M, r] + [ms[m] for m in present] + ups +
                        ratios)
        out.append(f"Layer {title}: median ms of {reps} calls; 'x' = speed-up over bf16_lora\n"
                   + common.format_table(headers, rows))
    return "\n\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    meta = common.run_metadata(args.device, __file__, argv)
    tag = common.device_tag(args.device, meta["device"])
    out = args.out or str(common.RESULTS_DIR / f"layer_{tag}.json")
    print(f"layer benchmark on {meta['device']} (torch {meta['torch']}): "
          f"{len(args.shape_list)} shapes x M {args.M} x r {args.r}, methods "
          f"{', '.join(args.method_list)}; {args.warmup} warm-up + {args.reps} timed calls each",
          flush=True)
    if args.device == "cpu":
        print("note: CPU timings say nothing about FALQON's speed (a smoke test of this script)")
    t0 = time.time()
    records, skipped = run(args)
    common.write_json(out, meta, records, skipped=skipped, reps=args.reps, warmup=args.warmup,
                      versions=common.versions_of("peft", "bitsandbytes", "torchao"),
                      seconds=round(time.time() - t0, 1))
    print(f"\n{len(records)} records in {time.time() - t0:.0f} s -> {out}")
    for m, why in skipped.items():
        print(f"skipped {m}: {why}")
    table = tables(records, args.method_list, args.reps)
    if args.table_out:
        with open(args.table_out, "w") as f:
            f.write(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
