"""falqon.export: the trained model as a Hugging Face checkpoint that transformers, PEFT and vLLM
load directly, in one of three formats:

  "fp8+lora"  (the adapter mode's default) the FP8 base exactly as trained plus a PEFT LoRA
              adapter: `path` holds the base in compressed-tensors' "float-quantized" format (each
              melded layer's W_q = W'_q[:N], float8_e4m3fn, and its per-tensor scale: the bytes
              the training forward used, no re-quantisation) and `path/adapter/` the adapter
              (adapter_config.json, adapter_model.safetensors with lora_A = A, lora_B = B, in
              float32), so that base + adapter compute what the melded model computed.
                  base = AutoModelForCausalLM.from_pretrained(path)
                  model = peft.PeftModel.from_pretrained(base, path + "/adapter")
                  vllm serve path --enable-lora --lora-modules ft=path/adapter
  "fp8"       (the proxy mode's default, and its only FP8 format) one FP8 compressed-tensors
              checkpoint. Proxy mode: the trained FP8 bytes, which already hold every update.
              Adapter mode: W + scaling * B A re-quantised at a fresh per-tensor scale, which
              rounds small updates away again; the share of the update that survives is printed
              (falqon.merge's MergeReport) and recorded in falqon_export.json.
  "bf16"      the merged weights in the model's dense dtype (bf16 for a bf16 model), a plain
              checkpoint with no quantization_config that any stack loads.

The compressed-tensors config declares one quantisation group: weights FP8 per tensor, symmetric,
static; input activations FP8, dynamic, per token or per tensor, or none (`activations`; by
default what the training forward does on Hopper: per token in the adapter mode with current
scaling, which quantises x per row there, per tensor otherwise). Layers that were not melded
(lm_head, skipped layers) are listed in `ignore` and written in the model's dtype. The proxy
mode's B is never exported: it is not part of the forward (every update it carried is in W_q),
so "fp8+lora" is refused there.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib

import torch
from safetensors.torch import save_file
from torch import nn

from . import update_guard
from .config import FalqonError
from .convert import melded_layers
from .merge import MergeReport, dense_dtype, merged_dense, merged_fp8, update_mode_of, \
    update_stats

WEIGHTS_FILE = "model.safetensors"
EXPORT_INFO_FILE = "falqon_export.json"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ACTIVATION_STRATEGIES = ("tensor", "token", None)
AUTO = "auto"  # export's default activations: the training forward's quantisation of x
FORMATS = ("fp8+lora", "fp8", "bf16")
DEFAULT_FORMAT = {"adapter": "fp8+lora", "proxy": "fp8"}


def quantization_config(ignore: list[str], activations: str | None = "tensor") -> dict:
    """The compressed-tensors quantization_config of a FALQON FP8 export."""
    if activations not in ACTIVATION_STRATEGIES:
        raise ValueError(f"falqon.export: activations must be one of "
                         f"{(AUTO,) + ACTIVATION_STRATEGIES}, got {activations!r}")
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


def export_state_dict(model: nn.Module, weights: dict | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors as an export writes them; tensors shared between names (tied
    embeddings) once. Each melded layer gets `<name>.weight`, its bias and, for an FP8 weight,
    `<name>.weight_scale` of shape (1,): `weights[name]` = (weight, scale or None for a dense
    weight) where given, else its trained FP8 rows and scale. Training-only tensors (lora_B,
    weight_t, amax_history) are left out."""
    melded = dict(melded_layers(model))
    weights = weights or {}
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in melded:
            layer = melded[owner]
            weight, scale = weights.get(owner, (layer.weight[:layer.out_features],
                                                layer.weight_scale))
            if leaf == "weight":
                value = weight
            elif leaf == "weight_scale" and scale is not None:
                value = scale.reshape(1)
            elif leaf != "bias":
                continue
        ident = (value.device, value.data_ptr(), tuple(value.shape), value.dtype)
        if value.numel() and ident in seen:
            continue  # a tied weight: transformers re-ties it from the config on load
        seen.add(ident)
        out[key] = value.detach().contiguous().cpu()
    return out


