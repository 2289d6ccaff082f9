"""Models larger than half the GPU in benchmarks/model.py: whether a method fits a model at all (a
lower bound of the memory it needs), layer-by-layer builds of models whose bf16 weights do not
fit (falqon.meld_from_config for the falqon methods, NF4 layer by layer for QLoRA), the meld
records (synthetic weights; a real safetensors checkpoint written to local disk first), and one
results file per device that each run's records are merged into.

Everything here is called from model.py, which passes in what it owns (its setups' pieces), so
that this module never imports model.py (which runs as a script or as a module)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import time

import torch

if __package__ in (None, ""):
    import common
else:
    from . import common

GIB = 2 ** 30
# The bf16 model is built whole (and then converted, as the methods always were) when its
# weights take at most this share of the device; else the methods that can build layer by layer.
WHOLE_MODEL_SHARE = 0.5


# ---- what a method needs ------------------------------------------------------------------------

def projection_shapes(shape: dict) -> list[tuple[int, int]]:
    """(in_features K, out_features N) of one decoder layer's q, k, v, o, gate, up and down."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def other_params(shape: dict, layers: int) -> int:
    """Parameters outside the projections: embeddings, lm_head (untied), the norms."""
    return 2 * shape["vocab_size"] * shape["hidden_size"] + (2 * layers + 1) * shape["hidden_size"]


