"""benchmarks/model.py's peer methods: each turns a freshly built bf16 model into the model it
trains (PEFT LoRA on the bf16 base, QLoRA NF4 through bitsandbytes, LoRA over torchao float8
bases, eager or with torch.compile'd bases). model.py's docstring says what each measures."""

from __future__ import annotations

import pathlib
import sys

import torch

if __package__ in (None, ""):  # imported with benchmarks/ on sys.path, as model.py is
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import common
    import model_build
else:
    from . import common, model_build

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_modules(model) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]


def _peft_lora(model, args):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(PROJECTIONS),
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    # autocast_adapter_dtype=True keeps the adapters in float32 (PEFT's default, used with
    # torch.autocast); False leaves them in the model's bf16 (--lora-dtype).
    peft_model = get_peft_model(model, cfg, autocast_adapter_dtype=args.lora_dtype == "float32")
    wrapped = sum(1 for _, m in projection_modules(peft_model) if hasattr(m, "lora_A"))
    expected = 7 * args.layers
    if wrapped != expected:
        raise RuntimeError(f"PEFT put LoRA on {wrapped} projections, expected {expected}")
    return peft_model


def setup_bf16_lora(model, args, info):
    return _peft_lora(model, args)


def setup_qlora_nf4(model, args, info):
    bnb = common.import_bitsandbytes()
    info["bitsandbytes"] = bnb.__version__
    for name, linear in projection_modules(model):
        # Params4bit quantises (NF4, blockwise, with double quantisation of the absmax) when moved
        # to a device; the bf16 weight is dropped with `linear`.
        q = model_build.nf4_linear(bnb, linear)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
        del linear
    # PEFT dispatches its bitsandbytes LoRA layer only for models flagged as loaded in 4 bit.
    model.is_loaded_in_4bit = True
    peft_model = _peft_lora(model, args)
    base = [m.get_base_layer() for _, m in projection_modules(peft_model) if hasattr(m, "lora_A")]
    if not all(isinstance(b, bnb.nn.Linear4bit) for b in base):
        raise RuntimeError("PEFT did not keep the Linear4bit base layers")
    return peft_model


def setup_fp8_lora_torchao_eager(model, args, info, compile_base: bool = False):
    convert_to_float8_training = common.import_torchao_float8()
    import torchao
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    info["torchao"] = torchao.__version__
    if args.device.type != "cuda" or torch.cuda.get_device_capability(args.device) < (8, 9):
        raise common.Skip("torchao float8 training needs a CUDA GPU with FP8 (compute capability "
                          ">= 8.9)")

    # The swap goes first, on the bare model, so that only the 7 frozen base projections become
    # Float8Linear; PEFT then wraps them (Float8Linear is an nn.Linear, so PEFT's default LoRA
    # layer takes it) and its adapters stay plain bf16 nn.Linear.
    def is_projection(module, fqn: str) -> bool:
        return fqn.rsplit(".", 1)[-1] in PROJECTIONS

    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=is_projection)
    peft_model = _peft_lora(model, args)
    wrapped = [m for _, m in projection_modules(peft_model) if hasattr(m, "lora_A")]
    if not all(isinstance(m.get_base_layer(), Float8Linear) for m in wrapped):
        raise RuntimeError("PEFT did not keep the Float8Linear base layers")
    if compile_base:
        # As benchmarks/layer.py does: torch.compile fuses torchao's casts, and drops the frozen
        # weight's gradient GEMM (dead code there). Same-shaped layers share compiled code; the
        # limit is raised so that dynamo never falls back to eager on recompiles.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        for m in wrapped:
            m.base_layer = torch.compile(m.base_layer, dynamic=False)
    return peft_model


def setup_fp8_lora_torchao(model, args, info):
    return setup_fp8_lora_torchao_eager(model, args, info, compile_base=True)


__all__ = ["PROJECTIONS", "projection_modules", "setup_bf16_lora", "setup_fp8_lora_torchao",
           "setup_fp8_lora_torchao_eager", "setup_qlora_nf4"]