def resolve_format(update_mode: str, format: str | None) -> str:
    """The export format for a model in `update_mode` (FalqonError for one it cannot have)."""
    if format is None:
        return DEFAULT_FORMAT[update_mode]
    if format not in FORMATS:
        raise FalqonError(f"falqon.export: format must be one of {FORMATS}, got {format!r}")
    if format == "fp8+lora" and update_mode == "proxy":
        raise FalqonError("falqon.export: format 'fp8+lora' needs update_mode='adapter'; in the "
                          "proxy mode B is not an adapter of the forward (every update it "
                          "carried was folded into the FP8 weights): export format 'fp8' (or "
                          "'bf16')")
    return format


def trained_activations(layers, mode: str) -> str:
    """How the training forward quantised the melded layers' inputs, as a compressed-tensors
    strategy: per row ("token") in the adapter mode with current scaling, else per tensor."""
    current = all(layer.amax_history is None for _, layer in layers)
    return "token" if mode == "adapter" and current else "tensor"


def _checked(model: nn.Module, path, format: str | None, activations) -> tuple:
    """(melded layers, update mode, format, directory, activations) after checking every input;
    activations AUTO resolved."""
    layers = melded_layers(model)
    if not layers:
        raise FalqonError("falqon.export: the model has no MeldedLinear layers (call falqon.meld)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise FalqonError("falqon.export needs a transformers model (one with a .config)")
    mode = update_mode_of(model, layers)
    format = resolve_format(mode, format)
    if activations == AUTO:
        activations = trained_activations(layers, mode)
    quantization_config([], activations)  # checks `activations`
    directory = pathlib.Path(path)
    if directory.exists() and not directory.is_dir():
        raise FalqonError(f"export path {directory} exists and is not a directory")
    return layers, mode, format, directory, activations


def _save_tensors(tensors: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _write_model(model: nn.Module, directory: pathlib.Path, tensors: dict[str, torch.Tensor],
                 qconfig: dict | None, tokenizer) -> None:
    """model.safetensors, config.json (with `qconfig` as its quantization_config, or none),
    generation_config.json and the tokenizer, into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    _save_tensors(tensors, directory / WEIGHTS_FILE)
    out_config = copy.deepcopy(model.config)
    if qconfig is not None:
        out_config.quantization_config = qconfig
    elif hasattr(out_config, "quantization_config"):
        del out_config.quantization_config
    dense = [t.dtype for k, t in tensors.items() if t.is_floating_point() and t.element_size() > 1
             and not k.endswith("weight_scale")]
    if dense:  # the dtype of what is not FP8 (what the layers compute in after loading)
        out_config.dtype = max(set(dense), key=dense.count)
    out_config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def adapter_config(model: nn.Module, layers, base_model_name_or_path: str) -> dict:
    """The PEFT LoraConfig (adapter_config.json) of the melded layers' adapters: r, lora_alpha
    and target_modules (the layers' leaf names) as PEFT and vLLM read them. Linear layers that
    share a leaf name with a target but were not melded go into exclude_modules."""
    ranks = {layer.rank for _, layer in layers}
    alphas = {layer.alpha for _, layer in layers}
    if len(ranks) != 1 or len(alphas) != 1:
        raise FalqonError(f"falqon.export: the melded layers differ in rank {sorted(ranks)} or "
                          f"alpha {sorted(alphas)}; one PEFT adapter needs one of each")
    names = {name for name, _ in layers}
    targets = sorted({name.rpartition(".")[2] for name in names})
    others = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                    and n not in names and n.rpartition(".")[2] in targets)
    archs = list(getattr(model.config, "architectures", None) or []) + [type(model).__name__]
    alpha = alphas.pop()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if any(a.endswith("ForCausalLM") for a in archs) else None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "inference_mode": True, "r": ranks.pop(),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    if others:
        config["exclude_modules"] = others
    return config


@torch.no_grad()
def adapter_state_dict(layers) -> dict[str, torch.Tensor]:
    """PEFT's tensors of the melded layers' adapters, float32: base_model.model.<name>.lora_A.weight
    = A (rank x in_features) and .lora_B.weight = adapter_gain * B (out_features x rank): PEFT
    scales by lora_alpha / r alone, so the gain goes into B."""
    out = {}
    for name, layer in layers:
        out[f"base_model.model.{name}.lora_A.weight"] = layer.adapter_A(torch.float32).cpu()
        out[f"base_model.model.{name}.lora_B.weight"] = \
            layer.lora_B.detach().to(torch.float32).mul(layer.adapter_gain).contiguous().cpu()
    return out


def _write_adapter(model: nn.Module, layers, directory: pathlib.Path, base: pathlib.Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _save_tensors(adapter_state_dict(layers), directory / ADAPTER_WEIGHTS_FILE)
    config = adapter_config(model, layers, str(base.resolve()))
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _merged_weights(layers, format: str, dtype: torch.dtype) -> tuple[dict, MergeReport]:
    """{name: (weight, scale or None)} of the merged layers for format "fp8" or "bf16", and the
    MergeReport of that merge."""
    report = MergeReport("fp8" if format == "fp8" else "bf16", layers[0][1].update_mode)
    weights = {}
    for name, layer in layers:
        if format == "fp8":
            q, scale = merged_fp8(layer)
            weights[name] = (q, scale)
            merged = q.to(torch.float32) * scale
        else:
            merged = merged_dense(layer, "bf16", dtype)
            weights[name] = (merged, None)
        report.layers[name] = update_stats(layer, merged)
    return weights, report


def export(model: nn.Module, path, tokenizer=None, activations: str | None = AUTO,
           format: str | None = None, verbose: bool = True) -> MergeReport | None:
    """Write `model` (melded, a transformers PreTrainedModel) to the directory `path` in `format`
    ("fp8+lora", "fp8" or "bf16"; None: "fp8+lora" in the adapter mode, "fp8" in the proxy
    mode; see the module's doc): config.json, model.safetensors, generation_config.json,
    falqon_export.json, the tokenizer if one is given and, for "fp8+lora", the PEFT adapter in
    path/adapter. `activations` ("tensor", "token" or None) is the FP8 formats' input activation
    quantisation; "auto" (the default) is the training forward's: "token" in the adapter mode
    with current scaling (x quantised per row), "tensor" otherwise. The model is not modified.
    Returns the MergeReport of the formats that merge the adapter into the weights in the
    adapter mode ("fp8", "bf16"; printed with verbose=True for "fp8"), else None."""
    layers, mode, format, directory, activations = _checked(model, path, format, activations)
    update_guard.check_before_write(model, "falqon.export")
    melded_names = {n for n, _ in layers}
    weights = report = None
    if format == "bf16" or (format == "fp8" and mode == "adapter"):
        weights, report = _merged_weights(layers, format, dense_dtype(model))
        if mode != "adapter":
            report = None  # the proxy mode's forward has no adapter update to measure
    qconfig = None
    if format != "bf16":
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                  and n not in melded_names]
        qconfig = quantization_config(ignore, activations)
    _write_model(model, directory, export_state_dict(model, weights), qconfig, tokenizer)
    if format == "fp8+lora":
        _write_adapter(model, layers, directory / ADAPTER_DIR, directory)
    info = {"format": format, "update_mode": mode, "melded_layers": sorted(melded_names),
            "ignore": qconfig["ignore"] if qconfig else None,
            "activations": activations if qconfig else None,
            "adapter": ADAPTER_DIR if format == "fp8+lora" else None,
            "merge": report.to_dict() if report is not None else None}
    (directory / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2))
    if verbose and report is not None and format == "fp8":
        print(report)
    return report


__all__ = ["ADAPTER_DIR", "FORMATS", "adapter_config", "adapter_state_dict", "export",
           "export_state_dict", "quantization_config", "resolve_format"]
