"""Saving and loading melded models (save_pretrained / from_pretrained, PEFT's pair) and the
training state that makes a resumed run bit-identical to an uninterrupted one.

A falqon checkpoint directory holds
  falqon_model.safetensors  per melded layer: `<name>.weight_scale`, `<name>.lora_B`, with
                            delayed scaling (amax_history_len > 0) `<name>.amax_history`, and
                            the FP8 weight as the "weights" layout of the JSON says:
                              "adapter" (the adapter mode, format version 2): `<name>.adapter_A`,
                                only A's FP8 rows (rank x in_features). W never changes in that
                                mode, so from_pretrained re-derives its FP8 rows from the base
                                model (checking that it quantises at the saved scale, bit for
                                bit): an adapter-sized checkpoint.
                              "full" (the proxy mode, and every version-1 checkpoint):
                                `<name>.weight`, the whole FP8 [W; A; 0], which training updates;
  falqon_config.json        the format version, the weights layout, the FalqonConfig, the
                            proxy-update counters, the melded layers' shapes, the skipped layers
                            and the byte size of every file (a truncated file is caught before it
                            is parsed). It is written last, so a directory without it is an
                            unfinished save.
A training checkpoint (save_training_checkpoint: a loop of one's own; `falqon finetune` wrote
these before it trained on the Hugging Face Trainer) adds
  training_state.safetensors  the optimizer state's tensors and the torch RNG states;
  trainer_state.json          the optimizer's hyper-parameters, step, data position, Python's RNG
                              state and whatever the loop adds.
Everything is safetensors or JSON: no pickles.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import ops, update_guard
from .config import FalqonConfig, FalqonError
from .convert import (SUMMARY_ATTR, _finish, _replace, empty_melded_like, melded_config,
                      melded_layers, melded_summary, model_memory)
from .merge import dense_dtype
from .modules import MeldedLinear
from .training import proxy_state

MODEL_FILE = "falqon_model.safetensors"
CONFIG_FILE = "falqon_config.json"
TRAINING_FILE = "training_state.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
FORMAT = "falqon-checkpoint"
FORMAT_VERSION = 2  # 2: the "weights" layout; version 1 stored every weight ("full")
WEIGHTS_LAYOUTS = ("full", "adapter")


# ---- small file helpers -------------------------------------------------------------------------

def atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Put a finished directory in place of `final` by rename. Whatever stood there is renamed
    aside first and removed last, so a kill at any moment leaves `final` whole (old or new) or,
    between the two renames, the old one beside it as `<final>.old`."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)


def _save_tensors(tensors: dict[str, torch.Tensor], path: pathlib.Path) -> int:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return path.stat().st_size


def check_files(directory: pathlib.Path, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        f = directory / name
        if not f.is_file():
            raise FalqonError(f"checkpoint {directory} is incomplete: {name} is missing")
        if f.stat().st_size != size:
            raise FalqonError(f"checkpoint {directory} is truncated or corrupt: {name} has "
                              f"{f.stat().st_size} bytes, the checkpoint recorded {size}")


def _load_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise FalqonError(f"checkpoint file {path} cannot be read ({exc})") from None


def read_json(path: pathlib.Path, what: str) -> dict:
    """A JSON object from `path`, or FalqonError naming `what` the directory should have been."""
    if not path.is_file():
        raise FalqonError(f"{path.parent} is not a {what}: {path.name} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FalqonError(f"{path} is truncated or corrupt: {exc}") from None
    if not isinstance(data, dict):
        raise FalqonError(f"{path} is corrupt: expected a JSON object")
    return data


# ---- the melded model ---------------------------------------------------------------------------

def weights_layout(config: FalqonConfig) -> str:
    """What a checkpoint of a model melded with `config` stores of each layer's FP8 weight:
    "adapter" (the adapter mode, whose W never changes: only A's rows, W is re-derived from the
    base model at load) or "full" (the proxy mode, whose training updates W)."""
    return "adapter" if config.update_mode == "adapter" else "full"


def _layer_tensors(name: str, layer: MeldedLinear, layout: str) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds of one melded layer."""
    tensors = {}
    if layout == "full":
        tensors[f"{name}.weight"] = layer.weight
    else:  # A's FP8 rows, as bytes: the padding rows are zeros and W comes from the base model
        tensors[f"{name}.adapter_A"] = layer.weight[layer.out_features:
                                                    layer.out_features + layer.rank]
    tensors[f"{name}.weight_scale"] = layer.weight_scale
    tensors[f"{name}.lora_B"] = layer.lora_B
    if layer.lora_A is not None:  # train_a: the master copy (A's FP8 rows are its image)
        tensors[f"{name}.lora_A"] = layer.lora_A
    if layer.amax_history is not None:
        tensors[f"{name}.amax_history"] = layer.amax_history
    return tensors


