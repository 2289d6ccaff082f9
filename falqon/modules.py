"""MeldedLinear: a frozen linear layer and its LoRA adapter as one FP8 matrix (FALQON)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops, trained_a
from .adapter_init import meld_weight
from .config import TRAINED_A_DIVISOR, UPDATE_MODES, default_adapter_gain
from .shared_quant import quantize_input, use_shared
from .validation import (check_adapter_gain, check_adapter_init, check_int, check_layer_options,
                         check_lora_dtype)

_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The adapter mode's A: rescaled at meld time to the root-mean-square row norm of a PEFT LoRA A
# (kaiming_uniform_(a=sqrt(5)): each of the in_features entries uniform in +-1/sqrt(in_features),
# variance 1/(3 in_features), so a row's expected squared norm is 1/3), so that an Adam step on
# B moves the output as much as it would in a fresh LoRA; the adapter gain (config.ADAPTER_GAIN)
# stands in for the growth of LoRA's trained A. Larger A values would hit the cap at amax(W).
ADAPTER_ROW_NORM = 3 ** -0.5


def check_meldable(in_features: int, out_features: int, rank: int) -> str | None:
    """Why a layer of these dimensions cannot be melded at this rank, or None if it can."""
    if in_features % 16 or out_features % 16:
        return (f"FP8 GEMMs need in_features and out_features to be multiples of 16, got "
                f"{in_features} -> {out_features}")
    if not 1 <= rank <= min(in_features, out_features):
        return (f"rank must be between 1 and min(in_features, out_features) = "
                f"{min(in_features, out_features)}, got {rank}")
    return None


def is_sharded(t: Tensor) -> bool:
    """A DTensor (FSDP2's fully_shard shards the layer's parameters into them)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


