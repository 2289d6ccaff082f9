"""The adapter mode with A trained too (FalqonConfig(train_a=True)): LoRA over the FP8 base.

A melded layer computes x A^T in its FP8 GEMM from A's rows of W' = [W; A; 0], which share W's
per-tensor scale. With train_a the layer also holds `lora_A`, a float32 parameter, the master
copy the optimizer updates; the A it applies is lora_A / TRAINED_A_DIVISOR (config.py says why).
Two things keep the two in step:

- the gradient: melded_linear's backward gives dx (through A's FP8 rows) and dB; dA is added by
  TrainedAGrad, an identity on y whose backward returns scaling / TRAINED_A_DIVISOR * (g B)^T x
  for lora_A: two small GEMMs (M x N x r and r x M x K), in the activations' dtype with fp32
  accumulation where the device has it, as PEFT's bf16 LoRA computes its dA;
- the forward: after each optimizer step (falqon.attach / FalqonCallback run sync_rows; without
  them an eager forward does when lora_A changed) A's FP8 rows are rewritten from lora_A at the
  weight's scale, under FSDP2 on the rank whose shard holds them. Values beyond E4M3's range there
  saturate, and the layer keeps the largest ratio seen (`a_range`, on the device: no host
  synchronisation); up to 1.0 nothing saturated. The study's probe (without the divisor)
  reached 1.04-1.07 at its chosen learning rates (benchmarks/NOTES.md run 59).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .config import TRAINED_A_DIVISOR

E4M3_MAX = float(torch.finfo(ops.E4M3).max)


class TrainedAGrad(torch.autograd.Function):
    """y unchanged; in the backward, lora_A's gradient coef * (g B)^T x."""

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, coef: float):
        ctx.save_for_backward(x, lora_B)
        ctx.coef = coef
        ctx.a_dtype = lora_A.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_B = ctx.saved_tensors
        grad_A = None
        if ctx.needs_input_grad[2] and grad_y is not None:
            g = grad_y.reshape(-1, grad_y.shape[-1])
            x2 = x.reshape(-1, x.shape[-1]).to(g.dtype)
            u = torch.mm(g, lora_B.to(g.dtype))  # (M, r): g B
            grad_A = torch.mm(u.t(), x2).to(ctx.a_dtype).mul_(ctx.coef)  # (r, K)
        return grad_y, None, grad_A, None, None


def image_scale(weight_scale: Tensor) -> float:
    """What lora_A is multiplied by for its FP8 image: 1 / (TRAINED_A_DIVISOR * weight scale), a
    Python float (one host read of the scale; layers cache it, see _layer_image_scale)."""
    return _inverse(float(weight_scale))


def _inverse(weight_scale: float) -> float:
    return 1.0 / (TRAINED_A_DIVISOR * weight_scale)


def a_image_rows(lora_A: Tensor, weight_scale: Tensor,
                 inv: float | None = None) -> tuple[Tensor, Tensor]:
    """A's rows of W' for lora_A: lora_A / TRAINED_A_DIVISOR at the weight's scale (lora_A times
    `inv`, image_scale(weight_scale) unless given), in E4M3 (saturating), and the largest
    |value| / E4M3's max (above 1: that much saturated)."""
    inv = image_scale(weight_scale) if inv is None else inv
    scaled = lora_A.detach().to(torch.float32) * inv
    ratio = torch.linalg.vector_norm(scaled, float("inf")) / E4M3_MAX
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(ops.E4M3), ratio


def _scale_key(layer) -> tuple:
    """What identifies the layer's weight_scale as it is: a load writes it (or replaces it)."""
    return layer.weight_scale._version, layer.weight_scale.data_ptr()


def _layer_image_scale(layer) -> float:
    """image_scale of the layer's weight_scale, cached until the scale is written (a load)."""
    _cache_image_scales([layer])
    return layer._a_image_scale[1]


