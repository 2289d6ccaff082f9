"""Several-GPU benchmark: FALQON training of a LLaMA-7B-shaped model on one GPU, under DDP and
under FSDP2, in both update modes and on falqon's fused fast path.

benchmarks/model.py's model (random weights, bf16, gradient checkpointing, AdamW over B, LoRA rank
64 on the seven projections) and its step, per GPU a batch of --batch x --seq random tokens (16 x
512; each rank its own). This script starts its own --gpus worker processes
(torch.multiprocessing spawn; NCCL on GPUs, gloo on the CPU) and, per method (falqon_adapter:
the adapter mode; falqon: the proxy update after every step; falqon_fused: falqon_adapter with
falqon.fuse, Liger Kernel's fused linear cross-entropy among its kernels), measures:

  one GPU   rank 0 alone (the others wait): the plain model, no wrapper
  ddp       every rank: falqon.meld, falqon.distributed.broadcast_melded, DistributedDataParallel
  fsdp2     every rank: falqon.meld, then fully_shard on each decoder layer and on the model
            (the FP8 [W; A; 0] and B sharded by rows; the proxy update gathers and folds them)
  fsdp2_offload  (with --modes) the same with CPUOffloadPolicy: shards, gradients and the
            optimizer state in host memory, a layer's shards copied in for its all-gather

Each record: {"kind": "distributed", "mode": "single"|"ddp"|"fsdp2"|"fsdp2_offload", "gpus", "method",
"tokens_per_s" (all ranks' tokens per second), "scaling" (over the one-GPU run), "s_per_step",
"peak_gib" (the largest rank's torch.cuda.max_memory_allocated over the steps), "peak_ratio"
(over the one-GPU peak), "fuse" (the fused methods: falqon.fuse's backend and what it fused),
"ranks_identical" (falqon.distributed.ranks_identical after the steps:
DDP's ranks must hold bit-identical melded state; FSDP2's replicated state, its sharded tensors
left out: gathered from the same shards they agree by construction)}, to
benchmarks/results/distributed_<device>.json; the table is printed last.

NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set in
every process (NVLink multicast stays off).

    python benchmarks/distributed.py                   # 2 GPUs, LLaMA-7B, 16 x 512 per GPU
    python benchmarks/distributed.py --layers 8 --steps 3
    python benchmarks/distributed.py --model llama2-70b --methods falqon_fused --modes fsdp2
    python benchmarks/distributed.py --device cpu --model tiny --batch 2 --seq 16 --steps 2
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import statistics
import sys
import tempfile
import time
import traceback

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import common
    import model as M
else:
    from . import common
    from . import model as M

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
METHODS = ("falqon_adapter", "falqon")  # the default; falqon_fused (GPU only) with --methods
ALL_METHODS = (*METHODS, "falqon_fused", "falqon_adapter_train_a")
MODES = ("single", "ddp", "fsdp2", "fsdp2_offload")


# ---- one measurement, on every rank of the mode -------------------------------------------------

def _wrap(mode: str, model):
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from falqon.distributed import broadcast_melded

    if mode == "ddp":
        broadcast_melded(model, src=0)
        ids = [model.device.index] if model.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if mode.startswith("fsdp2"):
        assert dist.is_initialized()
        # fsdp2_offload: the sharded parameters (the FP8 W' too), B's gradients and the optimizer
        # state live in pinned host memory; each layer's shards are copied in for its all-gather.
        offload = {"offload_policy": CPUOffloadPolicy()} if mode == "fsdp2_offload" else {}
        for layer in model.model.layers:
            fully_shard(layer, **offload)
        fully_shard(model, **offload)
    return model


def build(method: str, args, info: dict | None = None):
    """The method's melded model on this rank, built as benchmarks/model.py builds it: whole, or
    layer by layer (seeded random weights, each layer melded as it is made) where the bf16 model
    would not fit (--build auto, e.g. llama2-70b) or --build layerwise."""
    info = {} if info is None else info  # filled: what falqon.fuse did ("fuse"), ...
    options = M.FALQON_OPTIONS[method]
    if M.model_build.build_layerwise(args):
        model = M.model_build.layerwise_model(method, options, args, info, M.projection_modules,
                                              M._peft_lora)
    else:
        model = M.build_model(args.model, args.layers, args.seq, args.device, args.dtype,
                              args.seed)
        model = M.setup_falqon(model, args, info, options)
    if method in M.FUSED:  # Liger's kernels (or torch.compile) around falqon's GEMMs
        model = M.model_fused.apply_fuse(method, model, info)
    return model


def measure(mode: str, method: str, args, rank: int) -> dict:
    """Build, meld, wrap and time `method` in `mode` on this rank: {"s_per_step", "peak_gib",
    "ranks_identical", "loss"}."""
    import falqon
    from falqon.distributed import ranks_identical

    info: dict = {}
    model = build(method, args, info)
    net = _wrap(mode, model)
    M.enable_checkpointing(model, args.checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if M.needs_attach(method):
        falqon.attach(optimizer, model)
    batch = M.random_batch(args.batch, args.seq, model.config.vocab_size, args.device,
                           args.seed + 1 + rank)
    common.free_memory()
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    for _ in range(args.warmup):
        M.train_step(net, optimizer, batch, args)
    step_s, loss = M.timed_steps(net, optimizer, batch, args, args.steps)
    if args.profile:  # every rank steps (the collectives), rank 0 prints
        profile_step(net, optimizer, batch, args, f"{mode} {method}", shown=rank == 0)
    out = {"s_per_step": statistics.median(step_s), "loss": float(loss),
           "fuse": info.get("fuse"),
           "peak_gib": (torch.cuda.max_memory_allocated(args.device) / 2**30
                        if args.device.type == "cuda" else None),
           # FSDP2: of the replicated state (the gathered shards agree by construction; at 70B
           # gathering and hashing them took minutes of run 60)
           "ranks_identical": None if mode == "single" else ranks_identical(
               model, sharded=not mode.startswith("fsdp2"))}
    del net, model, optimizer, batch
    common.free_memory()
    return out


def profile_step(net, optimizer, batch, args, title: str, shown: bool) -> None:
    """One more step under torch.profiler (after the timed ones); prints the ops that took the
    most host time and the most device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        M.train_step(net, optimizer, batch, args)
        M.sync(args.device)
    if not shown:
        return
    table = prof.key_averages()
    print(f"\n== profile of one step, rank 0: {title}", flush=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.profile), flush=True)
    if args.device.type == "cuda":
        print(table.table(sort_by="self_device_time_total", row_limit=args.profile), flush=True)