def needed_bytes(method: str, options: dict | None, shape: dict, layers: int, rank: int,
                 tokens: int, lora_bytes: int = 2) -> int:
    """An estimate of the device memory `method` holds at the peak of a training step of `tokens`
    tokens: its weights; its trainable parameters with their gradients and AdamW's two moments;
    the checkpointed input of every decoder layer; the logits (bf16, and fp32 for the loss and its
    gradient); the recomputed MLP's activations and their gradients (at least 6 of tokens x
    intermediate). It leaves out attention's activations, workspaces and the allocator's slack,
    so a method over the device's memory cannot fit, and one under it may still not. `options`:
    the falqon method's FalqonConfig options (None for the peers); lora_bytes: PEFT's adapter
    dtype size."""
    proj = projection_shapes(shape)
    h, v = shape["hidden_size"], shape["vocab_size"]
    r16 = -(-rank // 16) * 16  # the melded A's rows, padded
    if options is not None:
        adapter = options.get("update_mode", "adapter") == "adapter"
        weights = sum((n + r16) * k for k, n in proj)
        if options.get("transposed_copy"):
            weights += sum((n + r16 if adapter else n) * k for k, n in proj)
        trainable = sum(n * rank for _, n in proj) * 4 * 4  # fp32 B, its gradient, 2 moments
    else:
        lin = sum(k * n for k, n in proj)
        # NF4: 4-bit codes, an 8-bit absmax per 64 values, an fp32 scale per 256 absmaxes.
        weights = int(lin * (0.5 + 1 / 64 + 4 / (64 * 256))) if method == "qlora_nf4" else 2 * lin
        trainable = sum(rank * (k + n) for k, n in proj) * lora_bytes * 4
    activations = layers * tokens * h * 2 + tokens * v * (2 + 4 + 4) + \
        6 * tokens * shape["intermediate_size"] * 2
    return layers * (weights + trainable) + 2 * other_params(shape, layers) + activations


def device_bytes(args) -> int | None:
    """The device memory this process can allocate (free, plus what torch's allocator holds;
    --memory-gib overrides it); None on the CPU (no limit checked)."""
    if args.memory_gib is not None:
        return int(args.memory_gib * GIB)
    if args.device.type == "cuda":
        return torch.cuda.mem_get_info(args.device)[0] + torch.cuda.memory_reserved(args.device)
    return None


def _unfit(method: str, options: dict | None, args, shape: dict, name: str, capacity: int,
           why: str) -> dict:
    batch = min(args.min_batch, args.batch)
    need = needed_bytes(method, options, shape, args.layers, args.rank, batch * args.seq,
                        4 if args.lora_dtype == "float32" else 2)
    return {"kind": "model", "model": name, "tokens": batch * args.seq, "method": method,
            "fits": False, "needs_bytes": need, "device_bytes": capacity,
            "skipped": (f"does not fit: {why}it needs about {need / GIB:.1f} GiB at {batch} x "
                        f"{args.seq} tokens (weights, trainable parameters with gradients and "
                        f"AdamW moments, activations; an estimate), the device has "
                        f"{capacity / GIB:.1f} GiB")}


def unfit_record(method: str, options: dict | None, args, shape: dict, name: str) -> dict | None:
    """The record of a method that cannot fit the model on this device even at --min-batch (its
    estimate exceeds the device's memory), or None: then it is run."""
    capacity = device_bytes(args)
    if capacity is None:
        return None
    record = _unfit(method, options, args, shape, name, capacity, "")
    return record if record["needs_bytes"] > capacity else None


def out_of_memory_record(method: str, options: dict | None, args, shape: dict, name: str,
                         exc: BaseException) -> dict:
    """The record of a method that ran out of device memory (building the model, or at every
    batch down to --min-batch)."""
    capacity = device_bytes(args) or 0
    first = (str(exc).strip().splitlines() or ["out of memory"])[0][:200]
    return _unfit(method, options, args, shape, name, capacity, f"out of memory ({first}); ")


def build_layerwise(args) -> bool:
    """Whether this run builds its models layer by layer where the method can
    (builds_layerwise; the others build the whole bf16 model, and may run out of memory):
    --build layerwise, or --build auto where the whole bf16 model's weights would take more than
    WHOLE_MODEL_SHARE of the device."""
    if args.build == "layerwise":
        return True
    capacity = device_bytes(args)
    if capacity is None:
        return False
    shape = args.shape
    bf16 = 2 * (args.layers * sum(k * n for k, n in projection_shapes(shape))
                + other_params(shape, args.layers))
    return bf16 > WHOLE_MODEL_SHARE * capacity


# ---- layer-by-layer builds -----------------------------------------------------------------------

def llama_config(shape: dict, layers: int, seq: int):
    """The LlamaConfig model.py's build_model makes."""
    from transformers import LlamaConfig

    config = LlamaConfig(**{**shape, "num_hidden_layers": layers},
                         max_position_embeddings=max(seq, 2048), use_cache=False,
                         attention_dropout=0.0)
    config._attn_implementation = "sdpa"
    return config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    common.free_memory()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_gib(device: torch.device, base: int) -> float | None:
    return (torch.cuda.max_memory_allocated(device) - base) / GIB if device.type == "cuda" \
        else None


def falqon_layerwise(options: dict, args, info: dict, projections):
    """falqon.meld_from_config of the model with seeded random weights made on the device, timed
    (the run's "meld" record, source "synthetic")."""
    import falqon

    cfg = falqon.FalqonConfig(rank=args.rank, topk=args.topk, **options)
    config = llama_config(args.shape, args.layers, args.seq)
    base = _reset_peak(args.device)
    sync(args.device)
    t0 = time.perf_counter()
    model = falqon.meld_from_config(config, cfg, device=args.device, dtype=args.dtype,
                                    seed=args.seed, progress=False, verbose=False)
    sync(args.device)
    info.update(meld_s=time.perf_counter() - t0, meld_source="synthetic",
                meld_peak_gib=_peak_gib(args.device, base))
    melded = [m for _, m in projections(model) if isinstance(m, falqon.MeldedLinear)]
    if len(melded) != 7 * args.layers:
        raise RuntimeError(f"falqon.meld_from_config melded {len(melded)} projections, expected "
                           f"{7 * args.layers}")
    info["melded_layers"] = melded
    return model.train()


def nf4_linear(bnb, linear):
    """The QLoRA swap of one layer (model.py's setup_qlora_nf4 and the layer-by-layer build):
    bitsandbytes Linear4bit (NF4, double quantisation, bf16 compute), quantised as it moves to
    the device."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                          compute_dtype=linear.weight.dtype, compress_statistics=True,
                          quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False,
                                 compress_statistics=True, quant_type="nf4",
                                 module=q).to(linear.weight.device)
    return q


def qlora_layerwise(args, info: dict, projections, peft_lora):
    """QLoRA built layer by layer: each projection's bf16 weight made on the device (the same
    seeded weights as falqon's) and quantised to NF4 before the next is made, then PEFT LoRA."""
    bnb = common.import_bitsandbytes()
    from falqon.loading import empty_model, load_layerwise
    from falqon.weight_sources import RandomWeights

    info["bitsandbytes"] = bnb.__version__
    config = llama_config(args.shape, args.layers, args.seq)
    model = empty_model(config, args.dtype)
    targets = [n for n, _ in projections(model)]
    load_layerwise(model, RandomWeights(config.initializer_range, args.seed), args.device,
                   dict.fromkeys(targets, lambda linear: nf4_linear(bnb, linear)),
                   progress=False)
    model.is_loaded_in_4bit = True  # PEFT's bitsandbytes LoRA layer needs the flag
    peft_model = peft_lora(model.train(), args)
    base = [m.get_base_layer() for _, m in projections(peft_model) if hasattr(m, "lora_A")]
    if not all(isinstance(b, bnb.nn.Linear4bit) for b in base):
        raise RuntimeError("PEFT did not keep the Linear4bit base layers")
    return peft_model


def builds_layerwise(method: str, options: dict | None) -> bool:
    """Whether the method has a layer-by-layer build (the others convert the whole bf16 model)."""
    return options is not None or method == "qlora_nf4"


def layerwise_model(method: str, options: dict | None, args, info: dict, projections, peft_lora):
    """The method's model built layer by layer (builds_layerwise)."""
    if options is not None:
        return falqon_layerwise(options, args, info, projections)
    return qlora_layerwise(args, info, projections, peft_lora)


# ---- the meld from disk -------------------------------------------------------------------------

def drop_page_cache(files) -> bool:
    """Evict the files from the page cache (fsync, then posix_fadvise DONTNEED: no root needed),
    so that the next read comes from the disk. False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def disk_meld_records(args, name: str, build_model) -> list[dict]:
    """Write the model's bf16 weights (build_model's, on the device) as a sharded safetensors
    checkpoint into a fresh directory under --disk-dir, then time falqon.meld_pretrained from
    those files to a melded model on the device (FalqonConfig's defaults at --rank): first with
    the files evicted from the page cache ("cold"), then with them cached ("warm"). Records
    kind "meld", source "disk", with the peak device memory of the load and the bf16 size. The
    directory is removed whatever happens."""
    import falqon

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="falqon-meld-", dir=args.disk_dir))
    try:
        model = build_model(args.model, args.layers, args.seq, args.device, args.dtype, args.seed)
        bf16 = sum(p.numel() * p.element_size() for p in model.parameters())
        t0 = time.perf_counter()
        model.save_pretrained(tmp, max_shard_size="5GB")
        write_s = time.perf_counter() - t0
        del model
        common.free_memory()
        files = sorted(tmp.glob("*.safetensors"))
        records = []
        for cache in ("cold", "warm"):
            dropped = drop_page_cache(files) if cache == "cold" else True
            cfg = falqon.FalqonConfig(rank=args.rank, topk=args.topk)
            base = _reset_peak(args.device)
            sync(args.device)
            t0 = time.perf_counter()
            melded = falqon.meld_pretrained(tmp, cfg, device=args.device, dtype=args.dtype,
                                            progress=False, verbose=False)
            sync(args.device)
            seconds = time.perf_counter() - t0
            records.append({
                "kind": "meld", "source": "disk", "model": name, "seconds": seconds,
                "peak_gib": _peak_gib(args.device, base), "bf16_gib": bf16 / GIB,
                "checkpoint_gib": sum(f.stat().st_size for f in files) / GIB,
                "shards": len(files), "write_s": write_s,
                "page_cache": cache if dropped else "warm (could not be dropped)",
                "layers": len(falqon.melded_layers(melded)), "rank": args.rank,
                "method": f"falqon.meld_pretrained ({cfg.update_mode} mode)"})
            del melded
            common.free_memory()
        return records
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def meld_note(r: dict) -> str:
    """One line on a meld record."""
    source = r.get("source", "memory")
    if "skipped" in r:
        return f"meld of {r['model']} ({source}) not run: {r['skipped']}"
    peak = "" if r.get("peak_gib") is None else f", peak {r['peak_gib']:.1f} GiB"
    what = {"memory": f"falqon.meld of {r['model']} (the bf16 model in memory)",
            "synthetic": f"falqon.meld_from_config of {r['model']} (seeded random weights made "
                         f"layer by layer)",
            "disk": f"falqon.meld_pretrained of {r['model']} from {r.get('shards')} safetensors "
                    f"shards ({r.get('bf16_gib', 0):.1f} GiB bf16, page cache "
                    f"{r.get('page_cache')})"}.get(source, f"meld of {r['model']} ({source})")
    return f"{what}, {r['layers']} layers, rank {r['rank']}: {r['seconds']:.1f} s{peak}"


# ---- one results file per device -----------------------------------------------------------------

def record_key(r: dict) -> tuple:
    if r.get("kind") == "meld":
        return ("meld", r.get("model"), r.get("source", "memory"), r.get("page_cache"))
    return (r.get("kind"), r.get("model"), r.get("method"))


def previous_records(path: pathlib.Path, device: str) -> list[dict]:
    """The records an earlier run of this device left in `path` (none from another device)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    if not isinstance(data, dict) or data.get("device") != device:
        return []
    return [r for r in data.get("records", []) if isinstance(r, dict)]


def merged(previous: list[dict], records: list[dict]) -> list[dict]:
    """The earlier records that this run did not measure again, then this run's."""
    new = {record_key(r) for r in records}
    return [r for r in previous if record_key(r) not in new] + records


__all__ = ["build_layerwise", "builds_layerwise", "device_bytes", "disk_meld_records",
           "layerwise_model", "meld_note", "merged", "needed_bytes", "out_of_memory_record",
           "previous_records", "unfit_record"]
