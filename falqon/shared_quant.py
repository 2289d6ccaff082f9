"""Projections that read the same input share its FP8 quantisation.

In transformers' LLaMA, Qwen2 and Mistral (eager, or with Liger's SwiGLU) the attention calls
q_proj, k_proj and v_proj on one hidden_states tensor, and the MLP calls gate_proj and up_proj on
one x. A melded layer quantises its input itself (per row in the adapter mode where
falqon.ops.row_scales_supported, one pass over x; per tensor otherwise, one pass for its amax and
one for the cast), so that x would be quantised three and two times. Instead, the melded layers
of one model share an InputQuantCache (falqon.meld, from_pretrained, meld_pretrained and
meld_from_config set it up): a layer with current scaling asks it for x's quantisation, which it
makes with torch.ops.falqon.quantize_rows or quantize the first time and hands out again while
the same tensor object comes back unchanged (same _version, same dtype and kind to quantise),
and passes it to torch.ops.falqon.melded_linear (input_fp8, input_scale). The results are
bit-identical to each layer quantising x; the backward is unchanged (nothing more is saved).

The cache holds one entry: a weak reference to the input (it never keeps x alive), its version and
the FP8 tensor and scale. It is skipped, and the op quantises x as before, under CUDA graph
capture (each layer of a captured graph quantises its input itself), for delayed-scaling layers
(amax_history), for inference-mode tensors (which have no version counter to tell an in-place
change), and in eager everywhere unless FALQON_SHARED_QUANT=1 (read once per process). Under
torch.compile the cache is not used and no switch is needed: each current-scaling layer calls
the quantise op on its input itself and AOTAutograd's common-subexpression elimination
leaves one call per distinct input in the compiled graph (q/k/v one, gate/up one; tested in
tests/test_shared_quant.py), with no host cost.
The eager cache is off by default: its GPU tests pass, but two A/B runs of the fused LLaMA-7B
step on an H200 disagree (0.469 s with it against 0.424 s without in run 54, 0.416 against 0.422
in run 59); profiled (run 58), its quantise kernels take 8.7 ms less a step and the GPU waits
13 ms longer on the host (benchmarks/NOTES.md).
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor, nn

from .config import env_switch

ENV = "FALQON_SHARED_QUANT"
_E4M3 = torch.float8_e4m3fn


@functools.cache
def enabled() -> bool:
    """FALQON_SHARED_QUANT: 1/true/yes/on share; unset, empty, 0/false/no/off do not. Off by
    default: the A/B runs on the GPU disagree (benchmarks/NOTES.md, runs 54 and 59). Read once per
    process (enabled.cache_clear() re-reads it)."""
    return env_switch(ENV, False)


class InputQuantCache:
    """The last input's E4M3 quantisation, (q, scale) as torch.ops.falqon.quantize or
    quantize_rows returns it, keyed on the input tensor object (a weak reference), its _version,
    the dtype quantised and the kind (per row or per tensor).
    One entry: a miss drops it before quantising the new input. Copies and pickles of a model
    get an empty cache (shared again by the copied layers: deepcopy's memo keeps one)."""

    __slots__ = ("_entry", "__weakref__")

    def __init__(self):
        self._entry = None  # (weakref to the key, its _version, dtype, shape, rows, q, scale)

    def quantized(self, key: Tensor, x: Tensor, rows: bool = False) -> tuple[Tensor, Tensor]:
        """(q, scale) of x, the tensor the layer multiplies: x is `key` or, under autocast, key
        converted to the autocast dtype; per row (quantize_rows) or per tensor (quantize).
        Served from the entry when key is the same object, not changed in place since (its
        _version), x has the entry's dtype and shape and the entry is of the same kind."""
        entry = self._entry  # one read: a concurrent store replaces the whole tuple
        if entry is not None and entry[0]() is key and entry[1] == key._version and \
                entry[2] == x.dtype and entry[3] == x.shape and entry[4] == rows:
            return entry[5], entry[6]
        self._entry = None  # free the old FP8 tensor before making the new one
        q, scale = quantize_input(x, rows)
        self._entry = (weakref.ref(key), key._version, x.dtype, x.shape, rows, q, scale)
        return q, scale

    def clear(self) -> None:
        self._entry = None

    def __deepcopy__(self, memo) -> "InputQuantCache":
        return InputQuantCache()

    def __reduce__(self):
        return (InputQuantCache, ())

    def __repr__(self) -> str:
        return f"InputQuantCache({'empty' if self._entry is None else 'one entry'})"


def quantize_input(x: Tensor, rows: bool) -> tuple[Tensor, Tensor]:
    """x's E4M3 quantisation as MeldedLinear makes it with current scaling: per row (the adapter
    mode where the device allows, torch.ops.falqon.quantize_rows) or per tensor
    (torch.ops.falqon.quantize)."""
    op = torch.ops.falqon.quantize_rows if rows else torch.ops.falqon.quantize
    return op.default(x.detach(), _E4M3)


def use_shared(layer, key: Tensor) -> InputQuantCache | None:
    """The layer's cache if this call may use it: current scaling, outside torch.compile's
    tracing and CUDA graph capture, not an inference-mode tensor, FALQON_SHARED_QUANT not 0.
    Else None (the op quantises x itself)."""
    if torch.compiler.is_compiling():
        return None
    cache = getattr(layer, "_shared_quant", None)  # (absent on a layer unpickled from before)
    if cache is None or layer.amax_history is not None or key.is_inference() or not enabled():
        return None
    # A captured graph must quantise its inputs itself: an entry made before the capture would
    # be read from a buffer that replays never rewrite (the static input changes between them).
    if key.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    return cache


def share_input_quantization(model: nn.Module) -> InputQuantCache | None:
    """Give every MeldedLinear of `model` one InputQuantCache (replacing any it had); returns it,
    or None when the model has no melded layer."""
    from .modules import MeldedLinear

    layers = [m for m in model.modules() if isinstance(m, MeldedLinear)]
    if not layers:
        return None
    cache = InputQuantCache()
    for layer in layers:
        layer._shared_quant = cache
    return cache


__all__ = ["ENV", "InputQuantCache", "enabled", "quantize_input", "share_input_quantization",
           "use_shared"]
