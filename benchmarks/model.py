"""Model-level benchmark: one LoRA training step of a LLaMA-7B-shaped model, FALQON against peers.

A LlamaForCausalLM with random weights (hidden 4096, intermediate 11008, 32 heads, vocab 32000,
32 layers unless --layers cuts it), built directly on the device in bf16 (no download), trained on
16 x 512 random tokens with gradient checkpointing and AdamW, LoRA rank 64 on all seven
projections (q, k, v, o, gate, up, down). Every method runs in this one process, each on a
freshly built model with the memory of the one before freed, in this order: the baseline first,
falqon late (so that a fault in the newest kernels spoils at most the compiled peer after it), the
peer whose torch.compile time is unbounded last:

  bf16_lora         PEFT LoraConfig(r, lora_alpha=r, all 7 projections, dropout 0) on the bf16
                    model; adapters in bf16 (--lora-dtype float32: PEFT's float32 adapters under
                    torch.autocast(bf16), as the HF Trainer runs them).
  qlora_nf4         every projection replaced by bitsandbytes Linear4bit (NF4, double quantisation,
                    bf16 compute), then the same PEFT LoRA (PEFT's bitsandbytes LoRA layer).
  bf16_lora_liger, qlora_nf4_liger
                    the same with Liger Kernel's RMSNorm, SwiGLU, RoPE and fused linear
                    cross-entropy (falqon.fuse(peft_model, "liger"): Liger's kernels put on the
                    model instance, as Liger's apply_liger_kernel_to_llama(model=...) would, but
                    leaving transformers' classes alone for the other methods of the run; RMSNorm
                    out of place): the strongest LoRA a user sets up in a few lines.
  fp8_lora_torchao_eager
                    torchao.float8.convert_to_float8_training on the 7 projections (tensorwise
                    dynamic scaling, its default recipe), then the same PEFT LoRA on top, eager.
                    The order matters: converted first, the frozen base layers are Float8Linear
                    (an nn.Linear, so PEFT's default LoRA layer wraps it) and the adapters stay
                    bf16 (converting after PEFT needs a filter that leaves the adapters' Linears
                    out). torchao's inference configs (quantize_ with Float8DynamicActivation...)
                    have no backward, so this is the composition that trains. Float8Linear keeps
                    the bf16 weight (no memory saving), re-quantises it on every call, and its
                    backward computes the frozen weight's gradient GEMM anyway (torchao 0.17/0.18
                    float8_linear.py).
  falqon            falqon.meld(model, FalqonConfig(rank, topk=10, update_mode="proxy")) +
                    falqon.attach(opt, model): the paper's method; the proxy update runs after
                    every optimizer step, inside the timed step; its share of a step is timed on
                    its own with CUDA events around attach's hook. lora_B is float32
                    (MeldedLinear's default); dB is computed in bf16. Eager, like the others.
  falqon_delayed_wt the same with FalqonConfig(transposed_copy=True, amax_history_len=16): a
                    persistent transposed FP8 weight copy for dgrad and delayed (previous-steps)
                    scaling of x and g, the fastest options of benchmarks/layer.py.
  falqon_adapter    falqon.meld(model, FalqonConfig(rank, update_mode="adapter")), falqon's
                    default mode: B is a LoRA-FA adapter in the forward (an extra 16-bit GEMM
                    there, a skinny one and small kernels in the backward), trained by AdamW like
                    LoRA's and never folded; no proxy update, nothing attached.
  falqon_adapter_delayed_wt
                    the adapter mode with transposed_copy=True and amax_history_len=16.
  falqon_adapter_train_a
                    the adapter mode with FalqonConfig(train_a=True): A trained too (an fp32
                    lora_A per layer, dA's two small GEMMs in the backward, A's FP8 rows rewritten
                    by falqon.attach's hook after every step).
  falqon_fused      falqon_adapter + falqon.fuse(model): falqon's fast path, backend "auto"
                    (torch.compile of each decoder layer on a GPU, Liger Kernel's fused loss where
                    installed); the record's "fuse" says which backend ran and what it fused.
  falqon_fused_train_a
                    falqon_adapter_train_a + falqon.fuse(model): the fast path with A trained.
  falqon_fused_compile
                    falqon_adapter + falqon.fuse(model, "compile"): each decoder layer under
                    torch.compile, melded ops inside, Liger's fused loss where installed (what
                    auto picks today; kept by name for runs before it did).
  falqon_fused_liger
                    falqon_adapter + falqon.fuse(model, "liger"): Liger Kernel's RMSNorm, SwiGLU,
                    RoPE and fused loss (auto's choice before run 66).
  falqon_fused_cudagraphs
                    falqon_adapter + falqon.fuse(model, "compile",
                    compile_mode="reduce-overhead"): the compiled layers as CUDA graphs
                    (reentrant checkpointing only; 7x slower than falqon_fused at 7B, run 74).
  fp8_lora_torchao  the same as fp8_lora_torchao_eager with each Float8Linear base layer under
                    torch.compile, as torchao intends and as benchmarks/layer.py runs it (the casts
                    fused, the dead weight-gradient GEMM dropped); the adapters stay eager.

Per method: seconds per step (median of --steps timed steps after --warmup), tokens/s and peak
device memory (torch.cuda.max_memory_allocated, reset after the model is built). The run's first
falqon method also times falqon.meld of the whole model (a "meld" record). A method that cannot
be imported or run is recorded as {"skipped": reason}, never dropped. Results go to
benchmarks/results/model_<device>.json; the table is printed last.

Loss sanity: every step trains on the same random batch at --lr (1e-4 by default, a LoRA-sized
rate), so a method whose updates reach the model drives the loss down. Each record keeps the
loss of its first step ("first_loss", before any update) and of its last ("final_loss", after
"loss_steps" optimizer steps: --warmup, one step that sizes the timing, the timed steps; the
same for every method unless --budget-s cuts the timed steps). The first warm-up step of a
falqon method (one even with --warmup 0) checks that B was trained (and, in the proxy mode,
folded in and reset).

    python benchmarks/model.py                         # full 32 layers, all methods (~5 min, H100)
    python benchmarks/model.py --quick                 # 8 layers, fewer steps
    python benchmarks/model.py --methods bf16_lora,falqon,falqon_adapter   # a subset, in order
    python benchmarks/model.py --device cpu --model tiny --steps 2   # smoke test, no GPU

Larger models (model_build.py): --model llama-13b, or llama2-70b (hidden 8192, MLP 28672, 80
layers, 64 heads, 8 KV heads). A method whose estimated memory (weights, trainable parameters with
gradients and AdamW moments, activations at --min-batch) exceeds the device is recorded as not
fitting ({"fits": false, "needs_bytes"}); one that runs out of memory runs again at half the batch
(16, 8, 4 x 512 tokens by default), and is recorded the same way if even --min-batch does not fit.
Where the bf16 model's weights take more than half the device, the falqon methods build it with
falqon.meld_from_config (seeded random weights made on the GPU and melded layer by layer: their
meld record has "source": "synthetic" and "peak_gib") and qlora_nf4 quantises it layer by layer;
the rest build the whole bf16 model (and run out of memory, recorded). --meld-from-disk first
writes the bf16 model as a safetensors checkpoint to local disk and times falqon.meld_pretrained
from it ("source": "disk", page cache cold, then warm). Full-depth runs of every model merge
their records into benchmarks/results/model_<device>.json (a record measured again replaces the
old one).

    python benchmarks/model.py --model llama2-70b --methods falqon,falqon_adapter,bf16_lora \
        --warmup 1 --steps 2
    python benchmarks/model.py --model llama-7b --methods none --meld-from-disk
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pathlib
import statistics
import sys
import time
import traceback

import torch

if __package__ in (None, ""):  # run as a script, or imported with benchmarks/ on sys.path
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import common
    import model_args
    import model_build
    import model_fused
    import model_peers
    import step_timing
else:
    from . import common, model_args, model_build, model_fused, model_peers, step_timing
# The shapes, the shared options and the results naming are model_args.py's; the names stay here
# (profile_step.py and distributed.py use them through this module).
SHAPES, RESULTS_DIR, model_name = model_args.SHAPES, model_args.RESULTS_DIR, model_args.model_name
add_model_args, check_model_args = model_args.add_model_args, model_args.check_model_args
model_config, results_meta = model_args.model_config, model_args.results_meta
default_out = model_args.default_out
# The peer methods (PEFT LoRA, QLoRA, torchao float8) are model_peers.py's; the names stay here.
PROJECTIONS, projection_modules = model_peers.PROJECTIONS, model_peers.projection_modules
_peft_lora, setup_bf16_lora = model_peers._peft_lora, model_peers.setup_bf16_lora
setup_qlora_nf4 = model_peers.setup_qlora_nf4
setup_fp8_lora_torchao_eager = model_peers.setup_fp8_lora_torchao_eager
setup_fp8_lora_torchao = model_peers.setup_fp8_lora_torchao
# The step timing (CUDA events, the proxy update's bracket) is step_timing.py's.
Stamp, AttachBracket, UpdateTimer = (step_timing.Stamp, step_timing.AttachBracket,
                                     step_timing.UpdateTimer)


# Run in this order: torch.compile's unbounded compile time last, falqon before it (see above).
METHODS = ("bf16_lora", "qlora_nf4", "bf16_lora_liger", "qlora_nf4_liger",
           "fp8_lora_torchao_eager", "falqon", "falqon_delayed_wt", "falqon_adapter",
           "falqon_adapter_delayed_wt", "falqon_adapter_train_a", "falqon_fused",
           "falqon_fused_train_a", "falqon_fused_liger", "falqon_fused_compile",
           "falqon_fused_cudagraphs", "fp8_lora_torchao")
# FalqonConfig options per falqon method: each mode with current scaling, and with the fastest
# options (benchmarks/layer.py's names).
FASTEST = {"transposed_copy": True, "amax_history_len": 16}
FALQON_OPTIONS = {"falqon": {"update_mode": "proxy"},
                  "falqon_delayed_wt": {"update_mode": "proxy", **FASTEST},
                  "falqon_adapter": {"update_mode": "adapter"},
                  "falqon_adapter_delayed_wt": {"update_mode": "adapter", **FASTEST},
                  "falqon_adapter_train_a": {"update_mode": "adapter", "train_a": True}}
BASELINE = "bf16_lora"


# ---- the model ---------------------------------------------------------------------------------

def build_model(shape: str, layers: int, seq: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0):
    """A LlamaForCausalLM with random weights (transformers' own init), made on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": layers},
                         max_position_embeddings=max(seq, 2048), use_cache=False,
                         attention_dropout=0.0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    # Parameters are created and initialised on the device: no host copy of 13 GB of weights.
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.train()
    return model


def enable_checkpointing(model, kind: str = "non_reentrant") -> None:
    """Activation checkpointing of every decoder layer (transformers 5.17..5.23+): non-reentrant
    (transformers' default, and this benchmark's) or reentrant (--checkpointing reentrant)."""
    from falqon.training import enable_gradient_checkpointing

    enable_gradient_checkpointing(model, reentrant=kind == "reentrant")


def random_batch(batch: int, seq: int, vocab: int, device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- methods (the peers' setups are model_peers.py's) ------------------------------------------

def is_proxy(method: str) -> bool:
    """Whether `method` is a falqon method in the proxy mode (with an update after each step)."""
    return FALQON_OPTIONS.get(method, {}).get("update_mode") == "proxy"


def needs_attach(method: str) -> bool:
    """Whether `method` needs falqon.attach's hook after each optimizer step: the proxy update,
    or a trained A's FP8 rows rewritten from lora_A."""
    return is_proxy(method) or bool(FALQON_OPTIONS.get(method, {}).get("train_a"))


def setup_falqon(model, args, info, options=None):
    import falqon

    missing = [n for n in ("meld", "attach", "FalqonConfig") if not hasattr(falqon, n)]
    if missing:
        raise common.Skip(f"this falqon has no {', '.join('falqon.' + n for n in missing)} "
                          f"(the workflow branch has not landed)")
    cfg = falqon.FalqonConfig(rank=args.rank, topk=args.topk, **(options or {}))
    sync(args.device)
    t0 = time.perf_counter()
    falqon.meld(model, cfg, progress=False, verbose=False)
    sync(args.device)
    info["meld_s"] = time.perf_counter() - t0
    melded = [m for _, m in projection_modules(model) if isinstance(m, falqon.MeldedLinear)]
    if len(melded) != 7 * args.layers:
        raise RuntimeError(f"falqon.meld melded {len(melded)} projections, expected "
                           f"{7 * args.layers}")
    info["melded_layers"] = melded
    return model


def _falqon_setup(method: str):
    return lambda model, args, info: setup_falqon(model, args, info, FALQON_OPTIONS[method])


SETUP = {**{m: _falqon_setup(m) for m in FALQON_OPTIONS},
         "bf16_lora": setup_bf16_lora, "qlora_nf4": setup_qlora_nf4,
         "fp8_lora_torchao_eager": setup_fp8_lora_torchao_eager,
         "fp8_lora_torchao": setup_fp8_lora_torchao}

NOTES = {
    "bf16_lora": "PEFT LoRA on the bf16 base",
    "qlora_nf4": "bitsandbytes Linear4bit NF4 (double quant, bf16 compute) + PEFT LoRA",
    "fp8_lora_torchao_eager": ("torchao Float8Linear (tensorwise dynamic scaling) under PEFT "
                               "LoRA, eager; bf16 weights kept and re-quantised per call; the "
                               "backward computes the frozen weight's gradient GEMM anyway"),
    "fp8_lora_torchao": ("the same with each Float8Linear base under torch.compile (casts fused, "
                         "the frozen weight's gradient GEMM dropped as dead code)"),
    "falqon": "falqon.meld + falqon.attach (proxy update inside optimizer.step)",
    "falqon_delayed_wt": ("the same with FalqonConfig(transposed_copy=True, amax_history_len=16): "
                          "a transposed FP8 weight copy and delayed scaling"),
    "falqon_adapter": ("falqon.meld with FalqonConfig(update_mode='adapter'): B a LoRA-FA adapter "
                       "in the forward, trained by AdamW, never folded; no proxy update"),
    "falqon_adapter_delayed_wt": ("the adapter mode with FalqonConfig(transposed_copy=True, "
                                  "amax_history_len=16)"),
    "falqon_adapter_train_a": ("the adapter mode with FalqonConfig(train_a=True): A trained too "
                               "(dA in the backward, A's FP8 rows rewritten by falqon.attach)"),
}


# ---- fused methods (benchmarks/model_fused.py): a method above with falqon.fuse's kernels --------
FUSED, LIGER_FUSIONS = model_fused.FUSED, model_fused.LIGER_FUSIONS
model_fused.register(SETUP, FALQON_OPTIONS, NOTES)


# ---- steps and timing (Stamp, AttachBracket, UpdateTimer: step_timing.py) --------------------

def autocast_context(args):
    if args.lora_dtype == "float32" and args.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, batch, args) -> torch.Tensor:
    with autocast_context(args):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def checked_step(method, layers, model, optimizer, batch, args) -> torch.Tensor:
    """One training step that checks that the optimizer wrote into lora_B and, in the proxy mode,
    that attach's hook folded it in and reset B (the default drop policy zeroes every B); in the
    adapter mode, that B kept its update (nothing folds it). Returns the step's loss."""
    with autocast_context(args):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = float(sum(l.lora_B.grad.abs().sum() for l in layers if l.lora_B.grad is not None))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    left = float(sum(l.lora_B.detach().abs().sum() for l in layers))
    value = float(loss.detach())
    if not math.isfinite(grads) or not math.isfinite(value):
        raise RuntimeError(f"{method}: non-finite loss ({value}) or lora_B gradient ({grads})")
    if not grads > 0:
        raise RuntimeError(f"{method}: lora_B received no gradient")
    if is_proxy(method):
        if left != 0 and not any(l.keep_residual for l in layers):
            raise RuntimeError(f"{method}: lora_B is not zero after optimizer.step(): attach's "
                               f"proxy update did not run")
    elif not left > 0:
        raise RuntimeError(f"{method}: lora_B is zero after optimizer.step(): the adapter mode's "
                           f"B did not keep its update")
    return loss.detach()


def prepare(method: str, args):
    """(model, optimizer, batch, info): a freshly built model turned into `method`'s, with
    activation checkpointing on, AdamW over its trainable parameters and one random batch."""
    info: dict = {}
    options = FALQON_OPTIONS.get(method)
    if model_build.build_layerwise(args) and model_build.builds_layerwise(method, options):
        # The bf16 model is too large to build whole (--build auto) or --build layerwise.
        if method in FUSED:
            model_fused.check_fuse_device(args)
        model = model_build.layerwise_model(method, options, args, info, projection_modules,
                                            _peft_lora)
        if method in FUSED:  # the fused methods' fusions, on the layer-by-layer build too
            model = model_fused.apply_fuse(method, model, info)
    else:
        model = build_model(args.model, args.layers, args.seq, args.device, args.dtype,
                            args.seed)
        model = SETUP[method](model, args, info)
    enable_checkpointing(model, args.checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    batch = random_batch(args.batch, args.seq, model.config.vocab_size, args.device, args.seed + 1)
    return model, optimizer, batch, info


def attach_falqon(optimizer, model):
    import falqon

    return falqon.attach(optimizer, model)


def pre_steps(method, model, optimizer, batch, info, args) -> tuple[torch.Tensor | None, int]:
    """The untimed steps before the timing: --warmup of them, at least one for a falqon method,
    whose first step is checked (checked_step). (The first step's loss or None, the count.)"""
    first, count = None, max(args.warmup, 1 if method in FALQON_OPTIONS else 0)
    for i in range(count):
        if i == 0 and method in FALQON_OPTIONS:
            loss = checked_step(method, info["melded_layers"], model, optimizer, batch, args)
        else:
            loss = train_step(model, optimizer, batch, args)
        first = loss if first is None else first
    return first, count


def timed_steps(model, optimizer, batch, args, count: int) -> tuple[list[float], torch.Tensor]:
    """(seconds of each of `count` steps, the last step's loss), by CUDA events on the GPU."""
    stamps, loss = [], None
    for _ in range(count):
        start = Stamp(args.device).record()
        loss = train_step(model, optimizer, batch, args)
        stamps.append((start, Stamp(args.device).record()))
    sync(args.device)
    return [a.ms_to(b) / 1e3 for a, b in stamps], loss


def measure(method, model, optimizer, batch, info, timer, args):
    """(resident bytes, first loss, untimed steps, timed steps, their seconds, last loss) of the
    prepared method: its untimed steps, one sizing step, the timed steps."""
    device = args.device
    resident = None
    common.free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)

    first_loss, untimed = pre_steps(method, model, optimizer, batch, info, args)
    # One synchronised step sizes the timed loop to the per-method time budget.
    sync(device)
    t0 = time.perf_counter()
    loss = train_step(model, optimizer, batch, args)
    sync(device)
    estimate = time.perf_counter() - t0
    first_loss = loss if first_loss is None else first_loss
    steps = max(min(args.steps, int(args.budget_s / max(estimate, 1e-9))), min(3, args.steps))

    if timer is not None:
        timer.pairs.clear()
    step_s, loss = timed_steps(model, optimizer, batch, args, steps)
    return resident, first_loss, untimed, steps, step_s, loss


def run_method(method: str, args, meld_timed: bool = False) -> tuple[dict, dict | None]:
    """(model record, meld record or None) of one method on a freshly built model. The meld
    record comes from the run's first falqon method (meld_timed: one is recorded already).
    Where the steps run out of device memory, they run again on the same model at half the
    batch, down to --min-batch (the batches that did not fit are recorded)."""
    device = args.device
    model, optimizer, batch, info = prepare(method, args)
    timer = None
    if is_proxy(method):
        timer = UpdateTimer(optimizer, device, lambda: attach_falqon(optimizer, model))
    elif needs_attach(method):  # a trained A: its rows follow lora_A after every step
        attach_falqon(optimizer, model)
    size, too_large = args.batch, []
    while True:
        try:
            resident, first_loss, untimed, steps, step_s, loss = measure(
                method, model, optimizer, batch, info, timer, args)
            break
        except torch.cuda.OutOfMemoryError:
            if size // 2 < min(args.min_batch, args.batch):
                raise
            too_large.append(size)
        size //= 2
        optimizer.zero_grad(set_to_none=True)
        batch = random_batch(size, args.seq, model.config.vocab_size, device, args.seed + 1)
    s_per_step = statistics.median(step_s)
    tokens = size * args.seq
    record = {
        "kind": "model", "model": model_name(args.model, args.layers), "tokens": tokens,
        "batch": size, "seq": args.seq,
        "method": method, "s_per_step": s_per_step, "tokens_per_s": tokens / s_per_step,
        "peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                     if device.type == "cuda" else None),
        "resident_gib": resident / 2**30 if device.type == "cuda" else None,
        "steps": steps, "step_s_min": min(step_s), "step_s_max": max(step_s),
        "trainable_params": info["trainable_params"], "first_loss": float(first_loss),
        # The last step's forward follows this many optimizer steps (the estimate's included).
        "final_loss": float(loss), "loss_steps": untimed + steps, "lr": args.lr,
        "note": NOTES[method],
    }
    for key in ("bitsandbytes", "torchao", "fuse"):
        if key in info:
            record[key] = info[key]
    if too_large:
        record["batches_out_of_memory"] = too_large
    if method in FALQON_OPTIONS:
        record["update_mode"] = FALQON_OPTIONS[method]["update_mode"]
    if timer is not None:
        update_ms = [a.ms_to(b) for a, b in timer.pairs]
        record["update_ms"] = statistics.median(update_ms)
        record["update_share"] = record["update_ms"] / 1e3 / s_per_step
        timer.remove()
    meld_record = None
    if method in FALQON_OPTIONS and not meld_timed:
        meld_record = {"kind": "meld", "model": record["model"], "seconds": info["meld_s"],
                       "layers": len(info["melded_layers"]), "rank": args.rank, "method": method,
                       "source": info.get("meld_source", "memory"),
                       "peak_gib": info.get("meld_peak_gib")}
    if not math.isfinite(record["final_loss"]):
        raise RuntimeError(f"{method}: the loss is not finite ({record['final_loss']})")
    return record, meld_record


def format_table(records: list[dict]) -> str:
    base = next((r for r in records if r.get("kind") == "model" and r["method"] == BASELINE
                 and "skipped" not in r), None)
    rows, notes = [], []
    for r in records:
        if r.get("kind") == "meld":
            notes.append(model_build.meld_note(r))
        elif "skipped" in r:
            rows.append([r["method"]] + [None] * 7)
            notes.append(f"{r['method']} skipped: {r['skipped']}")
        else:
            rows.append([r["method"], r["s_per_step"], round(r["tokens_per_s"]), r["peak_gib"],
                         r.get("update_ms"),
                         # tokens/s: a method that ran a smaller batch (out of memory at the
                         # full one) is compared at what it did
                         r["tokens_per_s"] / base["tokens_per_s"] if base else None,
                         r["first_loss"], r["final_loss"]])
    table = common.format_table(["method", "s/step", "tokens/s", "peak GiB", "update ms",
                                 f"tokens/s vs {BASELINE}", "first loss", "final loss"], rows)
    ran = next((r for r in records if r.get("kind") == "model" and "skipped" not in r), None)
    if ran:
        notes.append(f"loss: the same batch every step, AdamW lr {ran['lr']:g}; the final loss "
                     f"is the forward's after {ran['loss_steps']} optimizer steps")
    return "\n".join([table] + notes)


# ---- command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, run in this order (default {','.join(METHODS)}); "
                   f"'none' for the meld records only")
    add_model_args(p)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (default 3)")
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps, median reported (default 10)")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="at most this many seconds of timed steps per method (at least 3 steps)")
    p.add_argument("--min-batch", type=int, default=4,
                   help="a method out of memory at --batch runs again at half the batch, down to "
                   "this (default 4: 16, 8 or 4 x 512 tokens)")
    p.add_argument("--meld-from-disk", action="store_true",
                   help="first write the bf16 model as a safetensors checkpoint to --disk-dir and "
                   "time falqon.meld_pretrained from it (page cache cold, then warm)")
    p.add_argument("--disk-dir", default=None,
                   help="where --meld-from-disk writes its checkpoint (default: the temp dir)")
    p.add_argument("--quick", action="store_true",
                   help="8 layers (unless --layers), 1 warm-up and 3 timed steps")
    p.add_argument("--out", type=pathlib.Path, help="results JSON (default "
                   "benchmarks/results/model_<device>.json; a --quick or cut run adds a suffix)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if args.methods == ["none"]:
        args.methods = []
    elif unknown or not args.methods:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.min_batch < 1:
        p.error("--min-batch must be >= 1")
    if args.quick:
        args.layers = args.layers or 8
        args.warmup, args.steps = 1, min(args.steps, 3)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    check_model_args(p, args)
    return args


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    name = model_name(args.model, args.layers)
    full = args.layers == SHAPES[args.model]["num_hidden_layers"] and not args.quick
    # Every full model of a device goes into one file, each run's records merged into it.
    args.out = args.out or (RESULTS_DIR / f"model_{common.device_tag(args.device.type)}.json"
                            if full and args.model != "tiny" else
                            default_out("model", args, args.quick))
    meta = results_meta(args.device, __file__, argv)
    previous = model_build.previous_records(args.out, meta["device"])
    config = {**model_config(args), "warmup": args.warmup, "steps": args.steps}
    print(f"{name} on {meta['device']}: {args.batch} x {args.seq} tokens, rank {args.rank}, "
          f"methods {', '.join(args.methods) or 'none'}", flush=True)
    records: list[dict] = []
    if args.meld_from_disk:
        try:
            records += model_build.disk_meld_records(args, name, build_model)
        except Exception as exc:  # recorded like a method that cannot run
            traceback.print_exc()
            records.append({"kind": "meld", "source": "disk", "model": name,
                            "skipped": f"{type(exc).__name__}: {exc}".strip()[:500]})
            del exc
        common.free_memory()
        for r in records:
            print(f"  {model_build.meld_note(r)}", flush=True)
        common.write_json(args.out, meta, model_build.merged(previous, records), config=config)
    for method in args.methods:
        t0 = time.perf_counter()
        try:
            meld_timed = any(r["kind"] == "meld" and r.get("source") != "disk" for r in records)
            record = model_build.unfit_record(method, FALQON_OPTIONS.get(method), args,
                                              args.shape, name)
            meld_record = None
            if record is None:
                record, meld_record = run_method(method, args, meld_timed)
        except Exception as exc:
            # A method that cannot run is listed with its reason (the traceback goes to stderr
            # for anything but a clean Skip), and the run goes on with the next one.
            if not isinstance(exc, common.Skip):
                traceback.print_exc()
            reason = f"{'' if isinstance(exc, common.Skip) else type(exc).__name__ + ': '}{exc}"
            record = {"kind": "model", "model": name, "tokens": args.batch * args.seq,
                      "method": method, "skipped": reason.strip()[:500]}
            if isinstance(exc, torch.cuda.OutOfMemoryError):  # with the bytes it would need
                record = model_build.out_of_memory_record(method, FALQON_OPTIONS.get(method),
                                                          args, args.shape, name, exc)
            meld_record = None
            del exc
        common.free_memory()
        records.append(record)
        if meld_record:
            records.append(meld_record)
        status = record.get("skipped") or (f"{record['s_per_step']:.3f} s/step over "
                                           f"{record['steps']} steps")
        print(f"  {method}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
        # partial results survive
        common.write_json(args.out, meta, model_build.merged(previous, records), config=config)
    print(f"wrote {os.path.relpath(args.out)}")
    print(format_table(records))
    return records


if __name__ == "__main__":
    main()
