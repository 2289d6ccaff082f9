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
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from .convert import melded_layers

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


def _melded_state(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor of the melded layers' state, in a fixed order (FP8 ones as uint8 views)."""
    out = []
    for _, layer in melded_layers(model):
        for attr in ("weight", "weight_t", "weight_scale", "lora_B", "amax_history"):
            t = getattr(layer, attr, None)
            if t is None:
                continue
            t = t.detach()
            out.append(t.view(torch.uint8) if t.element_size() == 1 else t)
    return out


@torch.no_grad()
def broadcast_melded(model: nn.Module, src: int = 0, group=None) -> None:
    """Copy rank `src`'s melded state (FP8 weights, scales, B, amax histories) to every rank of
    `group`, in place. Call it after meld/from_pretrained on every rank, before training."""
    _require_initialized("broadcast_melded")
    for t in _melded_state(model):
        if t.is_contiguous():
            dist.broadcast(t, src, group=group)
        else:
            buf = t.contiguous()
            dist.broadcast(buf, src, group=group)
            t.copy_(buf)


def state_digest(model: nn.Module) -> bytes:
    """SHA-256 of the melded layers' state bytes (a fingerprint to compare ranks with)."""
    h = hashlib.sha256()
    for t in _melded_state(model):
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.digest()


def ranks_identical(model: nn.Module, group=None) -> bool:
    """Whether every rank of `group` holds bit-identical melded state (collective: every rank
    must call it)."""
    _require_initialized("ranks_identical")
    digests = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, state_digest(model), group=group)
    return all(d == digests[0] for d in digests)


def _require_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"falqon.distributed.{what} needs an initialised process group "
                           f"(torch.distributed.init_process_group)")


__all__ = ["DDP_IGNORE_ATTR", "broadcast_melded", "fp8_tensor_names", "mark_ddp_ignored",
           "ranks_identical", "state_digest"]
