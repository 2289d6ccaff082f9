"""`falqon finetune` in several processes (torchrun, accelerate launch: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment; WORLD_SIZE 1 or unset is the plain
one-process run, untouched).

Every rank checks the options, reads the data, builds and melds the model (meld is deterministic;
falqon.distributed.broadcast_melded then copies rank 0's melded state to be sure) and trains it
under DistributedDataParallel. Rank 0 alone writes: the lock, run.json, metrics, the plot,
checkpoints, final/ and the export; the others wait for it. An error is agreed on: every rank
raises it (exit status 2 everywhere) and rank 0 alone prints it.

A step's micro-batches (--grad-accum of them, --batch-size examples each) are divided among the
ranks, each running grad_accum / world of them: the optimizer step is the same whatever the
number of processes, so a run is the same run on any number of them and resumes on another.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch

from ..config import FalqonError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_size() -> int:
    """WORLD_SIZE as torchrun or accelerate launch set it (1 without a launcher)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def is_leader() -> bool:
    """Whether this process is rank 0 (or the only process): the one that prints and writes."""
    return launched_size() == 1 or os.environ.get("RANK", "0") == "0"


# How long stop() waits for the other ranks before tearing down regardless.
STOP_TIMEOUT = datetime.timedelta(seconds=60)


class World:
    """This process's place among the run's processes (size 1: the plain run)."""

    def __init__(self, size: int = 1, rank: int = 0, local_rank: int = 0):
        self.size, self.rank, self.local_rank = size, rank, local_rank
        self.group = None  # a gloo group for the host-side agreements

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def start(self, device_name: str) -> "World":
        """Initialise the process group: NCCL for CUDA tensors (and cuda:LOCAL_RANK as this
        process's device) unless --device cpu, gloo for the host."""
        import torch.distributed as dist

        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(self.local_rank)
        timeout = datetime.timedelta(hours=1)  # rank 0 may export a large model meanwhile
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
        self.group = dist.new_group(backend="gloo", timeout=timeout)
        return self

    def device(self, device: torch.device) -> torch.device:
        """A CUDA device becomes this process's GPU, cuda:LOCAL_RANK."""
        if self.size > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def agree(self, fn, *args):
        """fn(*args) on every rank; where it fails on any rank, the error is raised on every
        rank (its own where it failed, else the first failing rank's message)."""
        return self._settle(*_attempt(fn, *args), gathered=True)

    def on_leader(self, fn, *args):
        """fn(*args) on rank 0 alone, the others waiting; its result (or its error) on every
        rank."""
        result, error = _attempt(fn, *args) if self.leader else (None, None)
        return self._settle(result, error, gathered=False)

    def _settle(self, result, error, gathered: bool):
        if self.size == 1:
            if error is not None:
                raise error
            return result
        import torch.distributed as dist

        mine = None if error is None else (type(error), _message(error))
        if gathered:
            found = [None] * self.size
            dist.all_gather_object(found, (mine, None), group=self.group)
            failed = [f[0] for f in found if f[0] is not None]
        else:
            box = [(mine, result)]
            dist.broadcast_object_list(box, src=0, group=self.group)
            failed = [box[0][0]] if box[0][0] is not None else []
            result = box[0][1]
        if error is not None:
            raise error
        if failed:
            kind, message = failed[0]
            raise (kind(message) if kind is FalqonError else FalqonError(message))
        return result

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model under DDP, rank 0's melded state on every rank first (the FP8 tensors are
        in the DDP ignore list: no backend broadcasts float8)."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        from ..distributed import broadcast_melded, mark_ddp_ignored

        mark_ddp_ignored(model)
        broadcast_melded(model, src=0)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def stop(self) -> None:
        """Every rank waits for the others, then the process groups are destroyed.

        The wait is not only politeness: a gloo worker thread drops its last reference to a
        finished collective (and so to the tensors Python handed it) just after the collective
        returns. Where that happened while the interpreter was already finalizing, the thread
        could not take the GIL and the process aborted at exit ("terminate called without an
        active exception"; a core dump showed ProcessGroupGloo::runLoop -> ~AsyncBroadcastWork ->
        decref_pyobject -> take_gil, after the final on_leader broadcast). The barrier waits with
        the GIL released, so such a thread finishes first; a gloo monitored barrier, so that a
        rank that is gone ends the wait after STOP_TIMEOUT instead of the group's hour."""
        import torch.distributed as dist

        if self.size == 1 or not dist.is_initialized():
            return
        try:
            dist.monitored_barrier(group=self.group, timeout=STOP_TIMEOUT)
        except RuntimeError:  # a rank that failed or left: tear down all the same
            pass
        dist.destroy_process_group()
        self.group = None

    @contextlib.contextmanager
    def quiet(self):
        """Standard output silenced on every rank but 0 (progress bars are disabled apart)."""
        if self.leader:
            yield
            return
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            yield


def _attempt(fn, *args):
    try:
        return fn(*args), None
    except (FalqonError, OSError) as exc:
        return None, exc


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, FalqonError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    return str(exc)


def world_from_env() -> World:
    size = launched_size()
    if size == 1:
        return World()
    try:
        return World(size, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError):
        print("falqon: error: WORLD_SIZE is set but RANK is not: start several processes with "
              "torchrun or accelerate launch", file=sys.stderr)
        raise SystemExit(2) from None


def check_grad_accum(args, world: World, explicit: set[str], new_run: bool) -> None:
    """A new run's --grad-accum defaults to the number of processes (one micro-batch each); it
    must be a multiple of it."""
    if world.size == 1:
        return
    if new_run and "grad_accum" not in explicit:
        args.grad_accum = world.size
    if args.grad_accum % world.size:
        raise FalqonError(f"--grad-accum {args.grad_accum} is not a multiple of the {world.size} "
                          f"processes: each runs grad_accum / {world.size} of a step's "
                          f"micro-batches; pass a multiple of {world.size}")


__all__ = ["World", "check_grad_accum", "is_leader", "launched_size", "world_from_env"]
