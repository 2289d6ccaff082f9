"""Pieces shared by the benchmarks (see /BENCHMARKS.md of the project's shared notes): timing,
what a results file records about the run, JSON results, text tables, and the peers.

Timing follows the protocol: medians of CUDA-event timings after warm-up, on random data. Each
timed call is preceded by an L2 flush and a short GPU sleep (torch.cuda._sleep), so that the
events measure the GPU's work on cold caches, not the Python overhead of launching it: the host
queues the call while the GPU sleeps.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import re
import shlex
import statistics
import sys
import time
from typing import Callable

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# ~0.5-1 ms on Hopper clocks: longer than the host needs to queue one layer's fwd+bwd.
SLEEP_CYCLES = 1_500_000
L2_FLUSH_BYTES = 256 << 20  # several times any current GPU's L2


class Skip(Exception):
    """A method that cannot run here; the message says why and goes into the results."""


def env_flag(name: str, default: bool) -> bool:
    """A switch the extension reads too (csrc/cuda/ops_cuda.cu env_flag): 1/true/yes/on or
    0/false/no/off, `default` when unset or empty."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0, got {raw!r}")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def device_tag(device: str, name: str | None = None) -> str:
    """A short file-name tag for a device: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" ->
    "h200", "NVIDIA A100-SXM4-80GB" -> "a100", "NVIDIA GeForce RTX 4090" -> "rtx4090"; "cpu"."""
    if device != "cuda":
        return "cpu"
    name = (name or device_name(device)).lower()
    words = [w for w in re.split(r"[\s_]+", name) if w not in ("nvidia", "geforce", "tesla")]
    tag = ""
    for w in words:
        tag += w.split("-")[0]
        if re.search(r"\d", w):
            break
    return re.sub(r"[^a-z0-9]+", "", tag) or "gpu"


def run_metadata(device: str, script: str | None = None, argv: list[str] | None = None) -> dict:
    """What every results file records: device, versions, date and the command. The command is
    `script` (the benchmark's file) with `argv`, so that a main(argv) called in-process (a test)
    records its own command rather than pytest's; by default, this process's command line."""
    script = os.path.abspath(sys.argv[0] if script is None else script)
    argv = sys.argv[1:] if argv is None else list(argv)
    repo = RESULTS_DIR.parents[1]
    shown = os.path.relpath(script, repo if script.startswith(str(repo) + os.sep) else None)
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join([shown] + argv),
    }


def probe_args(doc: str, argv, reps: int, warmup: int = 5,
               extra: list[tuple[str, dict]] = ()) -> argparse.Namespace:
    """The command line the probes (benchmarks/route_probe, benchmarks/cutlass_probe) share:
    --M, --reps, --warmup and --out, and a probe's own options (flag, add_argument's keywords)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--M", type=int, default=8192)
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--out", type=pathlib.Path)
    for flag, kwargs in extra:
        p.add_argument(flag, **kwargs)
    return p.parse_args(argv)


def finish_probe(stem: str, script: str, argv, out, headers: list[str], rows: list[list[object]],
                 records: list[dict]) -> None:
    """A probe's end: prints its table and writes its records with the run's metadata to `out`,
    by default results/<stem>_<gpu>.json."""
    print(format_table(headers, rows))
    out = out or RESULTS_DIR / f"{stem}_{device_tag('cuda')}.json"
    write_json(out, run_metadata("cuda", script, sys.argv[1:] if argv is None else argv), records)
    print(f"wrote {os.path.relpath(out)}")


def write_json(path: str | os.PathLike, meta: dict, records: list[dict], **extra) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**meta, **extra, "records": records}, indent=1) + "\n")
    tmp.replace(path)


class Timer:
    """Times a callable on one device: a list of per-call milliseconds after `warmup` calls."""

    def __init__(self, device: str, warmup: int = 5, reps: int = 40, flush_l2: bool = True):
        self.device, self.warmup, self.reps = device, warmup, reps
        self._flush = (torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
                       if device == "cuda" and flush_l2 else None)

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        if self.device != "cuda":
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return times
        torch.cuda.synchronize()
        start = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for i in range(self.reps):
            if self._flush is not None:
                self._flush.zero_()
            torch.cuda._sleep(SLEEP_CYCLES)
            start[i].record()
            fn()
            end[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(start, end)]

    def median(self, fn: Callable[[], object]) -> float:
        return statistics.median(self(fn))


def batched_gpu_us(run: Callable[[int], object], rounds: int, warmup: int,
                   batch: int = 20) -> float:
    """The probes' GPU time of one call: `run(n)` queues n calls back to back; after `run(warmup)`,
    the median over `rounds` of the us a call of `run(batch)` between two CUDA events. The GPU's
    time, not the host's, as long as the host queues a call faster than the GPU runs it (no L2
    flush: the calls follow each other as a step's would)."""
    run(warmup)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(batch)
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / batch)
    return statistics.median(times)


def free_memory() -> None:
    """Frees what the last method held, including the memory pools of the CUDA graphs that
    torch.compile's CUDA-graph modes recorded: they outlive the model (run 74: 6.5 GiB still
    allocated when the next method began, in its peak)."""
    gc.collect()
    if torch.cuda.is_available():
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
        gc.collect()
        torch.cuda.empty_cache()


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (readable as plain text too), numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(values, numeric):
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w)
                                 for v, w, n in zip(values, widths, numeric)) + " |"

    numeric = [all(_is_number(r[i]) for r in rows) if rows else False for i in range(len(headers))]
    out = [line(headers, numeric), "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2))
                                                  for w, n in zip(widths, numeric)) + "|"]
    out += [line(r, numeric) for r in cells]
    return "\n".join(out)


def _is_number(v) -> bool:
    return v is None or isinstance(v, (int, float))


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


# ---- peers ------------------------------------------------------------------------------------

def import_bitsandbytes():
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # an ImportError, or a broken binary that raises something else
        raise Skip(f"bitsandbytes is not importable: {type(exc).__name__}: {exc}") from None
    return bnb


def import_torchao_float8():
    try:
        import torchao  # noqa: F401
        from torchao.float8 import convert_to_float8_training
    except Exception as exc:
        raise Skip(f"torchao.float8 is not importable: {type(exc).__name__}: {exc}") from None
    return convert_to_float8_training


def versions_of(*names: str) -> dict:
    """Installed versions of the given distributions (None where absent), for the results file."""
    import importlib.metadata as md

    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out
