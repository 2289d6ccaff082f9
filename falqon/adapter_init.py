"""The adapter mode's choice of A (FalqonConfig.adapter_init): where the frozen rows stacked under
W come from.

  "error_svd"   the paper's: A = sqrt(S_r) V_r^T of W's FP8 quantisation error (the meld_init op).
  "random"      a Gaussian A from a CPU generator seeded with `seed` (LoRA-FA's choice; falqon.meld
                mixes FalqonConfig.seed with the layer's name, layer_seed, so layers differ).
  "weight_svd"  V_r^T: W's top-r right singular vectors, orthonormal rows (PiSSA's subspace; W is
                kept whole, nothing is subtracted from it), by an exact SVD in float64 (as the
                op's "exact": the same on every device) or the op's randomized range finder.

Every choice then gets meld_init's own rescale (scale_adapter: one factor to a LoRA A's
root-mean-square row norm, capped so that amax(A) <= amax(W)) and is quantised at W's
per-tensor scale with the op's rounding (the quantize_delayed op at amax(W)), into rows
[N, N + r) of the W' that meld_init makes; W's rows and the scale are meld_init's, bit for bit.
A checkpoint stores A's FP8 rows (falqon.checkpoint), so a non-default A needs no re-derivation
at load.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from . import ops
from .validation import ADAPTER_INITS


def layer_seed(seed: int, name: str) -> int:
    """The seed of a layer's random A: `seed` mixed with the layer's qualified name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % 2 ** 64)


def random_factor(in_features: int, rank: int, seed: int, device) -> Tensor:
    """(rank, in_features) float32 standard normal values, drawn on the CPU (the same on every
    device) from `seed`."""
    return torch.randn(rank, in_features, generator=_cpu_generator(seed)).to(device)


def _sign_fixed(vh: Tensor) -> Tensor:
    """Each row with its largest-magnitude entry made positive (a deterministic sign)."""
    pivot = vh.gather(1, vh.abs().argmax(1, keepdim=True))
    return torch.where(pivot < 0, -vh, vh)


def weight_factor(weight: Tensor, rank: int, svd: str, oversample: int, power_iters: int,
                  seed: int) -> Tensor:
    """(rank, in_features) float32: the top-r right singular vectors of W, orthonormal rows.
    "exact": torch.linalg.svd in float64; "randomized": the meld_init op's range finder
    (Halko et al. alg. 4.4, a CPU-drawn sketch from `seed`, re-orthonormalised power passes)."""
    w = weight.detach().float()
    if svd == "exact":
        vh = torch.linalg.svd(w.double(), full_matrices=False)[2][:rank].float()
        return _sign_fixed(vh)
    width = min(rank + oversample, *w.shape)
    omega = torch.randn(w.shape[1], width, generator=_cpu_generator(seed)).to(w.device)
    q = torch.linalg.qr(w @ omega)[0]
    for _ in range(power_iters):
        z = torch.linalg.qr(w.t() @ q)[0]
        q = torch.linalg.qr(w @ z)[0]
    vh = torch.linalg.svd(q.t() @ w, full_matrices=False)[2][:rank]
    return _sign_fixed(vh)


def scale_adapter(a: Tensor, weight_amax: Tensor, row_norm: float) -> Tensor:
    """The meld_init op's rescale (csrc/reference.cpp scale_adapter): one factor so that A's
    root-mean-square row norm is `row_norm`, capped so that amax(A) <= amax(W), then clamped to
    +-amax(W) (the product can round one ulp above it)."""
    a = a.float()
    cap = weight_amax.float().reshape(())
    rms = a.square().sum(1).mean().sqrt()
    factor = torch.minimum(torch.full_like(rms, row_norm) / rms, cap / a.abs().amax())
    factor = torch.where(torch.isfinite(factor), factor, torch.ones_like(factor))
    return torch.minimum(torch.maximum(a * factor, -cap), cap)


def adapter_factor(weight: Tensor, rank: int, adapter_init: str, svd: str, oversample: int,
                   power_iters: int, seed: int) -> Tensor:
    """A before its rescale, for adapter_init "random" or "weight_svd"."""
    if adapter_init == "random":
        return random_factor(weight.shape[1], rank, seed, weight.device)
    if adapter_init == "weight_svd":
        return weight_factor(weight, rank, svd, oversample, power_iters, seed)
    raise ValueError(f"falqon.adapter_factor: adapter_init must be 'random' or 'weight_svd', "
                     f"got {adapter_init!r}")


def meld_weight(weight: Tensor, rank: int, adapter_init: str = "error_svd",
                svd: str = "randomized", oversample: int = 16, power_iters: int = 4,
                seed: int = 0, adapter_row_norm: float = 0.0) -> tuple[Tensor, Tensor]:
    """(W'_q, s) as the meld_init op gives them, with A from `adapter_init`. "error_svd" is the op
    itself. Otherwise the op quantises W (a cheap sketch for its own A, whose rows are then
    replaced: W's rows and the scale amax(W) / 448 do not depend on A, which is capped at
    amax(W)) and the chosen A, rescaled, is quantised at that scale into rows [N, N + r)."""
    if adapter_init not in ADAPTER_INITS:
        raise ValueError(f"falqon.meld_weight: adapter_init must be one of {ADAPTER_INITS}, got "
                         f"{adapter_init!r}")
    if adapter_init == "error_svd":
        return ops.meld_init(weight, rank, svd, oversample, power_iters, seed, adapter_row_norm)
    if not adapter_row_norm > 0:
        raise ValueError(f"falqon.meld_weight: adapter_init={adapter_init!r} is the adapter "
                         f"mode's and needs adapter_row_norm > 0")
    melded, scale = ops.meld_init(weight, rank, "randomized", 0, 0, seed, adapter_row_norm)
    amax = weight.detach().float().abs().amax().reshape(1)
    a = scale_adapter(adapter_factor(weight, rank, adapter_init, svd, oversample, power_iters,
                                     seed), amax, adapter_row_norm)
    n = weight.shape[0]
    a_q, _, _ = ops.quantize_delayed(a, ops.E4M3, amax)  # at amax(W) / 448: W's scale
    melded[n:n + rank].view(torch.uint8).copy_(a_q.view(torch.uint8))  # FP8 rows as bytes
    return melded, scale


__all__ = ["adapter_factor", "layer_seed", "meld_weight", "random_factor", "scale_adapter",
           "weight_factor"]
