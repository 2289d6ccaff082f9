"""PEFT's conventions for falqon: a peft.LoraConfig (or LoraConfig's field names given to
FalqonConfig) becomes a FalqonConfig, target_modules="all-linear" melds every linear layer but
the output layer, and a melded model counts its parameters as PEFT does.

What each LoraConfig field becomes:
  r, lora_alpha                 rank, alpha (scaling alpha / r, as in PEFT).
  target_modules                the same matching rules; "all-linear" as in PEFT (every nn.Linear
                                but the output layer); None (PEFT: the model type's default
                                targets, e.g. q_proj and v_proj for LLaMA) resolved from the
                                model at meld time, as peft.get_peft_model does.
  exclude_modules               the same matching rules.
  use_rslora                    honoured: alpha becomes lora_alpha * sqrt(r), so that
                                scaling = lora_alpha / sqrt(r).
  lora_dropout > 0              a warning, then ignored: x A^T comes out of the melded FP8 GEMM
                                of the layer's own input, so dropout cannot be applied to the
                                adapter's input alone (it only regularises; training works).
  task_type, inference_mode,    ignored (bookkeeping).
  base_model_name_or_path, ...
  anything else (use_dora, bias, modules_to_save, init_lora_weights other than True or
  "gaussian", rank_pattern, layers_to_transform, loftq_config, ...): refused with one ValueError
  naming every such field, unless it holds PEFT's default. modules_to_save is refused because
  falqon trains, saves and exports only the melded adapters: a trained copy of lm_head would be
  silently lost.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

ALL_LINEAR = "all-linear"
# LoraConfig fields that are bookkeeping, never behaviour.
IGNORED = frozenset({"task_type", "peft_type", "auto_mapping", "peft_version",
                     "base_model_name_or_path", "revision", "inference_mode", "runtime_config"})
INIT_OK = (True, "gaussian")  # only A's init differs: falqon's A comes from the SVD anyway
# Why falqon cannot honour a field (the default reason: "not supported by falqon").
REASONS = {
    "use_dora": "DoRA's magnitude vector has no place in a melded FP8 layer",
    "bias": "falqon trains no biases; use bias='none'",
    "lora_bias": "falqon trains no biases",
    "modules_to_save": "falqon trains, saves and exports only the melded adapters (a trained "
                       "copy of these modules would be lost)",
    "fan_in_fan_out": "transformers Conv1D layers (GPT-2) are not melded",
    "init_lora_weights": "falqon's A is the SVD of W's FP8 quantisation error and B starts at 0; "
                         "use True or 'gaussian'",
    "rank_pattern": "one rank for every layer",
    "alpha_pattern": "one alpha for every layer",
    "layers_to_transform": "select layers with a target_modules regular expression instead",
    "layers_pattern": "select layers with a target_modules regular expression instead",
}
# PEFT's defaults of the LoraConfig names FalqonConfig(...) accepts besides r and lora_alpha.
KWARG_DEFAULTS = {"lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "bias": "none",
                  "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
                  "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                  "alpha_pattern": {}, "lora_bias": False, "task_type": None,
                  "inference_mode": False, "base_model_name_or_path": None, "revision": None}


def refuse(values: dict, who: str) -> None:
    """ValueError naming every field of `values` (name -> value) falqon cannot honour."""
    if values:
        parts = [f"{k}={v!r} ({REASONS.get(k, 'not supported by falqon')})"
                 for k, v in values.items()]
        raise ValueError(f"{who}: falqon cannot honour {'; '.join(parts)}; leave "
                         f"{'it' if len(parts) == 1 else 'them'} at PEFT's default")


def warn_dropout(dropout, stacklevel: int) -> None:
    if dropout:
        warnings.warn(f"falqon: lora_dropout={dropout!r} is ignored: the adapter's input x A^T "
                      f"comes out of the melded FP8 GEMM of the layer's input, so no dropout is "
                      f"applied to it (training proceeds without it)", UserWarning, stacklevel=stacklevel)


def _unsupported(values: dict, defaults: dict) -> dict:
    """The fields of `values` that falqon cannot honour: neither handled, ignored nor default."""
    handled = {"r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora",
               "lora_dropout"}
    out = {}
    for name, value in values.items():
        if name in handled or name in IGNORED:
            continue
        if name == "init_lora_weights" and value in INIT_OK:
            continue
        if name in defaults and _same(value, defaults[name]):
            continue
        out[name] = value
    return out


def _same(a, b) -> bool:
    """a == b, where None and an empty list or dict are the same (PEFT uses both for unset)."""
    empty = (None, [], {}, ())
    try:
        return bool(a == b) or (any(a is e or a == e for e in empty) and
                                any(b is e or b == e for e in empty))
    except Exception:  # noqa: BLE001 (an exotic field type: compare by repr)
        return repr(a) == repr(b)


def _alpha(r, lora_alpha, use_rslora: bool):
    if lora_alpha is None or not use_rslora:
        return lora_alpha
    return lora_alpha * math.sqrt(r)


def translate_kwargs(kwargs: dict) -> dict:
    """FalqonConfig(**kwargs) with LoraConfig's names (r, lora_alpha, use_rslora, lora_dropout,
    ...) translated to FalqonConfig's; ValueError for what falqon cannot honour."""
    peft = {k: kwargs.pop(k) for k in list(kwargs) if k in KWARG_DEFAULTS or k in
            ("r", "lora_alpha")}
    if not peft:
        return kwargs
    for peft_name, ours in (("r", "rank"), ("lora_alpha", "alpha")):
        if peft_name in peft:
            if ours in kwargs:
                raise ValueError(f"FalqonConfig: give {ours} or PEFT's {peft_name}, not both")
            kwargs[ours] = peft[peft_name]
    refuse(_unsupported(peft, KWARG_DEFAULTS), "FalqonConfig")
    warn_dropout(peft.get("lora_dropout"), 4)  # the caller of FalqonConfig(...)
    if peft.get("use_rslora"):  # scaling = alpha / sqrt(rank); alpha defaults to the rank
        rank = kwargs.get("rank", 16)
        kwargs["alpha"] = _alpha(rank, rank if kwargs.get("alpha") is None else kwargs["alpha"],
                                 True)
    return kwargs


