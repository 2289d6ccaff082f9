"""falqon.merge: a melded model back to plain nn.Linear layers holding the weight it computes with,
and a measure of how much of the trained adapter a merge into FP8 keeps.

What a melded layer's weight is after training:
  adapter mode  W + scaling * B A: W (the FP8 rows of the melded weight times its scale) never
                changed during training, the adapter B A is exact in the forward;
  proxy mode    W: every update of B was folded into W's FP8 rows by the proxy update (B holds no
                pending update, or a residual that the forward never used).

precision="bf16" writes that weight in the model's dense dtype (bf16 for a bf16 model);
precision="fp8" writes it as an FP8 export holds it: in the adapter mode W + scaling * B A
re-quantised to E4M3 at a fresh per-tensor scale (amax / 448, falqon.quantize's numerics), in the
proxy mode the trained FP8 bytes and scale as they are; then dequantised in the model's dtype.

E4M3 steps are 6.25-12.5% of a value, so a merge into FP8 rounds small updates away (DESIGN.md,
"Beyond the paper"). MergeReport measures it, summed over the layers, with dW = (merged weight as
the layer holds it) - W and U = scaling * B A:
  kept_l1       sum |dW| / sum |U|: how much the weights moved, relative to the update (rounding
                noise counts too, so it is not bounded by 1);
  signed_share  <dW, U> / |U|^2: the share of the update that the merged weights carry (1: all
                of it, 0: none).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .config import FalqonError
from .convert import CONFIG_ATTR, SUMMARY_ATTR, _replace, melded_layers
from .modules import MeldedLinear

PRECISIONS = ("bf16", "fp8")
REPORT_ATTR = "falqon_merge_report"
STAT_KEYS = ("update_l1", "change_l1", "dot", "update_sq")


@dataclass
class MergeReport:
    """What a merge did to the adapter's update, per layer and summed (see the module's doc).
    `layers` maps each merged layer's name to its sums: update_l1 = sum |U|, change_l1 =
    sum |dW|, dot = <dW, U>, update_sq = |U|^2."""

    precision: str
    update_mode: str
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    def total(self, key: str) -> float:
        """`key` (one of STAT_KEYS) summed over the layers."""
        return math.fsum(stats[key] for stats in self.layers.values())

    @property
    def kept_l1(self) -> float:
        """sum |dW| / sum |U| over every layer; NaN where there is no update (proxy mode)."""
        update = self.total("update_l1")
        return self.total("change_l1") / update if update > 0 else math.nan

    @property
    def signed_share(self) -> float:
        """<dW, U> / |U|^2 over every layer; NaN where there is no update (proxy mode)."""
        update = self.total("update_sq")
        return self.total("dot") / update if update > 0 else math.nan

    def to_dict(self) -> dict:
        """The report as JSON-safe values (the undefined ratios as None)."""
        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {"precision": self.precision, "update_mode": self.update_mode,
                "kept_l1": finite(self.kept_l1), "signed_share": finite(self.signed_share),
                "totals": {k: self.total(k) for k in STAT_KEYS}, "layers": self.layers}

    def __str__(self) -> str:
        head = f"falqon merge ({self.precision}) of {len(self.layers)} layers"
        if self.update_mode != "adapter":
            return (f"{head}: proxy mode, the updates were folded into the FP8 weights during "
                    f"training (nothing left to merge)")
        return (f"{head}: the merged weights carry {100 * self.signed_share:.1f}% of the "
                f"adapter's update scaling*B*A (<dW, U>/|U|^2); sum|dW|/sum|U| = "
                f"{self.kept_l1:.3f}")


def dense_dtype(model: nn.Module) -> torch.dtype:
    """The model's dense dtype: the floating dtype (wider than a byte) holding the most elements
    outside its melded layers; float32 when there is none."""
    melded = {id(t) for _, layer in melded_layers(model)
              for t in list(layer.parameters()) + list(layer.buffers())}
    counts: Counter = Counter()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in melded and t.is_floating_point() and t.element_size() > 1:
            counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


@torch.no_grad()
def merged_fp8(layer: MeldedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q, scale) of the layer's weight as an FP8 export holds it: in the adapter mode
    W + scaling * B A re-quantised to E4M3 at a fresh per-tensor scale; in the proxy mode the
    trained FP8 rows and their scale, unchanged."""
    if layer.update_mode == "adapter":
        return ops.quantize(layer.merged_weight(torch.float32), ops.E4M3)
    return layer.weight[:layer.out_features].clone(), layer.weight_scale.clone()