def save_pretrained(model: nn.Module, path) -> None:
    """Write the melded layers' trained state, the FalqonConfig and the proxy-update counters to
    the directory `path` (safetensors + JSON). Per layer: lora_B, weight_scale, the amax history
    (delayed scaling) and, in the adapter mode, only A's FP8 rows (an adapter-sized checkpoint:
    W never changes and from_pretrained re-derives it from the base model), in the proxy mode the
    whole FP8 [W; A; 0]. The rest of the model is the frozen base model, which from_pretrained
    takes as its first argument."""
    layers = melded_layers(model)
    config = melded_config(model)
    if not layers or config is None:
        raise ValueError("falqon.save_pretrained: the model was not melded by falqon.meld")
    update_guard.check_before_write(model, "save_pretrained")
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    stale = directory / CONFIG_FILE  # the config marks a complete save: remove it while writing
    if stale.exists():
        stale.unlink()
    layout = weights_layout(config)
    tensors = {}
    for name, layer in layers:
        tensors.update(_layer_tensors(name, layer, layout))
    size = _save_tensors(tensors, directory / MODEL_FILE)
    atomic_write_text(directory / CONFIG_FILE,
                       json.dumps(_checkpoint_meta(model, config, layers, layout, size), indent=2))


def _checkpoint_meta(model: nn.Module, config: FalqonConfig, layers, layout: str,
                     size: int) -> dict:
    try:
        skipped = melded_summary(model).skipped
    except ValueError:
        skipped = []
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "weights": layout,
        "config": config.to_dict(),
        "state": proxy_state(model).to_dict(),
        "layers": {name: {"in_features": layer.in_features, "out_features": layer.out_features,
                          "rank": layer.rank, "bias": layer.bias is not None,
                          "lora_dtype": str(layer.lora_B.dtype).removeprefix("torch.")}
                   for name, layer in layers},
        "skipped": [list(s) for s in skipped],
        "base_model": {"class": type(model).__name__,
                       "name_or_path": getattr(getattr(model, "config", None), "_name_or_path",
                                               None),
                       "dtype": str(dense_dtype(model)).removeprefix("torch.")},
        "files": {MODEL_FILE: size},
    }


def read_checkpoint_meta(path) -> dict:
    """The JSON of a falqon checkpoint, checked for format and file sizes."""
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FalqonError(f"{directory} is not a falqon checkpoint directory")
    meta = read_json(directory / CONFIG_FILE, "falqon checkpoint")
    if meta.get("format") != FORMAT:
        raise FalqonError(f"{directory / CONFIG_FILE} is not a falqon checkpoint")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise FalqonError(f"{directory} was written by a newer falqon (format "
                          f"{meta.get('format_version')}); upgrade falqon")
    if meta.get("weights", "full") not in WEIGHTS_LAYOUTS:
        raise FalqonError(f"{directory / CONFIG_FILE} is corrupt: weights is "
                          f"{meta.get('weights')!r}, expected one of {WEIGHTS_LAYOUTS}")
    check_files(directory, meta.get("files", {}))
    return meta