def _gather(result, group) -> list:
    import torch.distributed as dist

    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, result, group=group)
    return found


def rank_threads(world: int) -> int:
    """CPU threads for each of `world` ranks on this host: OMP_NUM_THREADS where set, else the
    cores this process may use divided among the ranks."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // world)


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    """Every mode and method on this rank; rank 0 writes the ranks' results to `out`."""
    import json

    import torch.distributed as dist

    os.environ.update(NO_MULTICAST, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.device.type == "cuda":
        torch.cuda.set_device(rank)
        args.device = torch.device("cuda", rank)
    # The host's cores shared out among the ranks (torchrun sets OMP_NUM_THREADS=1 for the
    # same reason). Left at every core each, fsdp2_offload's first run in a process took 4.5 s a
    # step instead of 0.23 s (8 layers, 2 x H200, 32 cores): the CPU AdamW of both ranks at once.
    torch.set_num_threads(rank_threads(world))
    backend = "cpu:gloo,cuda:nccl" if args.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    host = dist.new_group(backend="gloo")  # results and waiting, whatever the device
    results = []
    started = time.perf_counter()
    try:
        for mode in args.modes:
            for method in args.methods:
                mine = None
                if mode != "single" or rank == 0:
                    if rank == 0:  # a 70B build takes minutes: say what is under way
                        print(f"[{time.perf_counter() - started:.0f} s] {mode} {method} ...",
                              flush=True)
                    try:
                        mine = measure(mode, method, args, rank)
                    except Exception as exc:  # recorded, never dropped
                        traceback.print_exc()
                        mine = {"skipped": f"{type(exc).__name__}: {exc}".strip()[:500]}
                if rank == 0 and mine and "s_per_step" in mine:
                    print(f"[{time.perf_counter() - started:.0f} s] {mode} {method}: "
                          f"{mine['s_per_step']:.3f} s/step on rank 0", flush=True)
                ranks = _gather(mine, host)
                results.append({"mode": mode, "method": method,
                                "ranks": [r for r in ranks if r is not None]})
    finally:
        dist.destroy_process_group()
    if rank == 0:
        pathlib.Path(out).write_text(json.dumps(results))


# ---- records and the table ----------------------------------------------------------------------

def records_of(results: list[dict], args) -> list[dict]:
    base = {r["method"]: r["ranks"][0] for r in results if r["mode"] == "single"}
    records = []
    for r in results:
        gpus = 1 if r["mode"] == "single" else args.gpus
        rec = {"kind": "distributed", "mode": r["mode"], "gpus": gpus, "method": r["method"],
               "model": M.model_name(args.model, args.layers), "batch_per_gpu": args.batch,
               "seq": args.seq}
        skipped = [x["skipped"] for x in r["ranks"] if "skipped" in x]
        if skipped:
            records.append({**rec, "skipped": skipped[0]})
            continue
        s = max(x["s_per_step"] for x in r["ranks"])  # the step ends with the slowest rank
        peaks = [x["peak_gib"] for x in r["ranks"] if x["peak_gib"] is not None]
        one = base.get(r["method"], {})
        rec.update(s_per_step=s, tokens_per_s=gpus * args.batch * args.seq / s,
                   peak_gib=max(peaks) if peaks else None,
                   ranks_identical=None if gpus == 1 else all(x["ranks_identical"]
                                                               for x in r["ranks"]),
                   loss=[x["loss"] for x in r["ranks"]])
        if r["ranks"][0].get("fuse"):  # the fused methods: which backend ran (falqon.fuse's auto)
            rec["fuse"] = r["ranks"][0]["fuse"]
        if "s_per_step" in one:
            rec["scaling"] = rec["tokens_per_s"] / (args.batch * args.seq / one["s_per_step"])
            rec["peak_ratio"] = (rec["peak_gib"] / one["peak_gib"]
                                 if rec["peak_gib"] and one.get("peak_gib") else None)
        records.append(rec)
    return records


def format_table(records: list[dict]) -> str:
    rows = [[r["mode"], r["gpus"], r["method"], r.get("tokens_per_s"), r.get("scaling"),
             r.get("s_per_step"), r.get("peak_gib"), r.get("peak_ratio"),
             r.get("ranks_identical"), r.get("skipped", "")] for r in records]
    return common.format_table(["mode", "gpus", "method", "tokens/s", "scaling", "s/step",
                                "peak GiB/rank", "peak ratio", "ranks identical", "skipped"],
                               rows)


# ---- command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    M.add_model_args(p)
    p.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of the DDP and FSDP2 "
                   "runs (default 2)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--modes", default="ddp,fsdp2",
                   help="besides the one-GPU run, which is always measured (default ddp,fsdp2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps, median (default 5)")
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="rank 0 profiles one more step of each run and prints its ROWS busiest "
                   "ops by host and by device time (default 0: no profile)")
    args = p.parse_args(argv)
    M.check_model_args(p, args)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or any(m not in ALL_METHODS for m in args.methods):
        p.error(f"--methods: choose from {', '.join(ALL_METHODS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES[1:] for m in modes):
        p.error(f"--modes: choose from {', '.join(MODES[1:])}")
    args.modes = ["single", *modes]
    if args.gpus < 2:
        p.error("--gpus must be >= 2")
    if args.device.type == "cuda" and torch.cuda.device_count() < args.gpus:
        p.error(f"--gpus {args.gpus}: {torch.cuda.device_count()} CUDA GPU(s) visible")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> list[dict]:
    import json

    import torch.multiprocessing as mp

    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.update(NO_MULTICAST)  # the workers inherit them (and set them again)
    args = parse_args(argv)
    args.out = args.out or M.default_out("distributed", args)
    meta = M.results_meta(args.device, __file__, argv)
    print(f"{M.model_name(args.model, args.layers)} on {args.gpus} x {meta['device']}: "
          f"{args.batch} x {args.seq} tokens per GPU, rank {args.rank}, methods "
          f"{', '.join(args.methods)}, modes {', '.join(args.modes)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(worker, args=(args.gpus, _free_port(), args, out), nprocs=args.gpus, join=True)
        results = json.loads(pathlib.Path(out).read_text())
    records = records_of(results, args)
    config = {**M.model_config(args), "gpus": args.gpus, "warmup": args.warmup,
              "steps": args.steps}
    common.write_json(args.out, meta, records, config=config)
    print(format_table(records))
    print(f"wrote {args.out}")
    return records


if __name__ == "__main__":
    main()