def accept_peft_names(cls):
    """Class decorator: the dataclass's __init__ also takes LoraConfig's field names."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **translate_kwargs(kwargs))

    cls.__init__ = __init__
    return cls


def is_lora_config(config) -> bool:
    """A peft.LoraConfig (recognised without importing peft)."""
    return dataclasses.is_dataclass(config) and str(getattr(config, "peft_type", "")) in (
        "LORA", "PeftType.LORA")


def _default_targets(model, who: str):
    """PEFT's default target_modules for the model's type (what get_peft_model uses)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M
    except ImportError:
        M = {}
    if model_type not in M:
        raise ValueError(f"{who}: the LoraConfig has target_modules=None and PEFT has no default "
                         f"targets for model type {model_type!r}: set target_modules (e.g. "
                         f"'all-linear')")
    return list(M[model_type])


def from_lora_config(lora_config, model=None, **overrides):
    """The FalqonConfig of a peft.LoraConfig (see the module's doc); `overrides` are further
    FalqonConfig fields (update_mode, adapter_gain, ...). With target_modules=None the model's
    type picks PEFT's default targets."""
    from .config import FalqonConfig

    who = "falqon: LoraConfig"
    if not is_lora_config(lora_config):
        raise TypeError(f"falqon: expected a peft.LoraConfig, got {type(lora_config).__name__}")
    values = {f.name: getattr(lora_config, f.name) for f in dataclasses.fields(lora_config)}
    defaults = {f.name: getattr(type(lora_config)(), f.name)
                for f in dataclasses.fields(lora_config)}
    refuse(_unsupported(values, defaults), who)
    warn_dropout(values.get("lora_dropout"), 5)  # the caller of falqon.meld
    targets = values.get("target_modules")
    if targets is None:
        targets = _default_targets(model, who)
    elif not isinstance(targets, str):
        targets = sorted(targets)  # PEFT stores a set
    exclude = values.get("exclude_modules")
    if exclude is not None and not isinstance(exclude, str):
        exclude = sorted(exclude)
    fields = dict(rank=values["r"], alpha=_alpha(values["r"], values["lora_alpha"],
                                                 bool(values.get("use_rslora"))),
                  target_modules=targets, exclude_modules=exclude)
    fields.update(overrides)
    return FalqonConfig(**fields)


def as_falqon_config(config, model=None, who: str = "falqon.meld"):
    """config as a FalqonConfig: None (the defaults), a FalqonConfig or a peft.LoraConfig."""
    from .config import FalqonConfig

    if config is None:
        return FalqonConfig()
    if isinstance(config, FalqonConfig):
        return config
    if is_lora_config(config):
        return from_lora_config(config, model)
    raise TypeError(f"{who}: config must be a FalqonConfig or a peft.LoraConfig, got "
                    f"{type(config).__name__}")


def output_layers(model) -> dict[str, str]:
    """{name: reason} of the layers target_modules="all-linear" leaves out, as PEFT does: a
    transformers model's output layer (get_output_embeddings), else its classification head."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        head = next((getattr(model, n) for n in ("score", "classifier")
                     if hasattr(model, n)), None)
    if head is None:
        return {}
    return {name: "the output layer (target_modules='all-linear' leaves it out, as PEFT does)"
            for name, module in model.named_modules() if module is head}


def nb_trainable_parameters(model) -> tuple[int, int]:
    """(trainable parameters, all parameters), each tensor counted once: PEFT's
    get_nb_trainable_parameters (a melded weight counts its FP8 rows, A's included)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model) -> None:
    """PEFT's line: trainable params: T || all params: A || trainable%: P."""
    trainable, total = nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
          f"{100 * trainable / max(total, 1):.4f}")


__all__ = ["ALL_LINEAR", "accept_peft_names", "as_falqon_config", "from_lora_config",
           "is_lora_config", "nb_trainable_parameters", "output_layers",
           "print_trainable_parameters", "translate_kwargs"]
