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

The modes that replay the compiled layers as CUDA graphs (reduce-overhead, max-autotune) reuse
each graph's output memory at its next replay, so a forward pre-hook on the model marks a new
step at each call of the model (torch.compiler.cudagraph_mark_step_begin: the outputs of the last
step are then dead) and refuses non-reentrant gradient checkpointing, whose recompute replays a
layer's graph while the outputs of its first run are still in use (on an H200, runs 72-73: "accessing
tensor output of CUDAGraphs that has been overwritten", with or without the mark). Reentrant
checkpointing and no checkpointing train as eager does (tests/test_cuda_fusion.py), but under
reentrant checkpointing a LLaMA-7B step took 2.9-3.0 s against 0.40 s in the default mode (run
74: the recompute keeps the graphs off their fast path), so that case warns.
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch
from torch import nn

from ..config import FalqonError

# torch.compile's modes that replay the compiled code as CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


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
    if mode in CUDA_GRAPH_MODES:
        model.register_forward_pre_hook(functools.partial(_new_cuda_graph_step, layers, mode))
    report.compile_mode = mode
    report.fused["compiled_layers"] = len(layers)
    fuse_loss(model, report, loss)


def checkpointing(layers: list[nn.Module]) -> str | None:
    """How these (transformers) layers are checkpointed in training: "non-reentrant" if any is
    checkpointed without use_reentrant=True (torch's checkpoint without it is the non-reentrant
    one), else "reentrant" if any is checkpointed, else None."""
    kinds = set()
    for layer in layers:
        if layer.training and getattr(layer, "gradient_checkpointing", False):
            func = getattr(layer, "_gradient_checkpointing_func", None)
            reentrant = (getattr(func, "keywords", None) or {}).get("use_reentrant") is True
            kinds.add("reentrant" if reentrant else "non-reentrant")
    return "non-reentrant" if "non-reentrant" in kinds else next(iter(kinds), None)


def _new_cuda_graph_step(layers: list[nn.Module], mode: str, model: nn.Module, args) -> None:
    # (checked at every call: checkpointing may be turned on after falqon.fuse)
    kind = checkpointing(layers)
    if kind == "non-reentrant":
        raise FalqonError(
            f"falqon.fuse(compile_mode={mode!r}) replays the decoder layers as CUDA graphs, which "
            f"non-reentrant gradient checkpointing cannot take (its recompute overwrites outputs "
            f"still in use): checkpoint with use_reentrant=True "
            f"(falqon.training.enable_gradient_checkpointing(model, reentrant=True)), or fuse "
            f"without a CUDA-graph mode")
    if kind == "reentrant":
        warnings.warn(
            f"falqon.fuse(compile_mode={mode!r}) under gradient checkpointing: correct, but the "
            f"recompute keeps torch's CUDA graphs off their fast path; a LLaMA-7B step measured "
            f"7x slower than compile_mode=None on an H200 (benchmarks/NOTES.md, run 74)",
            stacklevel=2)
    torch.compiler.cudagraph_mark_step_begin()


def fuse_loss(model: nn.Module, report, loss: bool) -> None:
    """Liger's fused linear cross-entropy on the causal LM where it can take it; else the
    reason in report.skipped."""
    from . import liger

    why = liger.unavailable(model) if loss else None
    if why is None:
        liger.patch_loss(model, report, loss)  # (loss=False: it records that, fuses nothing)
    else:
        report.skipped.append(("fused_linear_cross_entropy", why))
