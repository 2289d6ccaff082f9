"""Meld while loading: falqon.meld_pretrained (a local checkpoint) and falqon.meld_from_config
(seeded random weights). The transformers model is built without its weights (parameters on the
meta device), then filled one module at a time on the target device, in state-dict order, each
targeted nn.Linear melded as soon as its weights arrive: the whole high-precision model never
exists, so peak device memory is about the melded model plus one layer's weights, and host memory
holds one tensor (read from the memory-mapped safetensors files) or two (the next read ahead).

Everything that can be checked before the first weight is read is (falqon.weight_sources: each
shard's header, every tensor the model needs present with its shape; falqon.convert.plan: which
layers meld and why not); an error during loading (a NaN weight, a read error) empties the model
back to the meta device, so nothing half-loaded is left behind."""

from __future__ import annotations

import pathlib
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import FalqonConfig, FalqonError
from .convert import _finish, _replace, meld_kwargs, plan
from .modules import MeldedLinear
from .weight_sources import FLOAT_DTYPES, CheckpointWeights, RandomWeights, _first_line, _more


@dataclass
class _Slot:
    """One entry of the model's state dict, to be filled."""

    key: str                   # its state-dict name
    attr: str                  # its attribute on the module that owns it
    tensor: torch.Tensor       # the skeleton's (meta) parameter or (real) buffer
    is_param: bool
    source_key: str | None = None  # the source's name for it (None: a buffer kept as built)


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers renamed from_pretrained's / from_config's torch_dtype to dtype in 4.56."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def empty_model(model_config, dtype: torch.dtype = torch.bfloat16, model_class=None) -> nn.Module:
    """A transformers model (AutoModelForCausalLM unless model_class) built from its config
    without weights: parameters on the meta device (accelerate's init_empty_weights; buffers such
    as RoPE's frequencies are computed for real), tied as the config says."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise ImportError("meld while loading needs accelerate (and transformers): pip install "
                          "'falqon[hf]'") from None
    from transformers import AutoModelForCausalLM

    cls = model_class or AutoModelForCausalLM
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    with init_empty_weights(include_buffers=False):
        model = build(model_config, **dtype_kwarg(dtype))
    model.tie_weights()
    return model


def _groups(model: nn.Module) -> list[tuple[str, list[_Slot]]]:
    """The model's state dict as [(module name, its slots)], in state-dict order."""
    params = {id(p) for p in model.parameters()}
    groups: list[tuple[str, list[_Slot]]] = []
    for key, t in model.state_dict(keep_vars=True).items():
        module, _, attr = key.rpartition(".")
        if not groups or groups[-1][0] != module:
            groups.append((module, []))
        groups[-1][1].append(_Slot(key, attr, t, id(t) in params))
    return groups


def _resolve(model: nn.Module, groups, source) -> None:
    """Find every slot's tensor in the source and check its shape, before anything is read."""
    names: dict[int, list[str]] = {}
    for _, slots in groups:
        for s in slots:
            names.setdefault(id(s.tensor), []).append(s.key)
    prefix = getattr(model, "base_model_prefix", "") or ""
    missing = []
    for _, slots in groups:
        for s in slots:
            s.source_key = source.find(names[id(s.tensor)], prefix, s.is_param)
            if s.source_key is None:
                if s.is_param:
                    missing.append(s.key)
                continue
            if not hasattr(source, "shape"):
                continue
            got, want = source.shape(s.source_key), tuple(s.tensor.shape)
            stored = source.dtype(s.source_key)
            if got != want or (stored in FLOAT_DTYPES) != s.tensor.is_floating_point():
                kind = "" if stored in FLOAT_DTYPES else "an integer tensor "
                raise FalqonError(f"{source.where(s.source_key)} holds {s.source_key} as {kind}"
                                  f"{list(got)}, but the model its config.json describes has "
                                  f"{list(want)}: the checkpoint does not match its config")
            if stored.startswith("F8") and s.tensor.element_size() != 1:
                raise FalqonError(f"{source.where(s.source_key)} holds {s.source_key} in FP8 "
                                  f"({stored}): a quantised checkpoint; meld needs the "
                                  f"high-precision (bf16, fp16 or fp32) weights")
    if missing:
        raise FalqonError(f"{source.where(None)} has no tensor {missing[0]}{_more(missing)}: it "
                          f"is not a checkpoint of the model its config.json describes")
    _warn_unused(model, groups, source)


