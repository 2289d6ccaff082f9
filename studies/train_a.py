"""A study-only probe: falqon's adapter mode with A trained as well (LoRA, not LoRA-FA, over the
melded FP8 base), to learn whether the frozen A is what keeps the adapter mode 1.1-1.4% behind
LoRA on role-play (docs/accuracy.md) before the library gets a kernel for it.

How it is put on a melded layer, without touching falqon (the parameter is called probe_A, not
lora_A, which the library's own trained A, FalqonConfig(train_a=True), uses; the H200 run of
2026-11-30 called it lora_A, the numerics are the same):
- `probe_A`, a float32 parameter, starts as the layer's A (its FP8 rows times the weight scale,
  bit for bit) and is the master copy the optimizer updates;
- after every optimizer step its FP8 image is written into the layer's A rows, so the melded
  GEMM keeps producing x A^T from the trained A. The rows share the weight's per-tensor scale;
  where A outgrows it (|A| > 448 scale) the rows hold A / c and the layer's scaling is multiplied
  by c, which leaves y, dx and dB what they are for A (scaling * x (A/c)^T B^T * c);
- dA reaches probe_A through a term that is exactly zero in value: scaling * (x D^T) B^T with
  D = probe_A - probe_A.detach(). Its gradient with respect to probe_A is scaling * (g B)^T x, LoRA's
  dA; y, dx and dB are those of the plain adapter mode bit for bit (the term adds zeros and its
  gradients into x and B are zero or cut). It costs two more GEMMs a layer in fp32: a probe of
  accuracy, not of speed.
"""

from __future__ import annotations

import torch
from torch import nn

from .methods import E4M3_MAX


class TrainedA:
    """The probe on one melded layer in the adapter mode (see the module docstring)."""

    def __init__(self, layer):
        if layer.update_mode != "adapter":
            raise ValueError("a trained A needs the adapter mode (the proxy mode folds B A into W)")
        self.layer = layer
        layer.probe_A = nn.Parameter(layer.adapter_A(torch.float32).clone())
        self.scaling = layer.scaling  # LoRA's scaling of the trained A (the layer's is scaling * c)
        self.c = 1.0  # the rows hold A / c
        self.max_c = 1.0
        inner = layer.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = inner(x)
            a = layer.probe_A
            zero = (a - a.detach()).to(torch.float32)
            term = (x.to(torch.float32) @ zero.t()) @ layer.lora_B.detach().to(torch.float32).t()
            return y + (self.scaling * term).to(y.dtype)

        layer.forward = forward

    @torch.no_grad()
    def sync(self) -> None:
        """Write probe_A's FP8 image into the layer's A rows (and its transposed copy): A / c at
        the weight's scale, c >= 1 the least that keeps it in E4M3's range, and the layer's
        scaling times c."""
        layer = self.layer
        n, r = layer.out_features, layer.rank
        scaled = layer.probe_A.float() / layer.weight_scale.float()
        self.c = max(1.0, float(scaled.abs().max()) / E4M3_MAX)
        self.max_c = max(self.max_c, self.c)
        rows = (scaled / self.c).clamp(-E4M3_MAX, E4M3_MAX)  # (the clamp: rounding at the edge)
        layer.weight[n:n + r] = rows.to(layer.weight.dtype)
        layer.scaling = self.scaling * self.c
        layer.refresh_weight_t()


def install(layers) -> list[TrainedA]:
    """The probe on every layer (their probe_A parameters are then among the model's trainable
    parameters: build the optimizer after this, and call sync_after_steps on it)."""
    return [TrainedA(layer) for layer in layers]


def sync_after_steps(optimizer: torch.optim.Optimizer, probes: list[TrainedA]):
    """Every probe's FP8 A rows rewritten from probe_A after each optimizer step; returns the
    hook's handle."""
    def after_step(*_):
        for p in probes:
            p.sync()

    return optimizer.register_step_post_hook(after_step)


class RangeMeter:
    """The run's record of the probe: the largest factor c any layer's A rows needed to stay in
    E4M3's range at the weight's scale (1: A never outgrew it). The study's training loop calls
    begin_step and summary on a method's meter."""

    def __init__(self, probes: list[TrainedA]):
        self.probes = probes

    def begin_step(self, step: int) -> None:
        pass

    def summary(self) -> dict:
        return {"trained_A_max_c": max(p.max_c for p in self.probes)}


class LibraryRange:
    """The same record for the library's trained A (FalqonConfig(train_a=True)): the largest
    |A| / E4M3 max its rows were written with (falqon.trained_a.max_a_range; above 1: saturated)."""

    def __init__(self, model):
        self.model = model

    def begin_step(self, step: int) -> None:
        pass

    def summary(self) -> dict:
        from falqon.trained_a import max_a_range

        return {"trained_A_max_range": max_a_range(self.model)}


__all__ = ["LibraryRange", "RangeMeter", "TrainedA", "install", "sync_after_steps"]
