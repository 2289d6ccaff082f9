"""falqon.fuse's liger backend: Liger Kernel's Triton kernels on one model instance.

Liger's own apply_liger_kernel_to_llama(model=...) also replaces transformers' classes
(LlamaRMSNorm, LlamaMLP) and its module-level apply_rotary_pos_emb, which changes every LLaMA
built later in the process. Here only the instance changes: its RMSNorm and MLP modules get a
forward that calls Liger's functional kernels, its attention modules switch Liger's RoPE on while
they run (the module-level function becomes a dispatcher that leaves other models' attention as
it was), and the causal LM's forward becomes Liger's fused-linear-cross-entropy forward of its
architecture. Liger's kernels are Triton kernels: on a tensor that is not on a CUDA GPU each
patched forward runs the model's own code, so a fused model still runs on the CPU.

RMSNorm runs out of place (Liger's LLaMA patch writes dX into dY): the melded layers' backward
may hand RMSNorm a gradient buffer that something else still reads.
The fused loss reads lm_head.weight directly (Liger's LigerForCausalLMLoss), so it is used only
while the LM head is a plain nn.Linear: a melded lm_head (FP8 rows) or one under a PEFT adapter
(whose adapter the kernel would leave out) keep the model's own loss, checked on every call.
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
from types import MethodType, SimpleNamespace

import torch
from torch import nn

from ..config import FalqonError

SUPPORTED = ("llama", "mistral", "qwen2")  # model_type: Liger has a module of each name
INSTALL = "pip install 'falqon[fast]' (or pip install liger-kernel)"
ROPE = "apply_rotary_pos_emb"
_rope_on = contextvars.ContextVar("falqon_liger_rope", default=False)
_kernels = None  # load()'s answer


def on_gpu(t) -> bool:
    """Whether Liger's kernels can take tensor `t` (a CUDA tensor)."""
    return t.is_cuda


def load() -> SimpleNamespace:
    """Liger's kernels: rms_norm, swiglu and rope (its functional API) and lce(arch) (its
    fused-linear-cross-entropy forward of a causal LM). FalqonError when Liger is missing."""
    global _kernels
    if _kernels is None:
        try:
            from liger_kernel.transformers import functional as F
        except ImportError as exc:
            if (exc.name or "").split(".")[0] == "liger_kernel":
                raise FalqonError(f"falqon.fuse(backend='liger') needs Liger Kernel, which is "
                                  f"not installed: {INSTALL}") from None
            raise FalqonError(f"Liger Kernel is installed but cannot be imported: {exc}") \
                from None

        def lce(arch: str):
            return importlib.import_module(f"liger_kernel.transformers.model.{arch}").lce_forward

        _kernels = SimpleNamespace(rms_norm=F.liger_rms_norm, swiglu=F.liger_swiglu,
                                   rope=F.liger_rope, lce=lce)
    return _kernels


def architecture(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def unavailable(model: nn.Module) -> str | None:
    """Why the liger backend cannot take `model` (None: it can)."""
    arch = architecture(model)
    if arch not in SUPPORTED:
        return f"Liger covers {', '.join(SUPPORTED)} here, not {arch or type(model).__name__}"
    try:
        load()
    except FalqonError as exc:
        return str(exc)
    return None


def decoder(model: nn.Module) -> nn.Module:
    """The model's decoder stack (LlamaModel and the like: .layers, .norm)."""
    for m in (getattr(model, getattr(model, "base_model_prefix", "model"), None), model):
        if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "norm"):
            return m
    raise FalqonError(f"falqon.fuse(backend='liger'): {type(model).__name__} has no decoder "
                      f"stack with .layers and .norm")


# ---- the patched forwards (module-level functions: a deep copy of the model rebinds them) -----