class MeldedLinear(nn.Module):
    """A linear layer whose frozen weight W and LoRA adapter A are one FP8 E4M3 matrix [W; A; 0],
    so that one FP8 GEMM gives x W^T and x A^T together.

    update_mode:
      "adapter" (default): y = x W^T + b + scaling * (x A^T) B^T. B is a real LoRA adapter (A
                    frozen: LoRA-FA with FALQON's A), trained in fp32 (lora_dtype) and never
                    folded into the FP8 weights during training, so every step's update counts;
                    W' never changes. A is rescaled at meld time to a LoRA A's row norm
                    (ADAPTER_ROW_NORM) and scaling = adapter_gain * alpha / rank (adapter_gain:
                    config.ADAPTER_GAIN by default) so that LoRA's learning rates carry over.
                    train_a=True trains A too (falqon.trained_a: an fp32 `lora_A`, its FP8
                    image written into A's rows after each optimizer step).
      "proxy":      the paper's method: y = x W^T + b; B never enters the forward and after each
                    optimizer step `proxy_update()` folds its `topk` largest rows into W'
                    (updates under half an E4M3 step round away).

    Parameters and buffers:
      weight        (out_features + padded_rank(rank), in_features) float8_e4m3fn: [W; A; 0],
                    frozen; the model's weight is rows [0, out_features) times weight_scale.
      weight_scale  float32 scalar: the one per-tensor scale of `weight`.
      lora_B        (out_features, rank), trainable. Its gradient is scaling * g^T (x A^T) in
                    both modes.
      lora_A        with train_a: (rank, in_features) float32, trainable, TRAINED_A_DIVISOR
                    times the A the layer applies (its FP8 rows in `weight`); else None.
      a_range       with train_a: float32 scalar, the largest |A| / E4M3 max its rows were
                    written with (above 1: saturated; falqon.trained_a); not saved.
      weight_t      optional persistent transpose for the input gradient: of the weight rows
                    (proxy mode) or of every row of `weight` (adapter mode).
      amax_history  with amax_history_len = H > 0: float32 (2, H), the amaxes of the last H
                    inputs (row 0) and output gradients (row 1), newest first, zeros at the
                    start; persistent (saved with the state dict). None with H = 0.
      bias          the original bias, frozen, or None.

    amax_history_len: 0 (default) is current scaling, the paper's method: x and g are each
    quantised with their own amax (per tensor, two passes over it; in the adapter mode on Hopper
    and the CPU x per row, one pass: falqon.ops.quantize_rows, row_scales_supported). H > 0 is
    delayed scaling
    (Transformer Engine's): x and g are quantised with max(amax of the last H calls) / fmax,
    values above it saturate, in one pass that also reduces the tensor's own amax; in training
    mode the forward records x's amax into row 0 and the backward g's into row 1 (only when it
    computes an input gradient). While a row holds only zeros, that tensor gets current scaling.
    Gradient checkpointing recomputes the forward, which records x twice per step: harmless for
    a maximum over H calls (it shortens the window by one step). The proxy update does not
    touch the history.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 16,
                 alpha: float | None = None, topk: int = 10, bias: bool = False,
                 keep_residual: bool = False, grad_dtype: torch.dtype = ops.E5M2,
                 transposed_copy: bool = False, device=None, dtype: torch.dtype | None = None,
                 lora_dtype: torch.dtype = torch.float32, amax_history_len: int = 0,
                 update_mode: str = "adapter", adapter_gain: float | None = None,
                 train_a: bool = False):
        super().__init__()
        # The rules FalqonConfig applies (falqon.validation), before anything is allocated.
        alpha = check_layer_options("MeldedLinear", rank, alpha, topk, amax_history_len)
        check_lora_dtype("MeldedLinear", lora_dtype)
        check_int("MeldedLinear", "in_features", in_features, 1)
        check_int("MeldedLinear", "out_features", out_features, 1)
        problem = check_meldable(in_features, out_features, rank)
        if problem:
            raise ValueError(f"MeldedLinear: {problem}")
        if update_mode not in UPDATE_MODES:
            raise ValueError(f"MeldedLinear: update_mode must be one of {UPDATE_MODES}, got "
                             f"{update_mode!r}")
        self.update_mode = update_mode
        if not isinstance(train_a, bool) or (train_a and update_mode != "adapter"):
            raise ValueError(f"MeldedLinear: train_a must be True or False, and True only with "
                             f"update_mode='adapter', got {train_a!r} with {update_mode!r}")
        if adapter_gain is None:
            adapter_gain = default_adapter_gain(train_a)
        if grad_dtype not in ops.FP8_MAX:
            raise ValueError(f"MeldedLinear: grad_dtype must be an FP8 dtype, got {grad_dtype}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha = float(rank if alpha is None else alpha)
        # The adapter mode's output gain (ADAPTER_GAIN); the proxy mode folds B A unscaled by it.
        self.adapter_gain = (check_adapter_gain("MeldedLinear", adapter_gain)
                             if update_mode == "adapter" else 1.0)
        self.scaling = self.adapter_gain * self.alpha / rank
        self.topk, self.keep_residual, self.grad_dtype = topk, keep_residual, grad_dtype
        rows = out_features + ops.padded_rank(rank)
        self.weight = nn.Parameter(torch.zeros(rows, in_features, device=device, dtype=ops.E4M3),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones((), device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=lora_dtype))
        self.lora_A = (nn.Parameter(torch.zeros(rank, in_features, device=device,
                                                dtype=torch.float32)) if train_a else None)
        self.register_buffer("a_range", torch.zeros((), device=device, dtype=torch.float32)
                             if train_a else None, persistent=False)
        self._a_synced = None if self.lora_A is None else self.lora_A._version
        self._a_synced_by_hook = False  # falqon.attach's hook rewrites A's rows after each step
        t_cols = rows if update_mode == "adapter" else out_features
        self.register_buffer(
            "weight_t",
            torch.zeros(in_features, t_cols, device=device, dtype=ops.E4M3)
            if transposed_copy else None)
        self.register_buffer(
            "amax_history",
            torch.zeros(2, amax_history_len, device=device, dtype=torch.float32)
            if amax_history_len else None)
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                  requires_grad=False) if bias else None)
        # The model's InputQuantCache (falqon.shared_quant), which falqon.meld and the loaders set
        # up: layers that read the same x (q/k/v, gate/up) quantise it once. None: this layer's
        # op quantises x itself.
        self._shared_quant = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int = 16, alpha: float | None = None,
                    topk: int = 10, keep_residual: bool = False,
                    grad_dtype: torch.dtype = ops.E5M2, transposed_copy: bool = False,
                    svd: str = "randomized", oversample: int = 16, power_iters: int = 4,
                    seed: int = 0, lora_dtype: torch.dtype = torch.float32,
                    amax_history_len: int = 0, update_mode: str = "adapter",
                    adapter_gain: float | None = None,
                    adapter_init: str = "error_svd", train_a: bool = False) -> "MeldedLinear":
        """Meld an nn.Linear: its weight is quantised to FP8 with the adapter A stacked under it
        (A from the rank-r SVD of the weight's FP8 quantisation error, or in the adapter mode
        from `adapter_init`: "random", drawn from `seed`, or "weight_svd", W's top-r right
        singular vectors; see falqon.adapter_init; in the adapter mode rescaled to a LoRA A's
        row norm); B starts at zero. The original high-precision weight is not kept."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MeldedLinear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        check_adapter_init("MeldedLinear.from_linear", adapter_init, update_mode)
        w = linear.weight
        if w.dtype not in _ACTIVATION_DTYPES:
            raise TypeError(f"MeldedLinear.from_linear: weight must be float32, float16 or "
                            f"bfloat16, got {w.dtype}")
        if w.device.type == "meta":
            raise ValueError("MeldedLinear.from_linear: the layer's weight is on the meta device; "
                             "load the model's weights before melding")
        module = cls(linear.in_features, linear.out_features, rank=rank, alpha=alpha, topk=topk,
                     bias=linear.bias is not None, keep_residual=keep_residual,
                     grad_dtype=grad_dtype, transposed_copy=transposed_copy, device=w.device,
                     dtype=None if linear.bias is None else linear.bias.dtype,
                     lora_dtype=lora_dtype, amax_history_len=amax_history_len,
                     update_mode=update_mode, adapter_gain=adapter_gain, train_a=train_a)
        row_norm = ADAPTER_ROW_NORM if update_mode == "adapter" else 0.0
        melded, scale = meld_weight(w.detach(), rank, adapter_init, svd, oversample, power_iters,
                                    seed, row_norm)
        module.weight.data = melded
        module.weight_scale.copy_(scale)
        module.refresh_weight_t()
        module.init_lora_A()
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().clone()
        return module

    @torch.no_grad()
    def init_lora_A(self) -> None:
        """With train_a: lora_A from A's FP8 rows (TRAINED_A_DIVISOR times them, so that its
        image is those rows again); the rows count as synchronised."""
        if self.lora_A is not None:
            self.lora_A.copy_(self.adapter_A(torch.float32) * TRAINED_A_DIVISOR)
            self._a_synced = self.lora_A._version

    @torch.no_grad()
    def sync_adapter_A(self) -> None:
        """With train_a: rewrite A's FP8 rows from lora_A (falqon.trained_a.sync_rows); falqon.attach
        and FalqonCallback call it after every optimizer step."""
        if self.lora_A is not None:
            trained_a.sync_rows(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            got = "a 0-d input" if x.dim() == 0 else \
                f"an input with {x.shape[-1]} features in its last dimension"
            raise ValueError(f"MeldedLinear({self.in_features} -> {self.out_features}) got {got}")
        if x.device != self.weight.device:
            raise ValueError(f"MeldedLinear: input is on {x.device}, the layer on "
                             f"{self.weight.device}")
        key = x  # the shared quantisation is keyed on the tensor the layer was called with
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if x.dtype not in _ACTIVATION_DTYPES:
            raise TypeError(f"MeldedLinear: input must be float32, float16 or bfloat16, got "
                            f"{x.dtype}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.lora_A is not None and not self._a_synced_by_hook and \
                not torch.compiler.is_compiling() and self.lora_A._version != self._a_synced:
            self.sync_adapter_A()  # lora_A changed and no falqon.attach hook does it (eager)
        history = self.amax_history
        shared = use_shared(self, key)
        adapter = self.update_mode == "adapter"
        # The adapter mode with current scaling quantises x per row (per token) where the GEMM
        # takes row scales at no cost (Hopper, and the CPU reference): one pass over x, not two.
        rows = adapter and history is None and ops.row_scales_supported(x.device)
        if shared is not None or rows or (history is None and torch.compiler.is_compiling()):
            # current scaling: x's quantisation made once for its readers (q/k/v, gate/up), by
            # the cache in eager and by the compiled graph's common-subexpression elimination
            # under torch.compile, where the layers that read x each emit the same quantize
            q, scale = shared.quantized(key, x, rows) if shared is not None else \
                quantize_input(x, rows)
            y = ops.melded_linear_call(
                x, self.weight, self.weight_scale, self.lora_B, bias, self.weight_t,
                self.scaling, self.grad_dtype, None, adapter, q, scale)[0]
            return self._with_trained_A(y, x)
        y, _, x_amax = ops.melded_linear_call(
            x, self.weight, self.weight_scale, self.lora_B, bias, self.weight_t, self.scaling,
            self.grad_dtype, history, adapter)
        if history is not None and self.training:
            ops.record_amax_(history[0], x_amax.detach())
        return self._with_trained_A(y, x)

    def _with_trained_A(self, y: Tensor, x: Tensor) -> Tensor:
        """y, carrying lora_A's gradient where A is trained (falqon.trained_a.TrainedAGrad)."""
        if self.lora_A is None or not (torch.is_grad_enabled() and self.lora_A.requires_grad):
            return y
        return trained_a.TrainedAGrad.apply(y, x, self.lora_A, self.lora_B,
                                            self.scaling / TRAINED_A_DIVISOR)

    @property
    def amax_history_len(self) -> int:
        """H of delayed scaling; 0 for current scaling."""
        return 0 if self.amax_history is None else self.amax_history.shape[1]

    @torch.no_grad()
    def proxy_update(self, k: int | None = None) -> None:
        """The proxy mode's update: fold the top-k rows of lora_B into the FP8 weight and reset
        lora_B per the policy. Call after every optimizer step (falqon.attach does it for you).
        The adapter mode has none (B is the adapter, trained like LoRA's)."""
        if self.update_mode != "proxy":
            raise ValueError("MeldedLinear.proxy_update: this layer is in the adapter mode, whose B "
                             "is a trained adapter that is never folded during training (export "
                             "merges it); the top-k proxy update needs update_mode='proxy'")
        k = self.topk if k is None else k
        if is_sharded(self.weight) or is_sharded(self.lora_B):  # FSDP2's fully_shard
            from .distributed import sharded_proxy_update

            sharded_proxy_update(self, k)
            return
        ops.topk_update_(self.weight, self.lora_B, self.weight_t, k, self.scaling,
                         self.keep_residual)

    @torch.no_grad()
    def refresh_weight_t(self) -> None:
        """Rewrite the persistent transposed copy (if the layer keeps one) from `weight`: the
        weight rows in the proxy mode, every row in the adapter mode."""
        if self.weight_t is not None:
            rows = self.weight.shape[0] if self.update_mode == "adapter" else self.out_features
            self.weight_t.copy_(self.weight[:rows].t())

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The layer's effective weight, (out_features, in_features): W + scaling * B A in the
        adapter mode (computed in fp32), W in the proxy mode (where B holds no pending update
        once proxy_update ran)."""
        w = self.dequantized_weight(torch.float32)
        if self.update_mode == "adapter":
            w = w.addmm_(self.lora_B.float(), self.adapter_A(torch.float32), alpha=self.scaling)
        return w.to(dtype)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The layer's current weight W = s * W_q, (out_features, in_features)."""
        return (self.weight[:self.out_features].to(torch.float32) * self.weight_scale).to(dtype)

    @torch.no_grad()
    def adapter_A(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The adapter A = s * A_q, (rank, in_features)."""
        rows = self.weight[self.out_features:self.out_features + self.rank]
        return (rows.to(torch.float32) * self.weight_scale).to(dtype)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() would cast the FP8 weight and the float32 scale like
        # any floating tensor (and a scale rounded through bf16 would rescale the whole layer).
        # Keep their formats: only moves between devices apply to them, taken from the originals.
        before = {name: t.detach() for name in ("weight", "weight_scale", "weight_t",
                                                "amax_history", "a_range")
                  if (t := getattr(self, name)) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                restored = old.to(new.device)
                if isinstance(new, nn.Parameter):
                    new.data = restored
                else:
                    self._buffers[name] = restored
        return self

    def extra_repr(self) -> str:
        delayed = f", amax_history_len={self.amax_history_len}" if self.amax_history_len else ""
        if self.update_mode == "adapter":
            mode = "update_mode=adapter" + (", train_a=True" if self.lora_A is not None else "")
        else:
            policy = "keep_residual" if self.keep_residual else "drop"
            mode = f"update_mode=proxy, topk={self.topk}, policy={policy}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha:g}, {mode}, "
                f"bias={self.bias is not None}{delayed}")