def _warn_unused(model: nn.Module, groups, source) -> None:
    if not hasattr(source, "files"):
        return
    used = {s.source_key for _, slots in groups for s in slots}
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None)
              or []]
    unused = sorted(k for k in source.files if k not in used
                    and not any(p.search(k) for p in ignore))
    if unused:
        warnings.warn(f"{source.where(None)}: {len(unused)} tensor(s) that the model does not "
                      f"have were not loaded: {', '.join(unused[:3])}", stacklevel=3)


def _read_group(source, module: nn.Module, slots, device) -> list:
    return [None if s.source_key is None else
            source.read(s.source_key, module, s.attr, tuple(s.tensor.shape), s.tensor.dtype,
                        device) for s in slots]


def _place(source, s: _Slot, raw, device) -> torch.Tensor:
    """The slot's tensor on the device in the model's dtype, checked to be finite."""
    if raw is None:  # a buffer the source does not hold: as the model built it
        return s.tensor.to(device)
    value = raw.to(device=device, dtype=s.tensor.dtype if raw.is_floating_point() else raw.dtype)
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise FalqonError(f"{source.where(s.source_key)} has non-finite weights: "
                          f"{s.source_key} holds NaN or inf")
    return value


def _as_linear(module: nn.Linear, values: dict) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear.weight = nn.Parameter(values["weight"], requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(values["bias"], requires_grad=False)
    return linear


def _install(module: nn.Module, slots, values: dict, loaded: dict) -> None:
    for s in slots:
        value = values[s.attr]
        if not s.is_param:
            module._buffers[s.attr] = value
            continue
        if id(s.tensor) not in loaded:
            loaded[id(s.tensor)] = nn.Parameter(value, requires_grad=s.tensor.requires_grad)
        module._parameters[s.attr] = loaded[id(s.tensor)]  # tied slots share one Parameter


def _move_rest(model: nn.Module, device: torch.device) -> None:
    """Buffers outside the state dict (RoPE's frequencies) to the device; nothing left on meta."""
    for name, module in model.named_modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.device.type == "meta":
                raise ValueError(f"falqon.loading: buffer {name}.{key} is on the meta device: "
                                 f"build the model with falqon.loading.empty_model (its buffers, "
                                 f"such as RoPE's frequencies, are computed for real)")
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)
        for key, p in module._parameters.items():
            if p is not None and p.device.type == "meta":
                raise RuntimeError(f"falqon.loading: {name}.{key} was not loaded")


@torch.no_grad()
def load_layerwise(model: nn.Module, source, device, convert: dict | None = None,
                   progress: bool = True, on_tensor: Callable | None = None,
                   desc: str = "falqon load") -> nn.Module:
    """Fill `model`, built on the meta device (empty_model), from `source` (weight_sources), one
    module at a time in state-dict order. A module named in `convert` (an nn.Linear) is handed,
    its weights loaded on `device`, to convert[name](linear), whose result replaces it, and its
    weights are dropped before the next module is read. on_tensor(key, tensor) sees every
    state-dict entry in order, as loaded (before any conversion). Checks every tensor's presence
    and shape before reading any; on an error the model is emptied back to the meta device."""
    device, convert = torch.device(device), convert or {}
    groups = _groups(model)
    _resolve(model, groups, source)
    total = sum(s.tensor.numel() * s.tensor.element_size() for _, slots in groups for s in slots
                if s.source_key is not None)
    from tqdm.auto import tqdm

    loaded: dict[int, nn.Parameter] = {}
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress)
    pool = ThreadPoolExecutor(1) if source.threadsafe else None
    read = (lambda i: pool.submit(_read_group, source, model.get_submodule(groups[i][0]),
                                  groups[i][1], device)) if pool else None
    try:
        ahead = read(0) if pool and groups else None
        for i, (name, slots) in enumerate(groups):
            module = model.get_submodule(name)
            raws = ahead.result() if pool else _read_group(source, module, slots, device)
            ahead = read(i + 1) if pool and i + 1 < len(groups) else None
            values = {}
            for s, raw in zip(slots, raws):
                values[s.attr] = loaded[id(s.tensor)] if id(s.tensor) in loaded else \
                    _place(source, s, raw, device)
                if on_tensor is not None:
                    on_tensor(s.key, values[s.attr])
                bar.update(s.tensor.numel() * s.tensor.element_size() if raw is not None else 0)
            raws = None
            if name in convert:
                _replace(model, name, convert[name](_as_linear(module, values)))
            else:
                _install(module, slots, values, loaded)
            values = None  # a converted layer's high-precision weights go here
        _move_rest(model, device)
    except BaseException:
        raws = values = None
        model.to("meta")  # nothing half-loaded: the device memory goes with the exception
        raise
    finally:
        bar.close()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return model


