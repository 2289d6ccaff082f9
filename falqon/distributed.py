"""Data parallelism (torch.nn.parallel.DistributedDataParallel) for melded models.

What DDP needs from a melded model:
- Only B is trainable, so DDP registers gradient hooks for the B's alone and all-reduces their
  gradients: every rank then takes the same optimizer step.
- The FP8 tensors (each layer's `weight` [W; A; 0] and its optional transposed copy `weight_t`)
  are frozen. DDP would broadcast them from rank 0 at construction, and no backend's broadcast
  takes a float8 dtype (gloo: "Invalid scalar type"), so `meld` and `from_pretrained` list them in
  the model's `_ddp_params_and_buffers_to_ignore` (DDP's own opt-out): `mark_ddp_ignored`.
- Ranks must nevertheless start from the same FP8 bytes. meld is deterministic (seeded SVD sketch)
  for the same base weights on the same kind of device; `broadcast_melded` copies rank `src`'s
  melded state to every rank (FP8 tensors as bytes) where that is not certain, and
  `ranks_identical` checks it.
- The proxy update (FalqonConfig(update_mode="proxy")) runs after each optimizer step on every
  rank. B is then identical on every rank, so the top-k rows and the folded FP8 rows are too: the
  ranks stay bit-identical without communication. The adapter mode needs nothing.

FSDP2 (torch.distributed.fsdp.fully_shard) shards W' = [W; A; 0] and B by rows and all-gathers
them as bytes for the forward (FP8: half of bf16's traffic). The adapter mode needs nothing more;
the proxy update of a sharded layer gathers W' and B, folds the same rows on every rank and keeps
each rank's own rows (`sharded_proxy_update`); a trained A (FalqonConfig(train_a=True)) is
gathered (r x K) after each step and the rank whose shard holds A's rows rewrites them. Checkpoints of a sharded model go through
torch.distributed.checkpoint (model.state_dict() holds DTensors), which reshards on load.
Delayed scaling's amax histories are per rank under FSDP2 (DDP broadcasts rank 0's buffers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .convert import melded_layers
from .fingerprint import Fingerprint
from .modules import is_sharded

DDP_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"
_FP8_TENSORS = ("weight", "weight_t")


def fp8_tensor_names(model: nn.Module) -> list[str]:
    """Qualified names of the melded layers' FP8 parameters and buffers."""
    names = []
    for name, layer in melded_layers(model):
        for attr in _FP8_TENSORS:
            if getattr(layer, attr, None) is not None:
                names.append(f"{name}.{attr}" if name else attr)
    return names


def mark_ddp_ignored(model: nn.Module) -> None:
    """Add the melded layers' FP8 tensors to the names DDP neither broadcasts nor reduces
    (keeping any names already listed)."""
    ignored = set(getattr(model, DDP_IGNORE_ATTR, ()) or ())
    setattr(model, DDP_IGNORE_ATTR, sorted(ignored | set(fp8_tensor_names(model))))


def _melded_state(model: nn.Module, sharded: bool = True) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of the melded layers' state, in a fixed order (FP8 ones as
    uint8 views); FSDP2-sharded ones gathered whole (a collective then), or left out with
    sharded=False."""
    out = []
    for name, layer in melded_layers(model):
        for attr in ("weight", "weight_t", "weight_scale", "lora_B", "lora_A", "amax_history"):
            t = getattr(layer, attr, None)
            if t is None or (not sharded and is_sharded(t)):
                continue
            t = _gather_rows(t) if is_sharded(t) else t.detach()
            out.append((f"{name}.{attr}", t.view(torch.uint8) if t.element_size() == 1 else t))
    return out


@torch.no_grad()
def broadcast_melded(model: nn.Module, src: int = 0, group=None) -> None:
    """Copy rank `src`'s melded state (FP8 weights, scales, B, amax histories) to every rank of
    `group`, in place. Call it after meld/from_pretrained on every rank, before training (and
    before fully_shard: a sharded model's ranks hold different rows by design)."""
    _require_initialized("broadcast_melded")
    if any(is_sharded(layer.weight) for _, layer in melded_layers(model)):
        raise ValueError("falqon.distributed.broadcast_melded: the model is already sharded "
                         "(FSDP2); broadcast before fully_shard")
    for _, t in _melded_state(model):
        if t.is_contiguous():
            dist.broadcast(t, src, group=group)
        else:
            buf = t.contiguous()
            dist.broadcast(buf, src, group=group)
            t.copy_(buf)


def state_digest(model: nn.Module, sharded: bool = True) -> bytes:
    """SHA-256 of the melded layers' state bytes (a fingerprint to compare ranks with; of the
    whole tensors, gathered, for an FSDP2-sharded model, so every rank must call it then).
    sharded=False leaves FSDP2's sharded tensors out: what every rank gathers from the same shards
    is the same by construction, and at 70B gathering and hashing them takes minutes; what can
    still differ between ranks (scales, histories, transposed copies: replicated state) stays."""
    fingerprint = Fingerprint()
    for name, t in _melded_state(model, sharded):
        fingerprint.update(name, t)
    return fingerprint.digest()


def ranks_identical(model: nn.Module, group=None, sharded: bool = True) -> bool:
    """Whether every rank of `group` holds bit-identical melded state (collective: every rank
    must call it); sharded=False: of the replicated state only (state_digest)."""
    _require_initialized("ranks_identical")
    digests = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, state_digest(model, sharded), group=group)
    return all(d == digests[0] for d in digests)