def _parse_meta(meta: dict, directory: pathlib.Path) -> tuple[FalqonConfig, dict, str]:
    """(config, layers' JSON, weights layout) of a checkpoint's JSON."""
    try:
        # Checkpoints written before the adapter mode existed were all the proxy mode's, and those
        # written before adapter_gain existed trained the adapter with gain 1.
        config = FalqonConfig.from_dict({"update_mode": "proxy", "adapter_gain": 1.0,
                                         **meta["config"]})
        layers_meta = dict(meta["layers"])
        for info in layers_meta.values():
            for key in ("in_features", "out_features", "rank"):
                int(info[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise FalqonError(f"{directory / CONFIG_FILE} is corrupt: {exc}") from None
    return config, layers_meta, meta.get("weights", "full")  # version 1 stored every weight


def _lora_dtype(module: nn.Module, info: dict) -> torch.dtype:
    """The dtype lora_B gets: the melded layer's own, else the checkpoint's."""
    if isinstance(module, MeldedLinear):
        return module.lora_B.dtype
    dtype = getattr(torch, str(info.get("lora_dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise FalqonError(f"the checkpoint's JSON is corrupt: lora_dtype "
                          f"{info.get('lora_dtype')!r} is not a torch dtype")
    return dtype


def _expected_tensors(info: dict, config: FalqonConfig, layout: str,
                      lora_dtype: torch.dtype) -> dict[str, tuple[tuple, torch.dtype]]:
    """{key: (shape, dtype)} of the tensors a checkpoint holds of one layer."""
    n, k, r = info["out_features"], info["in_features"], info["rank"]
    out = {"weight": ((n + ops.padded_rank(r), k), ops.E4M3)} if layout == "full" else \
        {"adapter_A": ((r, k), ops.E4M3)}
    out.update(weight_scale=((), torch.float32), lora_B=((n, r), lora_dtype))
    if config.amax_history_len:
        out["amax_history"] = ((2, config.amax_history_len), torch.float32)
    if config.train_a:
        out["lora_A"] = ((r, k), torch.float32)
    return out


def _check_module(base_model: nn.Module, name: str, info: dict, config: FalqonConfig,
                  directory: pathlib.Path) -> nn.Module:
    """The model's layer `name`, checked against the checkpoint's description of it."""
    try:
        module = base_model.get_submodule(name)
    except AttributeError:
        raise FalqonError(f"{directory} holds layer {name}, which the model does not have: "
                          f"is it the checkpoint's base model?") from None
    shape = (module.in_features, module.out_features) if isinstance(
        module, (nn.Linear, MeldedLinear)) else None
    if shape != (info["in_features"], info["out_features"]):
        raise FalqonError(f"{directory} holds layer {name} as {info['in_features']} -> "
                          f"{info['out_features']} but the model's is "
                          f"{type(module).__name__} {shape}: is it the checkpoint's base "
                          f"model?")
    if isinstance(module, MeldedLinear):
        for what, ours, theirs in (("rank", module.rank, info["rank"]),
                                   ("amax_history_len", module.amax_history_len,
                                    config.amax_history_len),
                                   ("update_mode", module.update_mode, config.update_mode),
                                   ("train_a", module.lora_A is not None, config.train_a),
                                   ("adapter_gain", module.adapter_gain,
                                    config.adapter_gain if config.update_mode == "adapter"
                                    else 1.0)):
            if ours != theirs:
                raise FalqonError(f"layer {name} has {what} {ours}, the checkpoint {theirs}")
    return module


def _check_tensors(tensors: dict, name: str, expected: dict, directory: pathlib.Path) -> None:
    for key, (shape, dtype) in expected.items():
        src = tensors.get(f"{name}.{key}")
        if src is None or tuple(src.shape) != shape or src.dtype != dtype:
            got = "missing" if src is None else f"{tuple(src.shape)} {src.dtype}"
            raise FalqonError(f"checkpoint {directory} is corrupt: {name}.{key} is {got}, "
                              f"expected {shape} {dtype}")


def base_scale(module: nn.Module) -> torch.Tensor:
    """The scale at which the adapter mode melded this layer's W: its weight_scale if the layer
    is melded already, else falqon.quantize's scale of its weight, amax(W) / 448 (quantising the
    one value amax(W) gives that scale with the op's numerics, without a copy of W)."""
    if isinstance(module, MeldedLinear):
        return module.weight_scale
    low, high = torch.aminmax(module.weight.detach())
    return ops.quantize(torch.maximum(-low, high).reshape(1), ops.E4M3)[1]


def _check_base(module: nn.Module, name: str, saved_scale: torch.Tensor) -> None:
    """An adapter-sized checkpoint's base check: the base model's W quantises at the scale the
    checkpoint's layer was trained at, bit for bit."""
    weight = module.weight
    if not isinstance(module, MeldedLinear) and (
            weight.device.type == "meta" or
            weight.dtype not in (torch.float32, torch.float16, torch.bfloat16)):
        raise FalqonError(f"layer {name} of the base model has a {weight.dtype} weight on "
                          f"{weight.device}: the checkpoint needs the base model's float weights "
                          f"(loaded, not on the meta device) to re-derive its FP8 weights")
    ours = base_scale(module).detach().to("cpu", torch.float32).reshape(())
    theirs = saved_scale.to(torch.float32).reshape(())
    if not torch.equal(ours.view(torch.int32), theirs.view(torch.int32)):
        raise FalqonError(f"the base model's weights differ from the checkpoint's base: layer "
                          f"{name} quantises at scale {ours.item()!r} (amax(W) / 448), the "
                          f"checkpoint's at {theirs.item()!r}; load it into the model it was "
                          f"melded from (the same weights and dtype)")


@torch.no_grad()
def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.dtype.is_floating_point and dst.element_size() == 1:  # FP8: copy the bytes
        dst.view(torch.uint8).copy_(src.view(torch.uint8))
    else:
        dst.copy_(src)


@torch.no_grad()
def _load_layer(base_model: nn.Module, name: str, module: nn.Module, info: dict,
                config: FalqonConfig, tensors: dict, layout: str) -> None:
    """Install the checkpoint's layer `name` into the model (checked by _check_module,
    _check_tensors and, for an adapter-sized checkpoint, _check_base)."""
    if isinstance(module, MeldedLinear):
        layer = module
    else:
        layer = empty_melded_like(module, config)
        layer.lora_B.data = layer.lora_B.data.to(_lora_dtype(module, info))
        if layout == "adapter":  # W's FP8 rows, as meld quantised them (no SVD)
            q, _ = ops.quantize(module.weight.detach(), ops.E4M3)
            _copy_into(layer.weight[:layer.out_features], q)
        _replace(base_model, name, layer)
    n, r = layer.out_features, layer.rank
    for key in _expected_tensors(info, config, layout, layer.lora_B.dtype):
        src = tensors[f"{name}.{key}"]
        if key == "adapter_A":
            _copy_into(layer.weight[n:n + r], src)
            layer.weight[n + r:].view(torch.uint8).zero_()
        else:
            _copy_into(getattr(layer, key), src)
    layer.refresh_weight_t()
    if layer.lora_A is not None:
        # A's rows as the next forward of the saved run would have had them (its image of
        # lora_A), whether or not the save came before that run synchronised them
        layer.sync_adapter_A()


@torch.no_grad()
def from_pretrained(base_model: nn.Module, path) -> nn.Module:
    """Load a falqon checkpoint into `base_model` (the model it was melded from, or one already
    melded with the same layers), in place; returns the model, ready to train or export.

    An adapter-sized checkpoint (the adapter mode's) re-derives each layer's FP8 W from the base
    model's weight (falqon.quantize, as meld did; no SVD) after checking that it quantises at the
    checkpoint's scale bit for bit, and writes A's rows back. Every check runs before the model
    is changed: a FalqonError leaves it as it was."""
    directory = pathlib.Path(path)
    meta = read_checkpoint_meta(directory)
    config, layers_meta, layout = _parse_meta(meta, directory)
    previous = getattr(base_model, SUMMARY_ATTR, None)
    memory_before = previous.memory_before if previous is not None else model_memory(base_model)
    tensors = _load_tensors(directory / MODEL_FILE)
    extra = sorted({n for n, _ in melded_layers(base_model)} - set(layers_meta))
    if extra:
        raise FalqonError(f"the model has melded layers that {directory} does not hold: "
                          f"{', '.join(extra[:3])}")
    modules = {}
    for name, info in layers_meta.items():
        module = modules[name] = _check_module(base_model, name, info, config, directory)
        _check_tensors(tensors, name, _expected_tensors(info, config, layout,
                                                        _lora_dtype(module, info)), directory)
        if layout == "adapter":
            _check_base(module, name, tensors[f"{name}.weight_scale"])
    for name, module in modules.items():
        _load_layer(base_model, name, module, layers_meta[name], config, tensors, layout)
    _finish(base_model, config, [tuple(s) for s in meta.get("skipped", [])], memory_before)
    state = proxy_state(base_model)
    state.step = int(meta.get("state", {}).get("step", 0))
    state.skipped_steps = int(meta.get("state", {}).get("skipped_steps", 0))
    return base_model


# ---- the training state (optimizer, RNG, loop counters) -----------------------------------------

def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, JSON) of an optimizer's state_dict."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = meta["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            len(g["params"]) != len(h["params"]) for g, h in zip(groups, optimizer.param_groups)):
        raise FalqonError("the checkpoint's optimizer state does not fit this optimizer (a "
                          "different set of trainable parameters)")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))


def save_training_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path,
                             trainer_state: dict) -> None:
    """A resumable checkpoint: the melded model, the optimizer and RNG states and the loop's
    counters. Written to a temporary directory renamed into place, so `path` is either the old
    checkpoint or the complete new one."""
    final = pathlib.Path(path)
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(model, tmp)
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    rng_tensors, rng_meta = rng_state()
    size = _save_tensors({**opt_tensors, **rng_tensors}, tmp / TRAINING_FILE)
    state = {**trainer_state, "optimizer": opt_meta, "rng": rng_meta,
             "files": {TRAINING_FILE: size}}
    atomic_write_text(tmp / TRAINER_STATE_FILE, json.dumps(state, indent=1))
    replace_dir(tmp, final)