def _skeleton_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _meld_build(model, source, config, device, progress, verbose, on_tensor, who):
    todo, skipped = plan(model, config, loaded=False)
    if not todo:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped[:3]) or "it has no nn.Linear layers"
        raise ValueError(f"{who}: no layer can be melded ({reasons})")
    before = _skeleton_bytes(model)
    def meld_as(name):
        return lambda linear: MeldedLinear.from_linear(linear, **meld_kwargs(config, name))

    load_layerwise(model, source, _device(device), {name: meld_as(name) for name in todo},
                   progress, on_tensor, desc="falqon load+meld")
    summary = _finish(model, config, skipped, before)
    model.eval()  # as from_pretrained leaves a model
    if verbose:
        print(summary)
    return model


def _check_config(who: str, config) -> FalqonConfig:
    config = FalqonConfig() if config is None else config
    if not isinstance(config, FalqonConfig):
        raise TypeError(f"{who}: config must be a FalqonConfig, got {type(config).__name__}")
    return config


def meld_pretrained(path, config: FalqonConfig | None = None, *, device=None,
                    dtype: torch.dtype = torch.bfloat16, model_class=None,
                    progress: bool = True, verbose: bool = True,
                    on_tensor: Callable | None = None) -> nn.Module:
    """A melded model from a local transformers checkpoint directory (config.json and
    model.safetensors or sharded safetensors with model.safetensors.index.json), built without
    ever holding the whole high-precision model: each layer is read from the memory-mapped files,
    moved to `device` (default: cuda if available) in `dtype`, and melded (falqon.meld's layers,
    rules and summary) before the next is read. Layers meld skips load as they are. Returns the
    model (AutoModelForCausalLM unless model_class) in eval mode, as from_pretrained does.

    Errors name the file: a missing, truncated or corrupt shard, a tensor missing or of another
    shape than config.json gives, a NaN or Inf weight (FalqonError; ValueError for a config that
    melds no layer). Nothing is read before the headers are checked, and an error mid-way leaves
    no half-loaded model. on_tensor(key, tensor) sees each base weight as loaded."""
    who = "falqon.meld_pretrained"
    config = _check_config(who, config)
    directory = pathlib.Path(path)
    if not (directory / "config.json").is_file():
        raise FalqonError(f"{directory} is not a transformers model directory (no config.json)")
    from transformers import AutoConfig

    try:
        model = empty_model(AutoConfig.from_pretrained(str(directory)), dtype, model_class)
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 (transformers raises many types for a bad config)
        what = "causal LM" if model_class is None else model_class.__name__
        raise FalqonError(f"{directory} is not a loadable {what}: {_first_line(exc)}") from None
    source = CheckpointWeights(directory)
    try:
        return _meld_build(model, source, config, device, progress, verbose, on_tensor, who)
    finally:
        source.close()


def meld_from_config(model_config, config: FalqonConfig | None = None, *, device=None,
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0, model_class=None,
                     progress: bool = True, verbose: bool = True) -> nn.Module:
    """A melded model of a transformers config with seeded random weights made on `device`,
    layer by layer as meld_pretrained loads them (normal(0, initializer_range) for linear and
    embedding weights, ones for norms): a model larger than any checkpoint the disk could hold,
    for benchmarks. The same seed gives the same weights on the same device."""
    config = _check_config("falqon.meld_from_config", config)
    std = getattr(model_config, "initializer_range", None) or 0.02
    return _meld_build(empty_model(model_config, dtype, model_class), RandomWeights(std, seed),
                       config, device, progress, verbose, None, "falqon.meld_from_config")


__all__ = ["dtype_kwarg", "empty_model", "load_layerwise", "meld_from_config", "meld_pretrained"]
