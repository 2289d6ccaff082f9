"""Where the time of one FALQON training step goes: the model of benchmarks/model.py, melded with
falqon.meld and trained with falqon.attach, one step under torch.profiler. --update-mode picks
the mode: proxy (the default here, the paper's method: model.py's "falqon", what the committed
profiles measured) or adapter (model.py's "falqon_adapter": no proxy update, nothing attached).

Every GPU kernel of the profiled step (every CPU op's own time with --device cpu) is put in one
group, from the op that launched it (its chain of enclosing ops) and the phase of the step:

  fwd GEMMs          the FP8 GEMM of falqon::melded_linear in the forward
  dgrad GEMMs        the FP8 GEMM of falqon::melded_linear_grad_input
  quantise           per-tensor FP8 quantisation (amax, scale, cast) of activations and gradients
  dB                 dB = scaling * g^T xa (the bf16 GEMM and its cast/scale)
  adapter GEMMs      (adapter mode only) the 16-bit GEMMs of B: the forward's y + scaling xa B^T
                     (on Hopper adapter_y.cu's pass over y) and the backward's u = scaling g B
                     (on the CPU reference, u's product is counted in dgrad GEMMs: it runs
                     inside the dgrad op under the same name)
  transpose          FP8 weight transposes for the input gradient
  attention          scaled-dot-product attention, forward and backward
  norms/elementwise  RMSNorm, SiLU * up, rotary embedding, residual adds, casts
  lm_head GEMMs      the bf16 output projection (not melded) forward and input gradient
  loss               log-softmax and NLL
  recompute          everything re-run by activation checkpointing during backward
  optimizer step     AdamW on the lora_B's
  proxy update       (proxy mode only) falqon.attach's hook (top-k row update of every melded
                     weight)
  other              the rest (embedding, gradient accumulation, copies, ...)

The step is also timed without the profiler (CUDA events); the difference between that and the
kernels' sum is time the GPU waited on the host ("GPU idle"). Prints the table and writes
benchmarks/results/profile_<device>.json (the adapter mode: profile_adapter_<device>.json).

    python benchmarks/profile_step.py                    # full 32-layer model, one step
    python benchmarks/profile_step.py --layers 8 --trace trace.json   # also a Chrome trace
    python benchmarks/profile_step.py --update-mode adapter
    python benchmarks/profile_step.py --fused            # model.py's falqon_fused, GPU
    python benchmarks/profile_step.py --device cpu --model tiny --rank 8 --batch 2 --seq 32
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)
import model as mb  # noqa: E402  (benchmarks/model.py)

TAG = "falqon_bench::"
PHASES = ("forward", "backward", "optimizer", "proxy_update")
RECOMPUTE = TAG + "recompute"
# model.py's method of each update mode.
METHOD_OF_MODE = {"proxy": "falqon", "adapter": "falqon_adapter"}

CATEGORIES = ("fwd GEMMs", "dgrad GEMMs", "quantise", "dB", "transpose", "attention",
              "norms/elementwise", "compiled (Triton)", "lm_head GEMMs", "loss", "recompute",
              "optimizer step", "proxy update", "other")
# Kernels that torch.compile's generated code launches: Inductor wraps each launch in a profiler
# range named after the kernel (no aten op around it), so they are told apart by name. Those of
# the recompute count there (its breakdown shows them).
COMPILED = "compiled (Triton)"
TRITON_RE = re.compile(r"^triton_", re.I)
# The adapter mode has its B's GEMMs and no proxy update.
ADAPTER_CATEGORIES = tuple(c for c in CATEGORIES[:4] + ("adapter GEMMs",) + CATEGORIES[4:]
                           if c != "proxy update")


def categories(adapter: bool) -> tuple[str, ...]:
    return ADAPTER_CATEGORIES if adapter else CATEGORIES


def phases(adapter: bool) -> tuple[str, ...]:
    return tuple(p for p in PHASES if p != "proxy_update") if adapter else PHASES

# Kernel names. cuBLAS/cuBLASLt GEMMs on Hopper are named sm90_xmma_gemm_*, nvjet_*, cutlass*
# or *gemm*; falqon's own kernels are transpose_fp8_kernel and amax/scaled_map/fused_quantize,
# and in the adapter mode adapter_partials/adapter_cast (the dgrad operand [g | scaling g B]).
TRANSPOSE_RE = re.compile(r"transpose", re.I)
ADAPTER_Y_RE = re.compile(r"adapter_y_kernel")  # the forward's y + scaling xa B^T on Hopper
GEMM_RE = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|splitk|wgmma", re.I)
QUANT_RE = re.compile(r"quant|amax|absmax|scaled_map|float8|fp8|e4m3|e5m2|adapter_partials|"
                      r"adapter_cast|adapter_u_rows|adapter_b_t|grad_cast_product", re.I)
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
            "aten::_scaled_mm", "aten::linear"}
ATTENTION_RE = re.compile(r"scaled_dot_product|flash|efficient_attention|cudnn_attention|fmha|"
                          r"ScaledDotProduct", re.I)
LOSS_RE = re.compile(r"nll_loss|log_softmax|cross_entropy|NllLoss|LogSoftmax", re.I)
MELDED_FWD = "falqon::melded_linear"
MELDED_DGRAD = "falqon::melded_linear_grad_input"
# The autograd node of a melded layer: MeldedLinear's (ops._MeldedLinearFunction) or, for the op
# called directly, torch.library's.
MELDED_BWD = ("_MeldedLinearFunctionBackward", "GeneratedBackwardFor_falqon_melded_linear")
MELDED_BOTH = "falqon::melded_linear_backward"  # both gradients in one op (the CPU reference
# runs its dx part through falqon::melded_linear_grad_input)
FP8_GEMM_RE = re.compile(r"nvjet_(sm\d+a?_)?q|e4m3|e5m2|f8f8|_f8_|fp8|qgmma", re.I)
# The CPU reference's adapter product in the forward (ref::adapter_output); its FP8 GEMM is mm.
CPU_ADAPTER_FWD_OP = "aten::addmm"

# What FALQON could take on beyond its linear layers, printed under the table with the measured
# time of the group each idea would shrink.
IDEAS = [
    ("quantise", "fuse the activation quantise into the RMSNorm before q/k/v and gate/up (the "
     "norm writes FP8 + its amax directly; q/k/v and gate/up already share one quantisation of "
     "their input, falqon/shared_quant.py: 4 per layer, not 7)"),
    ("norms/elementwise", "emit FP8 from SiLU(gate) * up for down_proj, and from the attention "
     "output for o_proj; fold the residual adds into those kernels"),
    ("recompute", "checkpoint the FP8 activations (half the bytes) so that the recompute can skip "
     "the quantise kernels, or checkpoint less now that the weights take half the memory"),
    ("transpose", "keep a transposed FP8 copy of the weight (FalqonConfig(transposed_copy=True)): "
     "no transpose per backward, at the price of a second FP8 copy"),
    ("proxy update", "one batched top-k update over all layers (grouped launch) instead of one "
     "per layer"),
    ("adapter GEMMs", "form u = scaling g B in the fused pass that already reads g for dB (the "
     "16-bit GEMM reads g again), and add scaling xa B^T in the FP8 GEMM's epilogue instead of "
     "a second GEMM that reads and writes y"),
]


# ---- instrumentation -----------------------------------------------------------------------------

def mark_recompute(model) -> int:
    """Wrap the checkpoint function transformers gives each checkpointed layer so that the layer's
    re-run during backward (the recompute) happens inside a `falqon_bench::recompute` profiler
    range. (Wrapping the layer's forward would miss it: transformers >= 5.2x checkpoints the
    class's own forward.) Returns how many modules were wrapped."""
    count = 0
    for module in model.modules():
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if checkpoint is None or not getattr(module, "gradient_checkpointing", False):
            continue

        def marked(function, *args, __checkpoint=checkpoint, **kwargs):
            def run(*a, **kw):
                # -1 outside a backward pass: the first run is the forward, a run during backward
                # is the recompute.
                if torch._C._current_graph_task_id() == -1:
                    return function(*a, **kw)
                with record_function(RECOMPUTE):
                    return function(*a, **kw)

            return __checkpoint(run, *args, **kwargs)

        module._gradient_checkpointing_func = marked
        count += 1
    if not count:
        raise RuntimeError("profile: no checkpointed layer found; is activation checkpointing on?")
    return count


class ProfiledRange:
    """A profiler range opened and closed by two separate callbacks (optimizer hooks)."""

    def __init__(self, name: str):
        self.name, self._rf = name, None

    def open(self):
        self._rf = record_function(self.name)
        self._rf.__enter__()

    def close(self):
        self._rf.__exit__(None, None, None)
        self._rf = None


def profiled_step(model, optimizer, batch, args) -> None:
    with record_function(TAG + "forward"):
        with mb.autocast_context(args):
            loss = model(input_ids=batch, labels=batch).loss
    with record_function(TAG + "backward"):
        loss.backward()
    with record_function(TAG + "optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# ---- classification ------------------------------------------------------------------------------

def chain_names(event) -> list[str]:
    """Names of the event and its enclosing CPU ops, innermost first."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def _adapter_gemm(kernel: str, op: str, on_gpu: bool, forward: bool) -> bool:
    """Whether a GEMM under a melded op is one of the adapter mode's B products, not an FP8 one:
    on the GPU by its kernel's name, on the CPU (forward only) by the reference's op."""
    if on_gpu:
        return not FP8_GEMM_RE.search(kernel)
    return forward and op == CPU_ADAPTER_FWD_OP


def classify(kernel: str, chain: list[str], phase: str | None, on_gpu: bool,
             adapter: bool = False) -> str:
    """The group of one unit of device time: a kernel (on_gpu) or a CPU op's own time, given the
    names of the op that ran it and its enclosing ops (innermost first) and the step's phase.
    adapter: the model is in the adapter mode (its non-FP8 GEMMs under melded ops are B's)."""
    if phase == "proxy_update":
        return "proxy update"
    if phase == "optimizer":
        return "optimizer step"
    if RECOMPUTE in chain:
        return "recompute"
    if on_gpu and TRITON_RE.search(kernel):
        return COMPILED
    op = chain[0] if chain else ""
    is_transpose = bool(TRANSPOSE_RE.search(kernel)) if on_gpu else False
    is_gemm = bool(GEMM_RE.search(kernel)) or op in GEMM_OPS
    if MELDED_DGRAD in chain or MELDED_FWD in chain:
        if is_transpose:
            return "transpose"
        if adapter and on_gpu and ADAPTER_Y_RE.search(kernel):
            return "adapter GEMMs"
        if is_gemm:
            if adapter and _adapter_gemm(kernel, op, on_gpu, MELDED_DGRAD not in chain):
                return "adapter GEMMs"
            return "dgrad GEMMs" if MELDED_DGRAD in chain else "fwd GEMMs"
        # The CPU reference does nothing else there but quantise (amax, divide, cast) and scale;
        # on the GPU, a kernel of another name (the xa copy, say) is "other".
        if not on_gpu or QUANT_RE.search(kernel):
            return "quantise"
        return "other"
    if MELDED_BOTH in chain:
        # On the GPU: the FP8 GEMM is dx's; the one read of g that quantises it (and folds in
        # dB's products on the tensor cores) is quantise; the split reduce is dB. The CPU
        # reference's own work here (outside its grad_input call) is dB's fp32 GEMM. In the
        # adapter mode, the cuBLASLt GEMM launched by the op itself (no aten op) is u = g B.
        if not on_gpu:
            return "dB"
        if is_transpose:
            return "transpose"
        if is_gemm and FP8_GEMM_RE.search(kernel):
            return "dgrad GEMMs"
        if adapter and is_gemm and op not in GEMM_OPS:
            return "adapter GEMMs"
        if is_gemm or "grad_b_reduce" in kernel:
            return "dB"
        if QUANT_RE.search(kernel) or "grad_quantize_product" in kernel:
            return "quantise"
        return "other"
    if any(m in n for n in chain for m in MELDED_BWD):  # the node, or the engine's range
        return "dB"
    if any(n.startswith("falqon::quantize") for n in chain):
        return "quantise"
    if ATTENTION_RE.search(kernel) or any(ATTENTION_RE.search(n) for n in chain):
        return "attention"
    if LOSS_RE.search(kernel) or any(LOSS_RE.search(n) for n in chain):
        return "loss"
    if is_gemm:
        return "lm_head GEMMs"  # every projection is melded: the bf16 GEMMs left are lm_head's
    if phase in ("forward", "backward"):
        if any(n in ("aten::embedding", "aten::embedding_backward", "EmbeddingBackward0")
               or "AccumulateGrad" in n for n in chain):
            return "other"
        return "norms/elementwise"
    return "other"


def phase_ranges(events) -> list[tuple[str, float, float]]:
    """(phase, start us, end us) of this script's phase ranges; the proxy update (nested in the
    optimizer's) comes first so that it wins."""
    out = [(e.name[len(TAG):], e.time_range.start, e.time_range.end) for e in events
           if e.name.startswith(TAG) and e.name[len(TAG):] in PHASES]
    return sorted(out, key=lambda r: r[0] != "proxy_update")


def phase_of(t: float, ranges) -> str | None:
    # By time, not by nesting: on CUDA, backward runs on the autograd engine's own thread, outside
    # the main thread's "backward" range.
    for name, start, end in ranges:
        if start <= t <= end:
            return name
    return None


def units(events, on_gpu: bool):
    """(kernel name, microseconds, event) for every kernel (GPU) or every op's own time (CPU)."""
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        if on_gpu:
            for k in e.kernels:
                # A record_function range has a GPU-side mirror of the same name spanning all
                # its kernels ("gpu_user_annotation"): counting it would count them twice. A
                # compiled graph's Triton launch is a range named after its one kernel: counted.
                if k.name != e.name or TRITON_RE.search(k.name):
                    yield k.name, k.duration, e
        elif not e.name.startswith(TAG):
            yield e.name, e.self_cpu_time_total, e


def breakdown(events, on_gpu: bool, steps: int, adapter: bool = False) -> dict:
    """Per category (categories(adapter)): ms per step, share and kernel (op) count, and the
    details that the table prints under it."""
    ranges = phase_ranges(events)
    if {r[0] for r in ranges} != set(phases(adapter)):
        raise RuntimeError(f"profile: phase ranges found {sorted({r[0] for r in ranges})}, "
                           f"expected {list(phases(adapter))}")
    totals = collections.Counter()
    counts = collections.Counter()
    kernels = collections.defaultdict(collections.Counter)  # category -> kernel -> us
    recompute = collections.Counter()
    quantise_units = collections.Counter()  # phase -> quantise kernels (GPU) or ops (CPU)
    for name, us, event in units(events, on_gpu):
        chain = chain_names(event)
        phase = phase_of(event.time_range.start, ranges)
        cat = classify(name, chain, phase, on_gpu, adapter)
        totals[cat] += us
        counts[cat] += 1
        kernels[cat][name] += us
        if cat == "recompute":
            # What the re-run forward spent it on: classify with the ops inside the recompute
            # range only (outside it are the backward nodes whose unpacking triggered it).
            inner = chain[:chain.index(RECOMPUTE)]
            recompute[classify(name, inner, "forward", on_gpu, adapter)] += us
        if cat == "quantise":
            quantise_units[phase] += 1
    per = 1e-3 / steps  # us summed over the profiled steps -> ms per step
    total = sum(totals.values())
    return {
        # plot_results.py reads only layer/model/meld records and passes these over.
        "records": [{"kind": "profile", "group": c, "ms": totals[c] * per,
                     "share": totals[c] / total if total else 0.0,
                     "count": counts[c] // steps} for c in categories(adapter)],
        "sum_ms": total * per,
        "recompute_breakdown_ms": {c: v * per for c, v in recompute.most_common()},
        "quantise_units_per_step": {str(k): v // steps for k, v in quantise_units.items()},
        "top_kernels": {c: [{"name": n[:160], "ms": v * per} for n, v in kernels[c].most_common(5)]
                        for c in categories(adapter) if kernels[c]},
    }


# ---- run ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mb.add_model_args(p)
    p.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (default 2)")
    p.add_argument("--steps", type=int, default=1, help="profiled steps, averaged (default 1)")
    p.add_argument("--timed-steps", type=int, default=3,
                   help="steps timed with CUDA events and no profiler (default 3)")
    p.add_argument("--update-mode", choices=tuple(METHOD_OF_MODE), default=None,
                   help="proxy (default here, adapter with --fused: the paper's method, what the "
                        "committed profiles measured) or adapter (falqon's default mode)")
    p.add_argument("--fused", action="store_true",
                   help="profile model.py's falqon_fused: the adapter mode with falqon.fuse's auto "
                        "(each decoder layer under torch.compile, Liger's fused loss where "
                        "installed; a CUDA GPU)")
    p.add_argument("--trace", type=pathlib.Path, help="also write a Chrome trace here")
    p.add_argument("--out", type=pathlib.Path,
                   help="results JSON (default benchmarks/results/profile_<device>.json, "
                        "profile_adapter_<device>.json in the adapter mode, "
                        "profile_fused_<device>.json with --fused)")
    args = p.parse_args(argv)
    if args.fused and args.update_mode == "proxy":
        p.error("--fused profiles falqon_fused, which trains in the adapter mode")
    # Unset: proxy (the committed profiles' mode), or adapter with --fused.
    args.update_mode = args.update_mode or ("adapter" if args.fused else "proxy")
    if args.steps < 1 or args.warmup < 0 or args.timed_steps < 1:
        p.error("--steps and --timed-steps must be >= 1, --warmup >= 0")
    mb.check_model_args(p, args)
    if args.fused and args.device.type != "cuda":
        p.error("--fused needs a CUDA GPU (falqon.fuse's compiled and Liger kernels run there)")
    return args


def format_table(result: dict) -> str:
    rows = [[r["group"], r["ms"], f"{100 * r['share']:.1f}%", r["count"]]
            for r in result["records"]]
    rows.append(["sum", result["sum_ms"], "", None])
    lines = [common.format_table(["group", "ms/step", "share", "kernels" if result["on_gpu"]
                                  else "ops"], rows)]
    unit = "GPU idle (host-bound)" if result["on_gpu"] else "unattributed host time"
    lines.append(f"step without profiler: {result['step_ms']:.2f} ms; {unit}: "
                 f"{result['idle_ms']:.2f} ms")
    if result["recompute_breakdown_ms"]:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in result["recompute_breakdown_ms"].items())
        lines.append(f"recompute = {parts} (ms)")
    lines.append("what FALQON could take on beyond the linear layers:")
    ms = {r["group"]: r["ms"] for r in result["records"]}
    for group, idea in IDEAS:
        if group in ms:  # the mode's own groups only
            lines.append(f"  [{group}: {ms[group]:.2f} ms] {idea}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device, on_gpu = args.device, args.device.type == "cuda"
    adapter = args.update_mode == "adapter"
    name = "profile_fused" if args.fused else "profile_adapter" if adapter else "profile"
    args.out = args.out or mb.default_out(name, args)
    meta = mb.results_meta(device, __file__, argv)
    method = "falqon_fused" if args.fused else METHOD_OF_MODE[args.update_mode]
    print(f"profiling one {method} step ({args.update_mode} mode) of "
          f"{mb.model_name(args.model, args.layers)} on {meta['device']}", flush=True)
    model, optimizer, batch, info = mb.prepare(method, args)
    layers = mark_recompute(model)
    bracket = None
    if not adapter:  # the adapter mode has no proxy update: nothing to attach
        update_range = ProfiledRange(TAG + "proxy_update")
        bracket = mb.AttachBracket(optimizer, lambda: mb.attach_falqon(optimizer, model),
                                   update_range.open, update_range.close)
    for _ in range(args.warmup):
        mb.train_step(model, optimizer, batch, args)
    step_s, _ = mb.timed_steps(model, optimizer, batch, args, args.timed_steps)
    step_ms = 1e3 * statistics.median(step_s)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            profiled_step(model, optimizer, batch, args)
        mb.sync(device)
    t0 = time.perf_counter()
    events = prof.events()
    result = breakdown(events, on_gpu, args.steps, adapter)
    print(f"(profile parsed in {time.perf_counter() - t0:.0f} s)", flush=True)
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    if bracket is not None:
        bracket.remove()
    result.update(method=method, fuse=info.get("fuse"), update_mode=args.update_mode, on_gpu=on_gpu, step_ms=step_ms,
                  idle_ms=max(step_ms - result["sum_ms"], 0.0), meld_s=info["meld_s"],
                  checkpointed_modules=layers)
    config = {**mb.model_config(args), "warmup": args.warmup, "profiled_steps": args.steps,
              "timed_steps": args.timed_steps}
    records = result.pop("records")
    common.write_json(args.out, meta, records, config=config, **result)
    print(f"wrote {os.path.relpath(args.out)}")
    result["records"] = records
    print(format_table(result))
    return {**meta, "config": config, **result}


if __name__ == "__main__":
    main()
