"""A `falqon finetune` run directory: its files, its run.json, its lock, and the fingerprint that
ties it to its base model's weights.

    run.json          the options that define the run (`options`), the others it was started
                      with (`settings`, restored on --resume), the base model (a path relative to
                      the run when it lies inside it) and the base weights' fingerprint
    metrics.jsonl     loss per step, eval loss every --eval-every steps
    loss.png          the loss plot
    checkpoints/      step-N/: the Hugging Face Trainer's checkpoint (falqon's model files, the
                      optimizer, scheduler, RNG and Trainer states) and falqon_run_checkpoint.json
                      (the step, the run's options, every file's byte size), each written to
                      .partial/checkpoint-N and renamed into place
    final/            the melded model and the tokenizer, written to final.partial and renamed
    base-model/       the random weights of a model built from a config
    .falqon.lock      locked (flock) while a run writes here: a second run is refused

Nothing is written before the options, the data and the model are checked and the model is
melded. A start that stops before run.json exists leaves only what `START_LEFTOVERS` names, and
the next start clears it; a start that stops later leaves a run that --resume (or the same
command again) continues.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import time

import torch

from ..checkpoint import replace_dir  # noqa: F401  (R.replace_dir: the CLI's directory swaps)
from ..config import FalqonError

RUN_FILE = "run.json"
RUN_FORMAT = "falqon-run"
RUN_VERSION = 2  # 2: relative base path, the base weights' fingerprint, settings
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
BASE_DIR = "base-model"
FINAL_DIR = "final"
LOCK_FILE = ".falqon.lock"
PARTIAL = ".partial"
PARTIAL_CHECKPOINTS = ".partial"  # checkpoints/.partial/checkpoint-N: a checkpoint being written
CHECKPOINT_FILE = "falqon_run_checkpoint.json"  # written last into a checkpoint
# What a start that stopped before writing run.json can have left.
START_LEFTOVERS = {LOCK_FILE, BASE_DIR, BASE_DIR + PARTIAL, RUN_FILE + ".tmp"}


# ---- run.json -----------------------------------------------------------------------------------

def check_output_dir(out: pathlib.Path, resume: str | None) -> dict | None:
    """The directory's run.json (None where it holds none yet); errors where it cannot be used."""
    from ..checkpoint import read_json

    if out.exists() and not out.is_dir():
        raise FalqonError(f"output path {out} exists and is not a directory")
    run_file = out / RUN_FILE
    if resume or run_file.exists():
        run = read_json(run_file, "falqon run (nothing to resume)")
        if run.get("format") != RUN_FORMAT or not isinstance(run.get("options"), dict):
            raise FalqonError(f"{run_file} is not a falqon run file")
        return run
    if out.exists() and any(p.name not in START_LEFTOVERS for p in out.iterdir()):
        raise FalqonError(f"output directory {out} is not empty and holds no falqon run: choose "
                          f"another --output-dir")
    return None


def write_run(out: pathlib.Path, run: dict) -> None:
    tmp = out / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(run, indent=2))
    os.replace(tmp, out / RUN_FILE)


def clear_start_leftovers(out: pathlib.Path) -> None:
    """What a start that stopped before run.json was written left (never a run's files)."""
    for name in START_LEFTOVERS - {LOCK_FILE}:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def base_entry(path: pathlib.Path, out: pathlib.Path) -> str:
    """How run.json names the base model: relative to the run when inside it (a moved or copied
    run uses its own), else absolute."""
    path, root = path.resolve(), out.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def base_path(run: dict, out: pathlib.Path) -> pathlib.Path:
    """The run's base model directory. Runs from before RUN_VERSION 2 stored absolute paths;
    theirs into their own base-model/ is taken as the copy inside this run."""
    path = pathlib.Path(run["base_model"])
    if not path.is_absolute():
        return out / path
    if "version" not in run and path.name == BASE_DIR and (out / BASE_DIR).is_dir():
        return out / BASE_DIR
    return path


def check_fingerprint(run: dict, fingerprint: str, where) -> None:
    """Refuse a base model whose weights are not the run's (runs from before RUN_VERSION 2
    recorded none)."""
    want = run.get("base_fingerprint")
    if want and fingerprint != want:
        raise FalqonError(f"the base model {where} is not the one this run started from (its "
                          f"weights differ): resume with the run's own base model")


# ---- checkpoints, metrics, final ----------------------------------------------------------------

def list_checkpoints(out: pathlib.Path) -> list[pathlib.Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def read_metrics(out: pathlib.Path, upto: int) -> list[dict]:
    """The logged rows of steps <= upto (step 0's eval only when upto >= 0)."""
    path = out / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
        if isinstance(row, dict) and row.get("step", 0) <= upto:
            rows.append(row)
    return rows


def final_is_complete(out: pathlib.Path) -> bool:
    """Whether final/ holds a whole model (written by rename; an older run's final/ is checked
    file by file)."""
    from ..checkpoint import read_checkpoint_meta

    if not (out / FINAL_DIR).is_dir():
        return False
    try:
        read_checkpoint_meta(out / FINAL_DIR)
    except FalqonError:
        return False
    return True




def fresh_partial(path: pathlib.Path) -> pathlib.Path:
    tmp = path.with_name(path.name + PARTIAL)
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


# ---- the lock -----------------------------------------------------------------------------------

def _holder(path: pathlib.Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is still running"


class RunLock:
    """An exclusive flock on DIR/.falqon.lock for the life of a run (the kernel releases it when
    the process dies, however it dies)."""

    def __init__(self, out: pathlib.Path):
        self.path = out / LOCK_FILE
        self.file = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise FalqonError(f"output directory {self.path.parent} is in use by another falqon "
                              f"run ({_holder(self.path)}): wait for it to end, or choose "
                              f"another --output-dir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        # The file stays (unlinking it would let a process that opened it before the unlink
        # lock an orphan while a third locks a new file); an unlocked file means nothing.
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_unlocked(out: pathlib.Path) -> None:
    """Fail early, writing nothing, where another run holds the directory."""
    try:
        import fcntl

        f = open(out / LOCK_FILE)
    except (ImportError, OSError):
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FalqonError(f"output directory {out} is in use by another falqon run "
                              f"({_holder(out / LOCK_FILE)}): wait for it to end, or choose "
                              f"another --output-dir") from None
