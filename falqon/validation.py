"""The validation rules of a melded layer's options, shared by FalqonConfig, MeldedLinear and the
ops' fake kernels (falqon.ops), so that a bad value fails the same way wherever it enters:
at construction, with one ValueError naming the option, never later inside torch or in backward.
The C++ checks (csrc/checks.cpp) apply the same rules to the ops' arguments (check_scaling)."""

from __future__ import annotations

import math

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max
LORA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Where the adapter mode's frozen A comes from (FalqonConfig.adapter_init, falqon.adapter_init).
ADAPTER_INITS = ("error_svd", "random", "weight_svd")


def check_int(who: str, name: str, value, minimum: int | None) -> int:
    """An integer (bool refused) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{who}: {name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{who}: {name} must be >= {minimum}, got {value}")
    return value


def scaling_ok(scaling) -> bool:
    """The ops' rule for the adapter's scaling alpha / rank: finite, > 0, a float32 value."""
    return isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and \
        math.isfinite(scaling) and 0 < scaling <= FLOAT32_MAX


def check_alpha(who: str, alpha, rank: int) -> float | None:
    """LoRA alpha: None (alpha = rank) or a finite number > 0 whose scaling alpha / rank the
    kernels can hold in float32."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or \
            not math.isfinite(alpha) or not alpha > 0 or not scaling_ok(alpha / rank):
        raise ValueError(f"{who}: alpha must be a positive finite number or None, got {alpha!r}")
    return float(alpha)


def check_adapter_gain(who: str, value) -> float:
    """The adapter mode's output gain (FalqonConfig.adapter_gain): a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not value > 0 or not scaling_ok(float(value)):
        raise ValueError(f"{who}: adapter_gain must be a positive finite number, got {value!r}")
    return float(value)


def check_adapter_init(who: str, value, update_mode: str) -> str:
    """One of ADAPTER_INITS; anything but "error_svd" only in the adapter mode."""
    if not isinstance(value, str) or value not in ADAPTER_INITS:
        raise ValueError(f"{who}: adapter_init must be one of {ADAPTER_INITS}, got {value!r}")
    if value != "error_svd" and update_mode != "adapter":
        raise ValueError(f"{who}: adapter_init={value!r} needs update_mode='adapter' (the proxy "
                         f"mode folds B A into W and keeps the paper's 'error_svd' A)")
    return value


def check_lora_dtype(who: str, dtype) -> torch.dtype:
    if dtype not in LORA_DTYPES:
        raise ValueError(f"{who}: lora_dtype must be torch.float32, torch.float16 or "
                         f"torch.bfloat16, got {dtype!r}")
    return dtype


def check_layer_options(who: str, rank, alpha, topk, amax_history_len) -> float | None:
    """rank >= 1, alpha (check_alpha), topk >= 0, amax_history_len >= 0; returns alpha."""
    check_int(who, "rank", rank, 1)
    check_int(who, "topk", topk, 0)
    check_int(who, "amax_history_len", amax_history_len, 0)
    return check_alpha(who, alpha, rank)


def per_row_scale(input, input_scale) -> bool:
    """Whether a caller's input_scale is quantize_rows' (one per row of x: shaped input.shape[:-1],
    at least one dimension) rather than quantize's single value (csrc/checks.cpp per_row_scale)."""
    return input.dim() >= 1 and input_scale.dim() >= 1 and input_scale.shape == input.shape[:-1]


def input_quantization_problem(input, input_fp8, input_scale, amax_history) -> str | None:
    """melded_linear's caller-supplied quantisation of x (csrc/checks.cpp
    check_input_quantization, the same messages): why it is refused, or None. input_fp8 a
    float8_e4m3fn tensor of the input's shape and device, input_scale float32 on that device, one
    value (quantize) or one per row of x (quantize_rows), both or neither, and neither with
    amax_history (delayed scaling quantises x itself)."""
    if input_fp8 is None and input_scale is None:
        return None
    op = "falqon.melded_linear"
    if input_fp8 is None or input_scale is None:
        return (f"{op}: input_fp8 and input_scale go together (x's quantisation as "
                f"falqon.quantize or falqon.quantize_rows returns it), got only "
                f"{'input_fp8' if input_scale is None else 'input_scale'}")
    if amax_history is not None:
        return (f"{op}: input_fp8 and input_scale cannot be combined with amax_history (delayed "
                f"scaling quantises x itself)")
    if input_fp8.dtype != torch.float8_e4m3fn or input_fp8.shape != input.shape:
        return (f"{op}: input_fp8 must be a float8_e4m3fn tensor of the input's shape "
                f"{list(input.shape)}, got {list(input_fp8.shape)} {input_fp8.dtype}")
    if input_fp8.device != input.device:
        return f"{op}: input_fp8 is on {input_fp8.device} but the input is on {input.device}"
    if input_scale.dtype != torch.float32 or not (input_scale.numel() == 1 or
                                                  per_row_scale(input, input_scale)):
        return (f"{op}: input_scale must be float32, a single value (quantize) or one per row of "
                f"the input, shaped {list(input.shape[:-1])} (quantize_rows); got shape "
                f"{list(input_scale.shape)} {input_scale.dtype}")
    if input_scale.device != input.device:
        return f"{op}: input_scale is on {input_scale.device} but the input is on {input.device}"
    return None


__all__ = ["ADAPTER_INITS", "FLOAT32_MAX", "LORA_DTYPES", "check_adapter_gain",
           "check_adapter_init", "check_alpha", "check_int", "check_layer_options",
           "check_lora_dtype", "input_quantization_problem", "per_row_scale", "scaling_ok"]
