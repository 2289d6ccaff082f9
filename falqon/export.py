"""falqon.export: the trained model as a Hugging Face checkpoint in compressed-tensors'
"float-quantized" format, which vLLM and transformers load directly.

The melded model is already FP8: each melded layer's weight is W_q = W'_q[:N] (float8_e4m3fn)
with its per-tensor scale s, so the export writes those bytes as they are (no post-training
quantisation) next to a `weight_scale` of shape (1,), and declares in config.json one quantisation
group: weights FP8 per tensor, symmetric, static; input activations FP8, dynamic, per tensor (what
the training forward did) or per token. The adapter rows A and the proxy buffer B are not exported:
every update B has carried is already in W_q. Layers that were not melded (lm_head, skipped layers)
are listed in `ignore` and written in the model's dtype.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib

import torch
from safetensors.torch import save_file
from torch import nn

from .config import FalqonError
from .convert import melded_layers

WEIGHTS_FILE = "model.safetensors"
ACTIVATION_STRATEGIES = ("tensor", "token", None)


def quantization_config(ignore: list[str], activations: str | None = "tensor") -> dict:
    """The compressed-tensors quantization_config of a FALQON export."""
    if activations not in ACTIVATION_STRATEGIES:
        raise ValueError(f"falqon.export: activations must be one of {ACTIVATION_STRATEGIES}, got "
                         f"{activations!r}")
    weights = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
               "dynamic": False}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None,
             "output_activations": None}
    if activations is not None:
        group["input_activations"] = {"num_bits": 8, "type": "float", "strategy": activations,
                                      "symmetric": True, "dynamic": True}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as the export writes them: FP8 weights and their scales for the melded
    layers, everything else as it is; tensors shared between names (tied embeddings) once."""
    melded = dict(melded_layers(model))
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in melded:
            layer = melded[owner]
            if leaf == "weight":
                value = layer.weight[:layer.out_features]
            elif leaf == "weight_scale":
                value = layer.weight_scale.reshape(1)
            elif leaf != "bias":
                continue  # lora_B, weight_t: training-only
        ident = (value.device, value.data_ptr(), tuple(value.shape), value.dtype)
        if value.numel() and ident in seen:
            continue  # a tied weight: transformers re-ties it from the config on load
        seen.add(ident)
        out[key] = value.detach().contiguous().cpu()
    return out


def export(model: nn.Module, path, tokenizer=None, activations: str | None = "tensor") -> None:
    """Write `model` (melded, a transformers PreTrainedModel) to the directory `path` as a
    compressed-tensors FP8 checkpoint: config.json, model.safetensors, and the tokenizer if one
    is given. Load it with transformers' from_pretrained (compressed-tensors installed) or vLLM."""
    layers = melded_layers(model)
    if not layers:
        raise ValueError("falqon.export: the model has no MeldedLinear layers (call falqon.meld)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError("falqon.export needs a transformers model (one with a .config)")
    melded_names = {n for n, _ in layers}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
              and n not in melded_names]
    qconfig = quantization_config(ignore, activations)
    directory = pathlib.Path(path)
    if directory.exists() and not directory.is_dir():
        raise FalqonError(f"export path {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = export_state_dict(model)
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_FILE)
    out_config = copy.deepcopy(config)
    out_config.quantization_config = qconfig
    dense = [t.dtype for k, t in tensors.items() if t.is_floating_point() and t.element_size() > 1
             and not k.endswith("weight_scale")]
    if dense:  # the dtype of what is not FP8 (what the layers compute in after loading)
        out_config.dtype = max(set(dense), key=dense.count)
    out_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    with open(directory / "falqon_export.json", "w") as f:
        json.dump({"melded_layers": sorted(melded_names), "ignore": qconfig["ignore"],
                   "activations": activations}, f, indent=2)


__all__ = ["export", "export_state_dict", "quantization_config"]
