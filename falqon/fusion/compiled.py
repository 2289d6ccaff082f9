"""falqon.fuse's compile backend: torch.compile of each decoder layer.

Inductor fuses the layer's elementwise work (RMSNorm, RoPE, SwiGLU, the residual adds) around
the GEMMs; falqon's ops are registered custom ops with fake kernels, so a melded layer compiles
without graph breaks (tests/test_cuda_model.py compiles one with fullgraph=True), and so do PEFT's
LoRA layers. Layers of one class share their compiled code. Each layer is compiled in place
(nn.Module.compile), so transformers' gradient checkpointing, which wraps the layer's call,
checkpoints the compiled layer and recomputes it compiled. The LM head and the loss: Liger
Kernel's fused linear cross-entropy where Liger is installed and covers the architecture (the
fp32 logits and their gradient are never materialised, as with the liger backend: at LLaMA-7B's
16 x 512 tokens that is ~2 GB of peak memory), else the model's own, eager.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..config import FalqonError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers GradientCheckpointingLayer modules (decoder layers), or else
    the entries of a ModuleList named layers, h or blocks."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers before 4.52
        GradientCheckpointingLayer = ()
    found, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if GradientCheckpointingLayer and isinstance(module, GradientCheckpointingLayer):
            found.append(module)
            inside.add(name + ".")
    if found:
        return found
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h",
                                                                             "blocks"):
            return list(module)
    return []


def unavailable(device) -> str | None:
    """Why torch.compile cannot compile a model on `device` here (None: it can). Checked before
    any layer is compiled: torch.compile fails only at the first forward otherwise."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python ({sys.version.split()[0]})"
    if getattr(device, "type", device) == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # a torch without the helper: let torch.compile say it
            return None
        if not has_triton():
            return ("torch.compile's GPU code generator needs Triton (pip install triton), which "
                    "is missing or cannot run on this GPU")
    return None


def apply(model: nn.Module, report, loss: bool = True, mode: str | None = None) -> None:
    from . import model_device

    why = unavailable(model_device(model))
    if why is not None:
        raise FalqonError(f"falqon.fuse(backend='compile'): {why}; backend='liger' needs no "
                          f"torch.compile")
    layers = decoder_layers(model)
    if not layers:
        raise FalqonError(f"falqon.fuse(backend='compile'): found no decoder layers in "
                          f"{type(model).__name__} (no transformers GradientCheckpointingLayer, "
                          f"no ModuleList named layers, h or blocks)")
    for layer in layers:
        layer.compile(**({"mode": mode} if mode else {}))
    report.compile_mode = mode
    report.fused["compiled_layers"] = len(layers)
    fuse_loss(model, report, loss)


def fuse_loss(model: nn.Module, report, loss: bool) -> None:
    """Liger's fused linear cross-entropy on the causal LM where it can take it; else the
    reason in report.skipped."""
    from . import liger

    why = liger.unavailable(model) if loss else None
    if why is None:
        liger.patch_loss(model, report, loss)  # (loss=False: it records that, fuses nothing)
    else:
        report.skipped.append(("fused_linear_cross_entropy", why))