def read_trainer_state(path) -> dict:
    directory = pathlib.Path(path)
    state = read_json(directory / TRAINER_STATE_FILE, "falqon training checkpoint")
    check_files(directory, state.get("files", {}))
    return state


def load_training_checkpoint(model: nn.Module, optimizer_factory, path):
    """Load a checkpoint written by save_training_checkpoint: the melded layers go into `model`
    (melded or not), then `optimizer_factory(model)` builds the optimizer whose state is
    restored, and the RNG states are set. Returns (model, optimizer, trainer_state)."""
    directory = pathlib.Path(path)
    state = read_trainer_state(directory)
    read_checkpoint_meta(directory)  # size checks of the model file before anything is loaded
    tensors = _load_tensors(directory / TRAINING_FILE)
    model = from_pretrained(model, directory)
    optimizer = optimizer_factory(model)
    try:
        optimizer_from_flat(optimizer, tensors, state["optimizer"])
        set_rng_state(tensors, state["rng"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise FalqonError(f"checkpoint {directory} is corrupt: {exc}") from None
    return model, optimizer, state


__all__ = ["CONFIG_FILE", "MODEL_FILE", "atomic_write_text", "check_files", "from_pretrained", "load_training_checkpoint",
           "read_checkpoint_meta", "read_trainer_state", "save_pretrained",
           "save_training_checkpoint"]