# ---- FSDP2 (torch.distributed.fsdp.fully_shard) ----------------------------------------------

@torch.no_grad()
def sharded_proxy_update(layer, k: int) -> None:
    """The proxy update of an FSDP2-sharded layer (fully_shard: row shards on a 1-D mesh): W' and
    B are all-gathered (as bytes: no backend gathers float8; the same traffic as a forward's
    all-gather), every rank folds the same top-k rows into its full copy (B is identical on
    every rank after the reduced optimizer step, so the rows are too) and keeps its own rows."""
    weight, lora_B = _gather_rows(layer.weight), _gather_rows(layer.lora_B)
    ops.topk_update_(weight, lora_B, layer.weight_t, k, layer.scaling, layer.keep_residual)
    for param, full in ((layer.weight, weight), (layer.lora_B, lora_B)):
        _scatter_rows(param, full)


def _row_shard_group(t: torch.Tensor):
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    if mesh.ndim != 1 or len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise NotImplementedError(f"MeldedLinear.proxy_update: a DTensor sharded as "
                                  f"{t.placements} on a {mesh.ndim}-D mesh; only fully_shard's "
                                  f"row shards on a 1-D mesh (Shard(0)) are supported")
    return mesh.get_group(), mesh.size(), mesh.get_local_rank()


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a row-sharded DTensor (torch.chunk's shards), gathered as bytes; a
    plain tensor as it is."""
    if not is_sharded(t):
        return t.detach().clone()
    group, world, _ = _row_shard_group(t)
    rows = t.shape[0]
    per = -(-rows // world)  # torch.chunk's shard size; the last shards may be short or empty
    local = t.to_local().detach()
    padded = local.new_zeros((per, *t.shape[1:]))
    padded[:local.shape[0]] = local
    as_bytes = padded.view(torch.uint8) if padded.element_size() == 1 else padded
    parts = [torch.empty_like(as_bytes) for _ in range(world)]
    dist.all_gather(parts, as_bytes.contiguous(), group=group)
    full = torch.cat(parts)[:rows]
    return full.view(t.dtype) if padded.element_size() == 1 else full


def _scatter_rows(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write this rank's rows of `full` into the (possibly row-sharded) parameter."""
    if not is_sharded(param):
        param.copy_(full)
        return
    _, world, rank = _row_shard_group(param)
    chunks = torch.chunk(full, world, dim=0)
    local = param.to_local()
    if rank >= len(chunks) or not local.numel():
        return
    if local.element_size() == 1:  # float8: copied as bytes
        local.view(torch.uint8).copy_(chunks[rank].view(torch.uint8))
    else:
        local.copy_(chunks[rank])


def _local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of a row-sharded DTensor, the index of its first row): torch.chunk's
    shards, as _gather_rows assumes."""
    _, world, rank = _row_shard_group(t)
    per = -(-t.shape[0] // world)
    return t.to_local(), min(rank * per, t.shape[0])


def _require_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"falqon.distributed.{what} needs an initialised process group "
                           f"(torch.distributed.init_process_group)")


__all__ = ["DDP_IGNORE_ATTR", "broadcast_melded", "fp8_tensor_names", "mark_ddp_ignored",
           "ranks_identical", "sharded_proxy_update", "state_digest"]
