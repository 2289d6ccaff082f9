"""falqon.meld: swap a model's nn.Linear layers for MeldedLinear, in place (torchao's module swap
with PEFT's config object and summary)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter_init import layer_seed
from .config import FalqonConfig
from .modules import MeldedLinear, check_meldable
from .peft_compat import ALL_LINEAR, as_falqon_config, output_layers

# Attributes recorded on a melded model.
CONFIG_ATTR = "falqon_config"
SUMMARY_ATTR = "_falqon_summary"


def mode_label(update_mode: str, train_a: bool, topk: int) -> str:
    """How a run's mode reads in messages: "adapter mode[, A trained]" or "proxy mode, top-k k"."""
    if update_mode == "adapter":
        return "adapter mode" + (", A trained" if train_a else "")
    return f"proxy mode, top-k {topk}"


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
    train_a: bool = False  # the adapter mode with A trained too

    def __str__(self) -> str:
        how = mode_label(self.update_mode, self.train_a, self.topk)
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


CONV1D_REASON = ("transformers Conv1D (GPT-2's layers, weight stored transposed) is not supported: "
                 "only nn.Linear layers are melded")


def shared_linears(model: nn.Module) -> dict[str, str]:
    """{name: reason} of the nn.Linear layers that one module swap cannot meld: a module reachable
    under several names (a swap at one place would leave the others unmelded) or a weight tied
    to another parameter (tied embeddings: melding would untie it, and transformers could not
    re-tie an FP8 lm_head on load)."""
    places: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear):
            places.setdefault(id(module), (module, []))[1].append(name)
    param_names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), []).append(name)
    reasons = {}
    for module, names in places.values():
        own = {f"{n}.weight" if n else "weight" for n in names}
        tied = [n for n in param_names.get(id(module.weight), []) if n not in own]
        if len(names) > 1:
            reasons[names[0]] = (f"the same nn.Linear is also used as {', '.join(names[1:])}: "
                                 f"shared layers are not melded")
        elif tied:
            reasons[names[0]] = (f"its weight is tied to {tied[0]} (tie_word_embeddings): tied "
                                 f"weights are not melded")
    return reasons


def plan(model: nn.Module, config: FalqonConfig,
         loaded: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """(names to meld, [(name, reason)] skipped) over the model's nn.Linear layers (and its
    transformers Conv1D layers, which are skipped with the reason). loaded=False plans a model
    whose weights are still to be loaded (on the meta device: falqon.loading)."""
    todo, skipped = [], []
    shared = shared_linears(model)
    if config.target_modules == ALL_LINEAR:
        shared = {**output_layers(model), **shared}
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            skipped.append((name, config.wants(name) or CONV1D_REASON))
            continue
        if not isinstance(module, nn.Linear):
            continue
        reason = config.wants(name) if name else None  # a bare nn.Linear is its own target
        if reason is None:
            reason = shared.get(name)
        if reason is None:
            reason = check_meldable(module.in_features, module.out_features, config.rank)
        if reason is None and module.weight.dtype not in (torch.float32, torch.float16,
                                                          torch.bfloat16):
            reason = f"weight dtype {module.weight.dtype} is not float32, float16 or bfloat16"
        if reason is None and loaded and module.weight.device.type == "meta":
            reason = "weight is on the meta device (not loaded)"
        if reason is None:
            todo.append(name)
        else:
            skipped.append((name, reason))
    return todo, skipped


def check_finite(model: nn.Module, names: list[str]) -> None:
    """Raise, naming the layers, where a weight to be melded holds a NaN or Inf (before anything
    is changed: its SVD would fail, or its FP8 copy would be all NaN)."""
    bad = []
    for name in names:
        count = int((~torch.isfinite(model.get_submodule(name).weight.detach())).sum())
        if count:
            bad.append(f"{name or 'the layer'} ({count} values)")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"falqon.meld: non-finite (NaN or Inf) weights in {', '.join(bad[:3])}"
                         f"{more}; the model was not changed")


