"""Python wrappers of torch.ops.falqon, their fake (meta) kernels and melded_linear's autograd.

The kernels live in csrc/: a CPU reference (csrc/reference.cpp) and CUDA kernels (csrc/cuda/).
Every op keeps its scales on the device and never synchronises with the host, so the ops work
under torch.compile(fullgraph=True) and inside CUDA graphs.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._extension import load as _load
from .config import env_switch
from .validation import input_quantization_problem, per_row_scale, scaling_ok

_load()

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The adapter's rows are padded with zeros to a multiple of this in the melded weight, so that the
# FP8 GEMM's row count and the leading dimension of its bf16 output stay 16-byte aligned.
ROW_ALIGN = 16

__all__ = [
    "E4M3", "E5M2", "FP8_MAX", "ROW_ALIGN", "padded_rank", "quantize", "quantize_rows",
    "quantize_delayed", "ROW_SCALES_ENV", "row_scales_supported",
    "record_amax_", "melded_linear", "melded_linear_grad_input", "melded_linear_backward",
    "meld_init", "topk_update_", "topk_update_many_",
]


def padded_rank(rank: int) -> int:
    """Rows the adapter A takes in a melded weight: rank rounded up to a multiple of ROW_ALIGN."""
    return -(-rank // ROW_ALIGN) * ROW_ALIGN


def quantize(input: Tensor, dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """Per-tensor FP8 quantisation: (q, scale), scale = amax / fmax (1 if amax == 0) as a float32
    device scalar and q = fp8(clamp(input * (1 / scale), -fmax, fmax)), the reciprocal rounded
    once to float32 (capped at its largest value)."""
    return torch.ops.falqon.quantize.default(input, dtype)


def quantize_rows(input: Tensor, dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """Row-wise FP8 quantisation: (q, scale) with one float32 scale per row of the last dimension
    (scale shaped input.shape[:-1]), scale[i] = amax(row i) / fmax (1 where that is 0), and q as
    `quantize` casts, each row at its own scale. An outlier then costs precision only in its own
    row (token). On CUDA one pass over the input. MeldedLinear's quantisation of x in the adapter
    mode where `row_scales_supported`."""
    return torch.ops.falqon.quantize_rows.default(input, dtype)


ROW_SCALES_ENV = "FALQON_ROW_SCALES"


def row_scales_supported(device: torch.device | str) -> bool:
    """Whether MeldedLinear quantises x per row (the adapter mode with current scaling) on
    `device`: where melded_linear runs a per-row quantisation without extra passes, i.e. the CPU
    (the reference), GPUs the op emulates (compute capability below 8.9, or
    FALQON_FORCE_EMULATION=1), and Hopper (9.0), where cuBLASLt's FP8 GEMMs take outer-vector
    scales. Elsewhere (Ada 8.9, Blackwell 10.x and 12.x) cuBLASLt has no such GEMM and the op
    would scale its output in two more passes, so x is quantised per tensor there.
    FALQON_ROW_SCALES=0 (read once per process) makes it per tensor everywhere, the adapter
    mode's quantisation before run 84 of benchmarks/NOTES.md (for A/B runs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _row_scales(-1)
    return _row_scales(device.index if device.index is not None else torch.cuda.current_device())


@torch.compiler.assume_constant_result  # a property of the device: a constant in compiled graphs
@functools.cache
def _row_scales(cuda_index: int) -> bool:
    """row_scales_supported for CUDA device cuda_index, or the CPU (-1)."""
    if not env_switch(ROW_SCALES_ENV, True):
        return False
    if cuda_index < 0 or env_switch("FALQON_FORCE_EMULATION", False):
        return True
    capability = torch.cuda.get_device_capability(cuda_index)
    return capability < (8, 9) or capability == (9, 0)


