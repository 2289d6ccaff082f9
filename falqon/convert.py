"""falqon.meld: swap a model's nn.Linear layers for MeldedLinear, in place (torchao's module swap
with PEFT's config object and summary)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import FalqonConfig
from .modules import MeldedLinear, check_meldable

# Attributes recorded on a melded model.
CONFIG_ATTR = "falqon_config"
SUMMARY_ATTR = "_falqon_summary"


@dataclass
class MeldSummary:
    """What falqon.meld did to a model; str() gives a PEFT-style report."""

    melded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer name, reason)
    trainable_params: int = 0
    all_params: int = 0
    memory_before: int = 0  # bytes of parameters and buffers
    memory_after: int = 0
    rank: int = 0
    topk: int = 0
    update_mode: str = "proxy"  # summaries saved before the adapter mode existed were proxy's

    def __str__(self) -> str:
        how = "adapter mode" if self.update_mode == "adapter" else f"proxy mode, top-k {self.topk}"
        lines = [f"falqon: melded {len(self.melded)} of {len(self.melded) + len(self.skipped)} "
                 f"linear layers (rank {self.rank}, {how})"]
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.skipped:
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            more = f", ... ({len(names)} layers)" if len(names) > 4 else ""
            shown = ", ".join(names[:4]) + more
            lines.append(f"  skipped {shown}: {reason}")
        pct = 100.0 * self.trainable_params / max(self.all_params, 1)
        lines.append(f"trainable params: {self.trainable_params:,} || all params: "
                     f"{self.all_params:,} || trainable%: {pct:.4f}")
        ratio = self.memory_after / max(self.memory_before, 1)
        lines.append(f"weight memory: {_mib(self.memory_before)} -> {_mib(self.memory_after)} "
                     f"({ratio:.2f}x)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MeldSummary":
        data = dict(data)
        data["skipped"] = [tuple(s) for s in data.get("skipped", [])]
        return cls(**data)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def model_memory(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def melded_layers(model: nn.Module) -> list[tuple[str, MeldedLinear]]:
    """(qualified name, layer) for every MeldedLinear of the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MeldedLinear)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def plan(model: nn.Module, config: FalqonConfig) -> tuple[list[str], list[tuple[str, str]]]:
    """(names to meld, [(name, reason)] skipped) over the model's nn.Linear layers."""
    todo, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        reason = config.wants(name)
        if reason is None:
            reason = check_meldable(module.in_features, module.out_features, config.rank)
        if reason is None and module.weight.dtype not in (torch.float32, torch.float16,
                                                          torch.bfloat16):
            reason = f"weight dtype {module.weight.dtype} is not float32, float16 or bfloat16"
        if reason is None and module.weight.device.type == "meta":
            reason = "weight is on the meta device (not loaded)"
        if reason is None:
            todo.append(name)
        else:
            skipped.append((name, reason))
    return todo, skipped


def _layer_kwargs(config: FalqonConfig) -> dict:
    return dict(rank=config.rank, alpha=config.alpha, topk=config.topk,
                keep_residual=config.keep_residual, grad_dtype=config.grad_torch_dtype,
                transposed_copy=config.transposed_copy,
                amax_history_len=config.amax_history_len, update_mode=config.update_mode,
                adapter_gain=config.adapter_gain)


def empty_melded_like(linear: nn.Linear, config: FalqonConfig) -> MeldedLinear:
    """A MeldedLinear shaped like `linear`, with its bias; weights left to be loaded (no SVD)."""
    w = linear.weight
    layer = MeldedLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=w.device, dtype=None if linear.bias is None else linear.bias.dtype,
                         **_layer_kwargs(config))
    if linear.bias is not None:
        layer.bias.data = linear.bias.detach().clone()
    return layer


def _finish(model: nn.Module, config: FalqonConfig, skipped, memory_before: int) -> MeldSummary:
    """Freeze all but the B's, record the config and summary on the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = melded_layers(model)
    for _, layer in layers:
        layer.lora_B.requires_grad_(True)
    # Gradient checkpointing of the reentrant kind only back-propagates through a checkpointed
    # block whose input requires grad; with every base weight frozen, the embeddings' output does
    # not. PEFT calls the same hook for adapters.
    if callable(getattr(model, "enable_input_require_grads", None)) and \
            not getattr(model, "_require_grads_hooks", None):
        try:
            model.enable_input_require_grads()
        except NotImplementedError:
            pass
    params = {id(p): p for p in model.parameters()}.values()
    summary = MeldSummary(
        melded=[n for n, _ in layers], skipped=list(skipped),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        all_params=sum(p.numel() for p in params), memory_before=memory_before,
        memory_after=model_memory(model), rank=config.rank, topk=config.topk,
        update_mode=config.update_mode)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, SUMMARY_ATTR, summary)
    return summary


def meld(model: nn.Module, config: FalqonConfig | None = None, progress: bool = True,
         verbose: bool = True) -> nn.Module:
    """Replace the model's chosen nn.Linear layers by MeldedLinear layers, in place.

    Each layer is melded on its own device (its weight quantised to FP8 with the adapter A from
    the SVD of the quantisation error stacked under it), the original weight is dropped, every
    parameter but the lora_B's is frozen, and the config and a summary (falqon.melded_summary)
    are recorded on the model. Returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"falqon.meld takes an nn.Module, got {type(model).__name__}")
    config = FalqonConfig() if config is None else config
    if not isinstance(config, FalqonConfig):
        raise TypeError(f"falqon.meld: config must be a FalqonConfig, got {type(config).__name__}")
    if melded_layers(model):
        raise ValueError("falqon.meld: the model already holds MeldedLinear layers; meld a "
                         "model once")
    memory_before = model_memory(model)
    todo, skipped = plan(model, config)
    if not todo:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped[:3]) or "it has no nn.Linear layers"
        raise ValueError(f"falqon.meld: no layer can be melded ({reasons})")
    from tqdm.auto import tqdm

    kwargs = dict(_layer_kwargs(config), svd=config.svd, seed=config.seed)
    for name in tqdm(todo, desc="falqon meld", unit="layer", disable=not progress):
        linear = model.get_submodule(name)
        _replace(model, name, MeldedLinear.from_linear(linear, **kwargs))
        del linear  # the high-precision weight goes with it (unless something else holds it)
    summary = _finish(model, config, skipped, memory_before)
    if verbose:
        print(summary)
    return model


def melded_summary(model: nn.Module) -> MeldSummary:
    """The summary that falqon.meld (or falqon.from_pretrained) recorded on the model."""
    summary = getattr(model, SUMMARY_ATTR, None)
    if summary is None:
        raise ValueError("falqon.melded_summary: this model was not melded by falqon.meld")
    return summary


def melded_config(model: nn.Module) -> FalqonConfig | None:
    return getattr(model, CONFIG_ATTR, None)


__all__ = ["MeldSummary", "meld", "melded_config", "melded_layers", "melded_summary",
           "model_memory"]