def _cache_image_scales(layers) -> None:
    """The layers' cached image_scale, refreshed for every layer whose scale changed, with one
    host read a device (a meld or a load, not every step) instead of one a layer."""
    stale: dict = {}
    for layer in layers:
        cached = getattr(layer, "_a_image_scale", None)
        if cached is None or cached[0] != _scale_key(layer):
            stale.setdefault(layer.weight_scale.device, []).append(layer)
    for group in stale.values():
        values = torch.stack([layer.weight_scale.float() for layer in group]).tolist()
        for layer, value in zip(group, values):
            layer._a_image_scale = (_scale_key(layer), _inverse(value))


def _write_rows(layer, rows: Tensor) -> None:
    """A's rows (FP8, or clamped float32 that the copy casts) into an unsharded W' and the
    matching columns of its transposed copy."""
    n = layer.out_features
    written = layer.weight[n:n + layer.rank]
    written.copy_(rows)
    if layer.weight_t is not None:  # every row of W' transposed: A's rows are columns n..n+r
        layer.weight_t[:, n:n + layer.rank] = written.t()
    layer._a_synced = layer.lora_A._version


@torch.no_grad()
def sync_rows(layer) -> None:
    """Write lora_A's FP8 image into the layer's A rows and into the matching columns of its
    transposed copy. Under FSDP2 (row-sharded lora_A and W') lora_A is gathered (r x K, a
    collective: every rank calls this after the same step, as falqon.attach's hook does) and
    each rank writes the A rows its own shard of W' holds."""
    from .distributed import _gather_rows, _local_rows
    from .modules import is_sharded

    n, r = layer.out_features, layer.rank
    lora_A = _gather_rows(layer.lora_A) if is_sharded(layer.lora_A) else layer.lora_A
    rows, ratio = a_image_rows(lora_A, layer.weight_scale, _layer_image_scale(layer))
    torch.maximum(layer.a_range, ratio, out=layer.a_range)
    if not is_sharded(layer.weight):
        _write_rows(layer, rows)
        return
    local, first = _local_rows(layer.weight)
    lo, hi = max(n, first), min(n + r, first + local.shape[0])
    if lo < hi:
        local[lo - first:hi - first].view(torch.uint8).copy_(rows[lo - n:hi - n].view(torch.uint8))
    if layer.weight_t is not None:  # (a replicated buffer under FSDP2: every rank writes it)
        layer.weight_t[:, n:n + r] = rows.t()
    layer._a_synced = layer.lora_A._version


@torch.no_grad()
def sync_many(layers) -> None:
    """sync_rows of many layers with the same results, the elementwise work as a few grouped
    (torch._foreach_*) launches instead of ~10 a layer (after every optimizer step of a 7B model
    that is 224 layers); FSDP2-sharded layers go one by one through sync_rows."""
    from .modules import is_sharded

    plain = []
    for layer in layers:
        if is_sharded(layer.lora_A) or is_sharded(layer.weight):
            sync_rows(layer)
        else:
            plain.append(layer)
    if not plain:
        return
    _cache_image_scales(plain)
    scaled = torch._foreach_mul([layer.lora_A.detach().to(torch.float32) for layer in plain],
                                [layer._a_image_scale[1] for layer in plain])
    ratios = torch._foreach_div(torch._foreach_norm(scaled, float("inf")), E4M3_MAX)
    torch._foreach_maximum_([layer.a_range for layer in plain], ratios)
    torch._foreach_clamp_min_(scaled, -E4M3_MAX)
    torch._foreach_clamp_max_(scaled, E4M3_MAX)
    for layer, rows in zip(plain, scaled):
        _write_rows(layer, rows)  # the copy casts to E4M3, as a_image_rows' .to() does


def max_a_range(model) -> float:
    """The largest `a_range` of the model's trained-A layers (up to 1.0: no A value saturated in
    its FP8 rows since the meld; 0.0: no trained-A layer, or none synchronised yet). One host
    read-back: for logs, not every step."""
    from .convert import melded_layers

    ranges = [layer.a_range for _, layer in melded_layers(model) if layer.lora_A is not None]
    return float(torch.stack([r.float().cpu() for r in ranges]).max()) if ranges else 0.0


__all__ = ["TrainedAGrad", "a_image_rows", "image_scale", "max_a_range", "sync_many",
           "sync_rows"]