def quantize_delayed(input: Tensor, dtype: torch.dtype, amax_history: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tensor FP8 quantisation with a delayed scale (Transformer Engine's "delayed scaling"):
    (q, scale, amax). scale = max(amax_history) / fmax from the amaxes of previous calls (the
    input's own amax while the history holds nothing > 0, so a first call with a zero history
    is current scaling); values above that amax saturate at +-fmax. `amax` is the input's own
    amax (float32 0-d), for the caller to record with `record_amax_`. On CUDA one kernel reads
    the input once (casts it and reduces its amax) once the history holds a value."""
    return torch.ops.falqon.quantize_delayed.default(input, dtype, amax_history)


def record_amax_(history: Tensor, amax: Tensor) -> None:
    """Record `amax` (one float32 value) as the newest value (index 0) of a 1-D float32 amax
    history, in place, dropping the oldest: history = [amax, history[:-1]]. One kernel on CUDA,
    no host synchronisation."""
    torch.ops.falqon.record_amax_.default(history, amax)


def melded_linear(input: Tensor, weight: Tensor, weight_scale: Tensor, lora_B: Tensor,
                  bias: Tensor | None = None, weight_t: Tensor | None = None,
                  scaling: float = 1.0, grad_dtype: torch.dtype | None = None,
                  amax_history: Tensor | None = None, adapter: bool = False,
                  input_fp8: Tensor | None = None, input_scale: Tensor | None = None) -> Tensor:
    """y of a melded layer, from one FP8 GEMM against W' = [W; A; 0] (which also gives x A^T).

    adapter=False (the paper's proxy mode): y = x W^T + b. lora_B never enters the forward: it
    is the proxy buffer that `topk_update_` folds into the weight.
    adapter=True (the exact adapter mode): y = x W^T + b + scaling * (x A^T) B^T, B rounded to
    the activation dtype, fp32 sums, contiguous y; W' never changes.

    Autograd gives d input (an FP8 GEMM with the gradient in `grad_dtype`, E5M2 by default; in
    the adapter mode over every row of W' with the operand [g | scaling g B]), d lora_B =
    scaling * g^T (x A^T) in high precision, and d bias.

    amax_history: None (current scaling: each tensor's own amax) or a float32 (2, H) tensor for
    delayed scaling, row 0 for x and row 1 for the gradient. The op reads row 0; the backward
    reads row 1 and records the gradient's amax into it (`record_amax_`). Recording x's amax
    into row 0 is the caller's: this wrapper drops it, MeldedLinear records it.

    input_fp8, input_scale: x's quantisation as `quantize(input)` or `quantize_rows(input)`
    returns it (input_scale one value, or one per row shaped input.shape[:-1]), made by the
    caller; the op uses it instead of quantising x itself (per tensor), and returns input_scale *
    448 as x's amax (its third output), one per row for a per-row scale. Both or neither, and not
    with amax_history. For several layers that read the same x (q/k/v, gate/up), one
    quantisation; the results are bit-identical to the op given the same quantisation layer by
    layer. A per-row quantisation goes through cuBLASLt's outer-vector scaling (Hopper; see
    `row_scales_supported`). The gradients are unchanged: dx still flows to `input`."""
    y, _, _ = torch.ops.falqon.melded_linear.default(input, weight, weight_scale, lora_B, bias,
                                                     weight_t, scaling, grad_dtype, amax_history,
                                                     adapter, input_fp8, input_scale)
    return y


def melded_linear_grad_input(grad_output: Tensor, weight: Tensor, weight_scale: Tensor,
                             weight_t: Tensor | None = None,
                             grad_dtype: torch.dtype | None = None,
                             amax_history: Tensor | None = None,
                             lora_B: Tensor | None = None, scaling: float = 1.0,
                             rank: int | None = None) -> Tensor:
    """dx = fp8(g) W_q * s_g * s through the weight rows of a melded weight; with amax_history
    (the gradient's H values), g's scale is the delayed one. With lora_B (the adapter mode),
    dx = fp8(G) W'_q * s_G * s over every row of W', G = [g | scaling g B | 0] quantised as one
    tensor. rank: the adapter's rank, which says which rows of the weight are W; one of rank,
    lora_B and weight_t is required (a melded weight of R rows fits several (out_features, rank)
    pairs). The op also returns the amax of what it quantised:
    torch.ops.falqon.melded_linear_grad_input(...) -> (dx, g_amax)."""
    dx, _ = torch.ops.falqon.melded_linear_grad_input.default(grad_output, weight, weight_scale,
                                                              weight_t, grad_dtype, amax_history,
                                                              lora_B, scaling, rank)
    return dx


def melded_linear_backward(grad_output: Tensor, xa: Tensor, weight: Tensor, weight_scale: Tensor,
                           weight_t: Tensor | None = None, scaling: float = 1.0,
                           grad_dtype: torch.dtype | None = None,
                           amax_history: Tensor | None = None,
                           grad_B_dtype: torch.dtype | None = None,
                           lora_B: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Both gradients of a melded layer: (dx, dB, amax of g). dx as `melded_linear_grad_input`
    (lora_B: the adapter mode); dB = scaling * g^T xa with fp32 products and sums, rounded once
    to grad_B_dtype (xa's dtype by default). On CUDA one kernel reads g for its quantisation and
    for dB together."""
    return torch.ops.falqon.melded_linear_backward.default(
        grad_output, xa, weight, weight_scale, weight_t, scaling, grad_dtype, amax_history,
        grad_B_dtype, lora_B)


def meld_init(weight: Tensor, rank: int, svd: str = "randomized", oversample: int = 16,
              power_iters: int = 4, seed: int = 0, adapter_row_norm: float = 0.0
              ) -> tuple[Tensor, Tensor]:
    """(W'_q, s): the FP8 melded weight [W; A; 0] and its scale, A = sqrt(S_r) V_r^T from the
    rank-r SVD (`exact`, or `randomized` with the given oversampling and power iterations) of
    W's FP8 quantisation error. adapter_row_norm > 0 (the adapter mode) multiplies A by one
    factor so that its root-mean-square row norm is that value, capped so that A's amax stays at
    most W's (W' keeps W's scale)."""
    return torch.ops.falqon.meld_init.default(weight, rank, svd, oversample, power_iters, seed,
                                              adapter_row_norm)


def topk_update_(weight: Tensor, lora_B: Tensor, weight_t: Tensor | None, k: int, scaling: float,
                 keep_residual: bool = False) -> None:
    """Fold the k rows of lora_B with the largest L1 norm into the FP8 weight, in place:
    W'[T] = fp8(W'[T] + scaling * B[T] A_q) in the scaled domain, saturating. Then lora_B is
    zeroed (keep_residual=False, the published policy) or only its applied rows are."""
    torch.ops.falqon.topk_update_.default(weight, lora_B, weight_t, k, scaling, keep_residual)


def topk_update_many_(weights: list[Tensor], lora_Bs: list[Tensor],
                      weight_ts: list[Tensor | None] | None, ks: list[int],
                      scalings: list[float], keep_residuals: list[bool] | bool = False,
                      discard_nonfinite: bool = False) -> Tensor:
    """`topk_update_` of many layers at once, with exactly the per-layer op's results (layer i:
    weights[i], lora_Bs[i], weight_ts[i] or None, ks[i], scalings[i], keep_residuals[i]). On
    CUDA: four launches whatever the number of layers, no host synchronisation. Returns a bool
    tensor of one value per layer: whether its lora_B was finite before the update. With
    discard_nonfinite, a non-finite lora_B anywhere discards the whole step: no weight changes
    and every lora_B is zeroed (what ProxyUpdater does with such a step)."""
    if not len(weights):
        raise ValueError("falqon.topk_update_many_: no layers (weights is empty)")
    if weight_ts is None:
        weight_ts = [None] * len(weights)
    if isinstance(keep_residuals, bool):
        keep_residuals = [keep_residuals] * len(weights)
    if len(weight_ts) != len(weights):
        raise ValueError(f"falqon.topk_update_many_: weight_ts must have one entry (a tensor or "
                         f"None) per layer, got {len(weight_ts)} for {len(weights)} layers")
    present = [i for i, t in enumerate(weight_ts) if t is not None]
    return torch.ops.falqon.topk_update_many_.default(
        list(weights), list(lora_Bs), [weight_ts[i] for i in present], present, list(ks),
        [float(s) for s in scalings], [bool(b) for b in keep_residuals], discard_nonfinite)


# ---- fake kernels: shapes, dtypes and strides for torch.compile and meta tensors -------------
# Each makes the checks of its real kernel (csrc/checks.cpp) with the same messages, so that a bad
# call fails at trace time (and on meta tensors) as it would when run.

def _require(cond, message: str) -> None:
    torch._check(cond, lambda: message)


def _check_scaling(op: str, scaling) -> None:
    _require(scaling_ok(scaling), f"falqon.{op}: scaling (alpha / rank) must be a finite number "
                                  f"> 0, got {scaling!r}")


def _check_activation(op: str, name: str, t: Tensor) -> None:
    _require(t.dtype in _ACTIVATION_DTYPES,
             f"falqon.{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_lora_B(op: str, lora_B: Tensor) -> None:
    _require(lora_B.dim() == 2 and lora_B.shape[1] >= 1,
             f"falqon.{op}: lora_B must be (out_features, rank), got {tuple(lora_B.shape)}")
    _check_activation(op, "lora_B", lora_B)


def _check_weight(weight: Tensor, weight_scale: Tensor, out_features, rank, weight_t,
                  adapter: bool = False) -> None:
    """check_melded_weight and check_weight_scale; rank None: any padded rank (weight_t fixes N)."""
    _require(weight.dim() == 2 and weight.dtype == E4M3,
             f"falqon: the melded weight must be a 2-D float8_e4m3fn tensor, got "
             f"{tuple(weight.shape)} {weight.dtype}")
    K = weight.shape[1]
    _require(K % 16 == 0, f"falqon: in_features must be a multiple of 16 for FP8 GEMMs, got {K}")
    _require(out_features > 0 and out_features % 16 == 0,
             f"falqon: out_features must be a positive multiple of 16 for FP8 GEMMs, got "
             f"{out_features}")
    if rank is not None:
        rows = out_features + padded_rank(rank)
        _require(weight.shape[0] == rows,
                 f"falqon: a melded weight for {out_features} outputs and rank {rank} has {rows} "
                 f"rows (rank padded to a multiple of {ROW_ALIGN}), got {weight.shape[0]}")
    else:
        extra = weight.shape[0] - out_features
        _require(extra > 0 and extra % ROW_ALIGN == 0,
                 f"falqon: gradient has {out_features} features but the melded weight has "
                 f"{weight.shape[0]} rows; expected out_features plus the padded rank")
    if weight_t is not None:
        cols = weight.shape[0] if adapter else out_features
        _require(weight_t.dtype == E4M3 and weight_t.dim() == 2 and weight_t.shape[0] == K and
                 weight_t.shape[1] == cols,
                 f"falqon: weight_t must be the contiguous ({K}, {cols}) float8_e4m3fn transpose, "
                 f"got {tuple(weight_t.shape)} {weight_t.dtype}")
    if weight_scale is not None:
        _require(weight_scale.numel() == 1 and weight_scale.dtype == torch.float32,
                 f"falqon: weight_scale must be a single float32 value, got "
                 f"{weight_scale.numel()} values of {weight_scale.dtype}")


def _check_history(op: str, amax_history, rows: int | None) -> None:
    if amax_history is None:
        return
    shape_ok = amax_history.numel() >= 1 if rows is None else (
        amax_history.dim() == 2 and amax_history.shape[0] == rows and amax_history.shape[1] >= 1)
    _require(shape_ok and amax_history.dtype == torch.float32,
             f"falqon.{op}: amax_history must be a float32 tensor of at least one value "
             f"({'(2, H) for the layer' if rows else 'any shape'}), got "
             f"{tuple(amax_history.shape)} {amax_history.dtype}")


@torch.library.register_fake("falqon::quantize")
def _quantize_fake(input, dtype):
    _require(dtype in FP8_MAX, f"falqon.quantize: dtype must be torch.float8_e4m3fn or "
                               f"torch.float8_e5m2, got {dtype}")
    _check_activation("quantize", "input", input)
    q = torch.empty_like(input, dtype=dtype, memory_format=torch.contiguous_format)
    return q, input.new_empty((), dtype=torch.float32)


@torch.library.register_fake("falqon::quantize_rows")
def _quantize_rows_fake(input, dtype):
    q, _ = _quantize_fake(input, dtype)
    _require(input.dim() >= 1, "falqon.quantize_rows: the input needs a last dimension")
    return q, input.new_empty(input.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("falqon::quantize_delayed")
def _quantize_delayed_fake(input, dtype, amax_history):
    q, scale = _quantize_fake(input, dtype)
    _check_history("quantize_delayed", amax_history, None)
    return q, scale, input.new_empty((), dtype=torch.float32)


@torch.library.register_fake("falqon::melded_linear")
def _melded_linear_fake(input, weight, weight_scale, lora_B, bias=None, weight_t=None,
                        scaling=1.0, grad_dtype=None, amax_history=None, adapter=False,
                        input_fp8=None, input_scale=None):
    _check_scaling("melded_linear", scaling)
    _check_lora_B("melded_linear", lora_B)
    out_features, rank = lora_B.shape
    _check_weight(weight, weight_scale, out_features, rank, weight_t, adapter)
    _check_activation("melded_linear", "input", input)
    _require(input.dim() >= 1 and input.shape[-1] == weight.shape[1],
             f"falqon.melded_linear: input has {input.shape[-1] if input.dim() else 0} features "
             f"in its last dimension, the layer takes {weight.shape[1]}")
    if bias is not None:
        _require(bias.dim() == 1 and bias.shape[0] == out_features and bias.is_floating_point(),
                 f"falqon.melded_linear: bias must be a floating vector of {out_features} values, "
                 f"got {tuple(bias.shape)}")
    _check_history("melded_linear", amax_history, 2)
    problem = input_quantization_problem(input, input_fp8, input_scale, amax_history)
    _require(problem is None, problem or "")
    lead = input.shape[:-1]
    # x's amax as the op returns it: one per row where the caller's quantisation is per row.
    per_row = input_scale is not None and per_row_scale(input, input_scale)
    amax = input.new_empty(lead if per_row else (), dtype=torch.float32)
    if adapter:  # y is a new contiguous tensor (the adapter's GEMM writes it)
        return input.new_empty((*lead, out_features)), input.new_empty((*lead, rank)), amax
    # y is a view of the whole (..., N + r16) product, as the real kernels return it.
    product = input.new_empty((*lead, weight.shape[0]))
    return product[..., :out_features], input.new_empty((*lead, rank)), amax


def _check_grad_input(op, grad_output, weight, weight_scale, weight_t, grad_dtype, lora_B,
                      scaling, rank) -> None:
    """check_grad_input_args: lora_B, rank or weight_t must say which rows are W."""
    _check_scaling(op, scaling)
    _require(grad_dtype is None or grad_dtype in FP8_MAX,
             f"falqon.melded_linear_grad_input: grad_dtype must be an FP8 dtype, got {grad_dtype}")
    _check_activation("melded_linear_grad_input", "grad_output", grad_output)
    N = grad_output.shape[-1] if grad_output.dim() else 0
    if lora_B is not None:
        _check_lora_B("melded_linear_grad_input", lora_B)
        _require(lora_B.shape[0] == N, f"falqon.melded_linear_grad_input: lora_B has "
                                       f"{lora_B.shape[0]} rows but the gradient has {N} features")
        _require(rank is None or rank == lora_B.shape[1],
                 f"falqon.melded_linear_grad_input: lora_B has rank {lora_B.shape[1]} but rank is "
                 f"{rank}")
        rank = lora_B.shape[1]
    _require(rank is None or rank >= 1,
             f"falqon.melded_linear_grad_input: rank must be >= 1, got {rank}")
    _require(rank is not None or weight_t is not None,
             f"falqon.melded_linear_grad_input: pass the adapter's rank (or lora_B, or weight_t): "
             f"a melded weight of {weight.shape[0] if weight.dim() == 2 else 0} rows fits several "
             f"(out_features, rank) pairs, and the gradient's {N} features alone do not say "
             f"which rows are W")
    _check_weight(weight, weight_scale, N, rank, weight_t, lora_B is not None)


@torch.library.register_fake("falqon::melded_linear_grad_input")
def _grad_input_fake(grad_output, weight, weight_scale, weight_t=None, grad_dtype=None,
                     amax_history=None, lora_B=None, scaling=1.0, rank=None):
    _check_grad_input("melded_linear_grad_input", grad_output, weight, weight_scale, weight_t,
                      grad_dtype, lora_B, scaling, rank)
    _check_history("melded_linear_grad_input", amax_history, None)
    return (grad_output.new_empty((*grad_output.shape[:-1], weight.shape[1])),
            grad_output.new_empty((), dtype=torch.float32))


@torch.library.register_fake("falqon::melded_linear_backward")
def _backward_fake(grad_output, xa, weight, weight_scale, weight_t=None, scaling=1.0,
                   grad_dtype=None, amax_history=None, grad_B_dtype=None, lora_B=None):
    _require(xa.dim() >= 1 and xa.shape[-1] >= 1 and xa.dtype == grad_output.dtype,
             f"falqon.melded_linear_backward: xa must hold the rank's columns last, in the "
             f"gradient's dtype {grad_output.dtype}, got {tuple(xa.shape)} {xa.dtype}")
    _check_scaling("melded_linear_backward", scaling)
    N, r = grad_output.shape[-1] if grad_output.dim() else 0, xa.shape[-1]
    _check_grad_input("melded_linear_backward", grad_output, weight, weight_scale, weight_t,
                      grad_dtype, lora_B, scaling, r)
    _require(xa.numel() == (grad_output.numel() // N if N else 0) * r,
             f"falqon.melded_linear_backward: xa has {xa.numel() // r} rows, the gradient "
             f"{grad_output.numel() // N if N else 0}")
    _require(grad_B_dtype is None or grad_B_dtype in _ACTIVATION_DTYPES,
             f"falqon.melded_linear_backward: grad_B_dtype must be float32, float16 or bfloat16, "
             f"got {grad_B_dtype}")
    _check_history("melded_linear_backward", amax_history, None)
    return (grad_output.new_empty((*grad_output.shape[:-1], weight.shape[1])),
            xa.new_empty((N, r), dtype=grad_B_dtype or xa.dtype),
            grad_output.new_empty((), dtype=torch.float32))


@torch.library.register_fake("falqon::record_amax_")
def _record_amax_fake(amax_history, amax):
    _require(amax_history.dim() == 1 and amax_history.numel() >= 1 and
             amax_history.dtype == torch.float32,
             f"falqon.record_amax_: amax_history must be a contiguous 1-D float32 tensor of at "
             f"least one value, got {tuple(amax_history.shape)} {amax_history.dtype}")
    _require(amax.numel() == 1 and amax.dtype == torch.float32,
             f"falqon.record_amax_: amax must be one float32 value, got {tuple(amax.shape)} "
             f"{amax.dtype}")
    return None


@torch.library.register_fake("falqon::meld_init")
def _meld_init_fake(weight, rank, svd="randomized", oversample=16, power_iters=4, seed=0,
                    adapter_row_norm=0.0):
    _require(weight.dim() == 2 and weight.dtype in _ACTIVATION_DTYPES,
             f"falqon.meld_init: weight must be a 2-D float32, float16 or bfloat16 tensor, got "
             f"{tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    _require(1 <= rank <= min(n, k), f"falqon.meld_init: rank must be between 1 and "
                                     f"min(out_features, in_features) = {min(n, k)}, got {rank}")
    rows = weight.shape[0] + padded_rank(rank)
    return (weight.new_empty((rows, weight.shape[1]), dtype=E4M3),
            weight.new_empty((), dtype=torch.float32))


@torch.library.register_fake("falqon::topk_update_")
def _topk_update_fake(weight, lora_B, weight_t, k, scaling, keep_residual=False):
    _check_scaling("topk_update_", scaling)
    _require(lora_B.dim() == 2 and lora_B.is_floating_point(),
             f"falqon.topk_update_: lora_B must be a floating (out_features, rank) matrix, got "
             f"{tuple(lora_B.shape)}")
    _require(k >= 0, f"falqon.topk_update_: k must be >= 0, got {k}")
    _check_weight(weight, None, lora_B.shape[0], lora_B.shape[1], weight_t)
    return None


@torch.library.register_fake("falqon::topk_update_many_")
def _topk_update_many_fake(weights, lora_Bs, weight_ts, weight_t_layers, ks, scalings,
                           keep_residuals, discard_nonfinite=False):
    L = len(weights)
    _require(L >= 1, "falqon.topk_update_many_: no layers (weights is empty)")
    _require(len(lora_Bs) == L and len(ks) == L and len(scalings) == L and
             len(keep_residuals) == L,
             f"falqon.topk_update_many_: weights, lora_Bs, ks, scalings and keep_residuals must "
             f"have one entry per layer, got {L}, {len(lora_Bs)}, {len(ks)}, {len(scalings)} and "
             f"{len(keep_residuals)}")
    _require(len(weight_ts) == len(weight_t_layers),
             f"falqon.topk_update_many_: weight_ts and weight_t_layers must have the same length, "
             f"got {len(weight_ts)} and {len(weight_t_layers)}")
    _require(all(0 <= i < L for i in weight_t_layers) and
             len(set(weight_t_layers)) == len(weight_t_layers),
             f"falqon.topk_update_many_: weight_t_layers must name distinct layers in [0, {L}), "
             f"got {list(weight_t_layers)}")
    weight_t = dict(zip(weight_t_layers, weight_ts))
    for i in range(L):
        try:
            _topk_update_fake(weights[i], lora_Bs[i], weight_t.get(i), ks[i], scalings[i])
        except RuntimeError as e:
            message = str(e).removeprefix("falqon.topk_update_: ").removeprefix("falqon: ")
            raise RuntimeError(f"falqon.topk_update_many_: layer {i}: {message}") from None
        _require(weights[i].device == weights[0].device,
                 f"falqon.topk_update_many_: layer {i} is on {weights[i].device} but layer 0 is on "
                 f"{weights[0].device}")
    return weights[0].new_empty((L,), dtype=torch.bool)


# ---- autograd of melded_linear ------------------------------------------------------------------

_MELDED_LINEAR_ARGS = 12  # the schema's arguments, for the dropped trailing defaults below


def _melded_linear_setup_context(ctx, inputs, output):
    # The dispatcher drops trailing arguments equal to their defaults: pad them back.
    defaults = (None, None, 1.0, None, None, False, None, None)
    inputs = tuple(inputs) + defaults[len(inputs) - 4:]
    (input, weight, weight_scale, lora_B, bias, weight_t, scaling, grad_dtype, amax_history,
     adapter, _input_fp8, _input_scale) = inputs
    _, xa, x_amax = output
    # x itself is not kept (nor its FP8 quantisation, passed in or made by the op): dx needs only
    # the FP8 weight (and, in the adapter mode, B), dB only x A^T (M x r).
    ctx.adapter = bool(adapter)
    ctx.save_for_backward(xa, weight, weight_scale, weight_t, lora_B if ctx.adapter else None)
    # The history is read and written by backward, and written between forward and backward (the
    # module records x's amax into row 0): held as an attribute, not a saved tensor, whose
    # version check would reject that legitimate in-place update.
    ctx.amax_history = amax_history
    ctx.scaling = scaling
    ctx.grad_dtype = grad_dtype
    ctx.lora_B_dtype = lora_B.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(x_amax)
    # Leave the gradient of an unused output (xa, always, for the module) as None rather than
    # materialising zeros that backward would multiply through.
    ctx.set_materialize_grads(False)


def _melded_linear_backward(ctx, grad_y, grad_xa, grad_amax):
    xa, weight, weight_scale, weight_t, adapter_B = ctx.saved_tensors
    # The dispatcher drops trailing arguments equal to their defaults (bias=None, weight_t=None,
    # ...) before autograd sees them, so needs_input_grad can be shorter than the schema.
    needs = tuple(ctx.needs_input_grad) + (False,) * _MELDED_LINEAR_ARGS
    needs_input, needs_B, needs_bias = needs[0], needs[3], needs[4]
    rank = xa.shape[-1]
    out_features = weight.shape[0] - padded_rank(rank)
    history = ctx.amax_history
    grad_input = grad_B = grad_bias = None
    if grad_y is not None:
        g = grad_y.reshape(-1, out_features)
        if needs_input and needs_B:
            # Both gradients in one op: on CUDA g is read once for its quantisation and for dB.
            B_dtype = (ctx.lora_B_dtype if ctx.lora_B_dtype in _ACTIVATION_DTYPES
                       else torch.float32)
            grad_input, grad_B, g_amax = torch.ops.falqon.melded_linear_backward.default(
                grad_y, xa, weight, weight_scale, weight_t, ctx.scaling, ctx.grad_dtype,
                None if history is None else history[1], B_dtype, adapter_B)
            grad_B = grad_B.to(ctx.lora_B_dtype)
        elif needs_input:
            grad_input, g_amax = torch.ops.falqon.melded_linear_grad_input.default(
                grad_y, weight, weight_scale, weight_t, ctx.grad_dtype,
                None if history is None else history[1], adapter_B, ctx.scaling, rank)
        elif needs_B:
            # dB = scaling * g^T (x A^T) alone (no input gradient): a small product, kept in high
            # precision (not FP8), in the activation dtype.
            grad_B = torch.mm(g.t(), xa.reshape(-1, rank)).to(ctx.lora_B_dtype).mul_(ctx.scaling)
        # Delayed scaling: g's scale came from row 1; its own amax is recorded there for the next
        # calls. Without an input gradient g is never quantised and nothing is recorded.
        if needs_input and history is not None:
            record_amax_(history[1], g_amax)
        if needs_bias:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
    if grad_xa is not None and needs_input:
        # xa = x A^T with A = s * A_q: only reached when a caller uses xa itself.
        a_real = weight[out_features:out_features + rank].to(grad_xa.dtype) * weight_scale.to(
            grad_xa.dtype)
        from_xa = grad_xa @ a_real
        grad_input = from_xa if grad_input is None else grad_input + from_xa
    return grad_input, None, None, grad_B, grad_bias, None, None, None, None, None, None, None


torch.library.register_autograd("falqon::melded_linear", _melded_linear_backward,
                                setup_context=_melded_linear_setup_context)


class _MeldedLinearFunction(torch.autograd.Function):
    """torch.ops.falqon.melded_linear with the autograd formula registered above, applied from
    the outside: the op then runs below autograd. torch.library's register_autograd wrapper
    costs tens of microseconds of Python a call (its fill_defaults is quadratic in the schema's 12
    arguments, pytorch/pytorch#195110), paid by every melded layer's forward and recompute; an
    autograd.Function pays none of it. Same setup_context, same backward, same numerics."""

    # forward(ctx, ...) rather than a setup_context staticmethod: with one, Function.apply binds
    # the arguments through inspect.signature on every call.
    @staticmethod
    def forward(ctx, *inputs):
        # Below autograd: the op's own (registered, Python) autograd kernel would only find no
        # gradient wanted here and redispatch, ~17 us of Python a call on the CPU (measured).
        with torch._C._AutoDispatchBelowAutograd():
            output = torch.ops.falqon.melded_linear.default(*inputs)
        _melded_linear_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_xa, grad_amax):
        return _melded_linear_backward(ctx, grad_y, grad_xa, grad_amax)


def melded_linear_call(input: Tensor, weight: Tensor, weight_scale: Tensor, lora_B: Tensor,
                       bias: Tensor | None, weight_t: Tensor | None, scaling: float,
                       grad_dtype: torch.dtype | None, amax_history: Tensor | None, adapter: bool,
                       input_fp8: Tensor | None = None, input_scale: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """torch.ops.falqon.melded_linear for MeldedLinear's forward: through _MeldedLinearFunction
    in eager mode (the cheap autograd boundary), the op itself under torch.compile (traced once,
    where the wrapper's cost is gone anyway, and with the registered formula AOTAutograd knows)."""
    inputs = (input, weight, weight_scale, lora_B, bias, weight_t, scaling, grad_dtype,
              amax_history, adapter, input_fp8, input_scale)
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return torch.ops.falqon.melded_linear.default(*inputs)
    return _MeldedLinearFunction.apply(*inputs)