@torch.no_grad()
def merged_dense(layer: MeldedLinear, precision: str, dtype: torch.dtype) -> torch.Tensor:
    """The layer's merged weight (out_features, in_features) in `dtype`: exact for "bf16" (up to
    the rounding to dtype), through merged_fp8 for "fp8"."""
    if precision == "fp8":
        q, scale = merged_fp8(layer)
        return (q.to(torch.float32) * scale).to(dtype)
    return layer.merged_weight(dtype)


@torch.no_grad()
def update_stats(layer: MeldedLinear, merged: torch.Tensor) -> dict[str, float]:
    """The layer's MergeReport sums for a merged weight `merged` (any float dtype): U = scaling *
    B A (zero in the proxy mode, whose forward never used B), dW = merged - W."""
    w = layer.dequantized_weight(torch.float32)
    delta = merged.to(torch.float32) - w
    if layer.update_mode == "adapter":
        update = torch.mm(layer.lora_B.float(), layer.adapter_A(torch.float32)) * layer.scaling
    else:
        update = torch.zeros_like(w)
    sums = (update.abs().sum(dtype=torch.float64), delta.abs().sum(dtype=torch.float64),
            (delta * update).sum(dtype=torch.float64), update.square().sum(dtype=torch.float64))
    return dict(zip(STAT_KEYS, torch.stack(sums).tolist()))


def update_mode_of(model: nn.Module, layers) -> str:
    """The one update mode of the model's melded layers (FalqonError if they are mixed)."""
    modes = {layer.update_mode for _, layer in layers}
    if len(modes) != 1:
        raise FalqonError(f"the model's melded layers mix update modes {sorted(modes)}; meld a "
                          f"model with one FalqonConfig")
    return modes.pop()


def _plain_linear(layer: MeldedLinear, weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear (frozen) holding `weight` and the layer's bias, in weight's dtype."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device="meta")  # no initialisation: both tensors are replaced
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(weight.dtype).clone(),
                                   requires_grad=False)
    return linear


@torch.no_grad()
def merge(model: nn.Module, precision: str = "bf16", dtype: torch.dtype | None = None,
          verbose: bool = False) -> nn.Module:
    """Replace every MeldedLinear of `model`, in place, by a frozen nn.Linear holding its merged
    weight (W + scaling * B A in the adapter mode, W in the proxy mode), and return the model.

    precision  "bf16": the merged weight in `dtype`; "fp8": the merged weight re-quantised to
               E4M3 at a fresh per-tensor scale (as export(format="fp8") writes it), dequantised
               in `dtype`.
    dtype      default: the model's dense dtype (dense_dtype), e.g. bf16 for a bf16 model.

    The MergeReport (how much of the adapter's update the merged weights carry) is recorded as
    `model.falqon_merge_report` and printed with verbose=True. The model is no longer melded
    (falqon.melded_config(model) is None). To keep the melded model, merge a copy:
    falqon.merge(copy.deepcopy(model), precision="fp8")."""
    if precision not in PRECISIONS:
        raise FalqonError(f"falqon.merge: precision must be one of {PRECISIONS}, got "
                          f"{precision!r}")
    layers = melded_layers(model)
    if not layers:
        raise FalqonError("falqon.merge: the model has no MeldedLinear layers (call falqon.meld)")
    dtype = dense_dtype(model) if dtype is None else dtype
    report = MergeReport(precision, update_mode_of(model, layers))
    for name, layer in layers:
        weight = merged_dense(layer, precision, dtype)
        report.layers[name] = update_stats(layer, weight)
        _replace(model, name, _plain_linear(layer, weight))
    for attr in (CONFIG_ATTR, SUMMARY_ATTR):
        if attr in model.__dict__:
            delattr(model, attr)
    from .model_api import uninstall

    uninstall(model)  # the model's own save_pretrained again: it is a plain model now
    setattr(model, REPORT_ATTR, report)
    if verbose:
        print(report)
    return model


__all__ = ["MergeReport", "PRECISIONS", "dense_dtype", "merge", "merged_dense", "merged_fp8",
           "update_stats"]