def _layer_kwargs(config: FalqonConfig) -> dict:
    return dict(rank=config.rank, alpha=config.alpha, topk=config.topk,
                keep_residual=config.keep_residual, grad_dtype=config.grad_torch_dtype,
                transposed_copy=config.transposed_copy,
                amax_history_len=config.amax_history_len, update_mode=config.update_mode,
                adapter_gain=config.adapter_gain, train_a=config.train_a)


def meld_kwargs(config: FalqonConfig, name: str) -> dict:
    """MeldedLinear.from_linear's arguments for the layer called `name`: the layer options, the
    SVD and the adapter's init; a random A's seed mixes config.seed with the name
    (falqon.adapter_init.layer_seed), so that layers differ."""
    seed = layer_seed(config.seed, name) if config.adapter_init == "random" else config.seed
    return dict(_layer_kwargs(config), svd=config.svd, seed=seed,
                adapter_init=config.adapter_init)


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
        if layer.lora_A is not None:
            layer.lora_A.requires_grad_(True)
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
        update_mode=config.update_mode, train_a=config.train_a)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, SUMMARY_ATTR, summary)
    from .distributed import mark_ddp_ignored  # (imports melded_layers from here)

    mark_ddp_ignored(model)  # DDP can broadcast no float8 tensor
    from .shared_quant import share_input_quantization

    share_input_quantization(model)  # q/k/v and gate/up quantise their shared input once
    from .model_api import install

    install(model)  # save_pretrained, print_trainable_parameters, the proxy mode's update guard
    return summary


def meld(model: nn.Module, config: FalqonConfig | None = None, progress: bool = True,
         verbose: bool = True) -> nn.Module:
    """Replace the model's chosen nn.Linear layers by MeldedLinear layers, in place. `config`: a
    FalqonConfig, or a peft.LoraConfig (FalqonConfig.from_peft: what falqon cannot honour is
    refused).

    Each layer is melded on its own device (its weight quantised to FP8 with the adapter A
    stacked under it: from the SVD of the quantisation error, or per config.adapter_init), the
    original weight is dropped, every parameter but the lora_B's is frozen, and the config and
    a summary (falqon.melded_summary) are recorded on the model. Returns the model; a bare
    nn.Linear cannot be swapped in place: it is melded into a new MeldedLinear, which is
    returned.

    All or nothing: every layer is checked (dtype, device, shape, finite weights) before the
    first is replaced, so an error leaves the model as it was. Layers that one swap cannot meld
    are skipped with the reason in the summary: an nn.Linear reachable under several names, a
    weight tied to another parameter (tie_word_embeddings with lm_head targeted), transformers'
    Conv1D (GPT-2)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"falqon.meld takes an nn.Module, got {type(model).__name__}")
    config = as_falqon_config(config, model)  # None, a FalqonConfig or a peft.LoraConfig
    if melded_layers(model):
        raise ValueError("falqon.meld: the model already holds MeldedLinear layers; meld a "
                         "model once")
    memory_before = model_memory(model)
    todo, skipped = plan(model, config)
    if not todo:
        reasons = "; ".join(f"{n or 'the layer'}: {r}" for n, r in skipped[:3]) or \
            "it has no nn.Linear layers"
        raise ValueError(f"falqon.meld: no layer can be melded ({reasons})")
    check_finite(model, todo)
    from tqdm.auto import tqdm

    if todo == [""]:  # a bare nn.Linear: the new layer is the model
        model = MeldedLinear.from_linear(model, **meld_kwargs(config, ""))
        todo = []
    for name in tqdm(todo, desc="falqon meld", unit="layer", disable=not progress or not todo):
        linear = model.get_submodule(name)
        _replace(model, name, MeldedLinear.from_linear(linear, **meld_kwargs(config, name)))
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