def _rms_norm_forward(self, hidden_states):
    if not on_gpu(hidden_states):
        return type(self).forward(self, hidden_states)
    # casting_mode "llama": the fp32 normalisation cast to the input dtype, then times the weight
    return load().rms_norm(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


def _swiglu_forward(self, x):
    if not on_gpu(x):
        return type(self).forward(self, x)
    return self.down_proj(load().swiglu(self.gate_proj(x), self.up_proj(x)))


def _attention_forward(self, *args, **kwargs):
    token = _rope_on.set(True)  # this model's attention: the dispatcher runs Liger's RoPE
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _rope_on.reset(token)


def _lce_forward(self, *args, **kwargs):
    head = getattr(self, "lm_head", None)
    if type(head) is nn.Linear and on_gpu(head.weight):
        return load().lce(self.config.model_type)(self, *args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def rope_dispatcher(original):
    """The module-level apply_rotary_pos_emb: Liger's RoPE inside a fused model's attention (and
    for the call signature (q, k, cos, sin[, unsqueeze_dim]) it shares with Liger's), else
    `original`."""
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        # Under torch.compile the model's own RoPE (Inductor fuses it; dynamo cannot trace a
        # ContextVar, and a graph break here would split every compiled LLaMA attention of the
        # process, fused or not, and fail fullgraph=True)
        if torch.compiler.is_compiling():
            return original(q, k, cos, sin, *args, **kwargs)
        if _rope_on.get() and not args and set(kwargs) <= {"unsqueeze_dim"} and on_gpu(q):
            return load().rope(q, k, cos, sin, None, kwargs.get("unsqueeze_dim", 1))
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.falqon_original = original
    return apply_rotary_pos_emb


# ---- putting them on a model ---------------------------------------------------------------------

def _bind(module: nn.Module, forward) -> None:
    module.forward = MethodType(forward, module)


def _patch_norm(module: nn.Module) -> bool:
    if not (isinstance(getattr(module, "weight", None), nn.Parameter) and
            hasattr(module, "variance_epsilon")):
        return False
    _bind(module, _rms_norm_forward)
    return True


def _patch_rope(attention: nn.Module) -> bool:
    namespace = inspect.unwrap(type(attention).forward).__globals__
    if not callable(namespace.get(ROPE)):
        return False
    if not hasattr(namespace[ROPE], "falqon_original"):
        namespace[ROPE] = rope_dispatcher(namespace[ROPE])
    _bind(attention, _attention_forward)
    return True


def _patch_layers(stack: nn.Module, config, report) -> None:
    counts = dict.fromkeys(("rms_norm", "swiglu", "rope"), 0)
    swiglu_ok = getattr(config, "hidden_act", None) in ("silu", "swish")
    for layer in stack.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            counts["rms_norm"] += _patch_norm(getattr(layer, name, None))
        mlp = getattr(layer, "mlp", None)
        if swiglu_ok and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            _bind(mlp, _swiglu_forward)
            counts["swiglu"] += 1
        attention = getattr(layer, "self_attn", None)
        counts["rope"] += attention is not None and _patch_rope(attention)
    counts["rms_norm"] += _patch_norm(stack.norm)
    for what, n in counts.items():
        if n:
            report.fused[what] = n
        else:
            report.skipped.append((what, f"no {what} of the expected form in "
                                         f"{type(stack).__name__}"))
    if not swiglu_ok:
        report.skipped.append(("swiglu", f"hidden_act is {getattr(config, 'hidden_act', None)!r},"
                                         f" not silu"))


def patch_loss(model: nn.Module, report, loss: bool) -> None:
    head = getattr(model, "lm_head", None)
    kind = "missing" if head is None else f"{type(head).__module__}.{type(head).__qualname__}"
    if not loss:
        report.skipped.append(("fused_linear_cross_entropy", "loss=False"))
    elif type(head) is not nn.Linear:
        report.skipped.append((
            "fused_linear_cross_entropy",
            f"lm_head is {kind}, not a plain "
            f"nn.Linear (the fused loss reads lm_head.weight: a melded or adapted head keeps "
            f"the model's own loss)"))
    elif getattr(model.config, "pretraining_tp", 1) > 1:
        report.skipped.append(("fused_linear_cross_entropy", "pretraining_tp > 1"))
    else:
        load().lce(architecture(model))  # imported now: a missing module fails here, not later
        _bind(model, _lce_forward)
        report.fused["fused_linear_cross_entropy"] = 1


def apply(model: nn.Module, report, loss: bool = True) -> None:
    """Put Liger's kernels on `model` (a transformers model of a SUPPORTED architecture)."""
    arch = architecture(model)
    if arch not in SUPPORTED:
        raise FalqonError(f"falqon.fuse(backend='liger'): Liger Kernel is applied to "
                          f"{', '.join(SUPPORTED)} models; this one is "
                          f"{arch or type(model).__name__}: use backend='compile' or 'auto'")
    load()
    _patch_layers(decoder(model), model.config, report)
    patch_loss(model, report, loss)
    device = next(iter(model.parameters()), None)
    if device is not None and not device.is_cuda:
        report.skipped.append(("kernels", f"the model is on the {device.device.type}: Liger's "
                                          f"kernels run on CUDA tensors, elsewhere the model's "
                                          f"own code runs"))
