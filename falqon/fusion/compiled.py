"""falqon.fuse's compile backend: torch.compile of each decoder layer.

Inductor fuses the layer's elementwise work (RMSNorm, RoPE, SwiGLU, the residual adds) around
the GEMMs; falqon's ops are registered custom ops with fake kernels, so a melded layer compiles
without graph breaks (tests/test_cuda_model.py compiles one with fullgraph=True), and so do PEFT's
LoRA layers. Layers of one class share their compiled code. Each layer is compiled in place
(nn.Module.compile), so transformers' gradient checkpointing, which wraps the layer's call,
checkpoints the compiled layer and recomputes it compiled. The LM head and the loss stay eager.
"""

from __future__ import annotations

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


def apply(model: nn.Module, report) -> None:
    layers = decoder_layers(model)
    if not layers:
        raise FalqonError(f"falqon.fuse(backend='compile'): found no decoder layers in "
                          f"{type(model).__name__} (no transformers GradientCheckpointingLayer, "
                          f"no ModuleList named layers, h or blocks)")
    for layer in layers:
        layer.compile()
    report.fused["compiled_layers"] = len(layers)
