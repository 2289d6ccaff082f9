"""FalqonConfig: which layers to meld and how, in the manner of PEFT's LoraConfig."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .peft_compat import ALL_LINEAR, accept_peft_names
from .validation import (ADAPTER_INITS, check_adapter_gain, check_adapter_init, check_int,
                         check_layer_options)


class FalqonError(ValueError):
    """A problem with the user's input (a file, a model, an option): `falqon` CLI prints its
    message as one line."""


def env_switch(name: str, default: bool) -> bool:
    """An on/off environment variable as the extension's env_flag reads it: 1/true/yes/on or
    0/false/no/off (any case, spaces around), `default` when unset or empty; a FalqonError
    otherwise."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise FalqonError(f"environment variable {name} must be 1 or 0, got {raw!r}")


GRAD_DTYPES = {"e5m2": torch.float8_e5m2, "e4m3": torch.float8_e4m3fn}
SVD_METHODS = ("randomized", "exact")
UPDATE_MODES = ("adapter", "proxy")
# The adapter mode's output gain (FalqonConfig.adapter_gain). A is frozen in the adapter mode, while
# LoRA's A grows from its small initial values as it trains; with A at a LoRA A's initial row norm
# and gain 1, the accuracy study's pilot needed ~10x LoRA's learning rate for the same loss at
# every point of its grid (docs/accuracy.md). Multiplying the adapter's output by 10 gives a
# LoRA user's learning rates back (an Adam step on B moves the output in proportion to it).
ADAPTER_GAIN = 10.0
# With A trained too (FalqonConfig.train_a), B and A are placed so that an Adam step on B moves
# the output TRAINED_A_GAIN / TRAINED_A_DIVISOR = 10x as far as a step of the same size on A
# (LoRA+'s finding that B wants the larger step), and so that the study's best learning rate for
# that split lands on bf16 LoRA's: the study's probe (A and B at one learning rate, B with gain
# 10, A unscaled) was best at 0.002 against LoRA's 0.01, so here B's gain is 10 / 5 and A's
# parameter is 5x the A the layer applies (docs/accuracy.md, benchmarks/NOTES.md runs 58-59).
TRAINED_A_GAIN = 2.0
TRAINED_A_DIVISOR = 5.0


def default_adapter_gain(train_a: bool) -> float:
    """The adapter gain when none is given: ADAPTER_GAIN, or TRAINED_A_GAIN with A trained."""
    return TRAINED_A_GAIN if train_a else ADAPTER_GAIN


@accept_peft_names
@dataclass
class FalqonConfig:
    """How `falqon.meld` turns a model's nn.Linear layers into MeldedLinear layers.

    update_mode      "adapter" (default): B is a real LoRA adapter in the forward,
                     y = x W^T + scaling (x A^T) B^T, trained in fp32 and never folded into the
                     FP8 weights during training; A is rescaled to a LoRA A's row norm and the
                     output multiplied by adapter_gain so that LoRA's learning rates carry over.
                     On the accuracy study (docs/accuracy.md, H200) it ends 3.2% below bf16
                     LoRA's held-out loss on GSM8K and 1.15% above on role-play, at LoRA's
                     learning rates. "proxy": the paper's top-k proxy update (B never enters the
                     forward; its topk largest rows are folded into the E4M3 weights after each
                     optimizer step), which the study measured 12.6-18% above bf16 LoRA's
                     held-out loss: updates under half an E4M3 step round away.
    adapter_init     adapter mode: where the frozen A comes from, before it is rescaled to a
                     LoRA A's row norm (capped at amax(W)) and quantised with W's scale.
                     "error_svd" (default, the paper's): the rank-r SVD of W's FP8 quantisation
                     error. "random": a seeded Gaussian A (LoRA-FA's choice; the seed mixes
                     `seed` with the layer's name, so layers differ). "weight_svd": W's top-r
                     right singular vectors (PiSSA's subspace; W itself is kept whole), by the
                     `svd` method. On an H200 study the three trained within 0.6% of each
                     other (docs/accuracy.md). The proxy mode takes "error_svd" only.
    rank             rank r of the adapter melded under each weight.
    alpha            LoRA alpha; the update is scaled by alpha / rank. None: alpha = rank; else a
                     finite number > 0.
    train_a          adapter mode: train A as well (LoRA over the FP8 base instead of LoRA-FA).
                     Each layer gets `lora_A`, a float32 parameter (TRAINED_A_DIVISOR times the A
                     it applies), whose FP8 image is written into the layer's A rows after every
                     optimizer step (falqon.attach / FalqonCallback; in eager mode a forward also
                     does it when lora_A changed), and dA = scaling (g B)^T x in the backward.
                     In the study (H200, pilots as long as the runs, one seed) it ended 1.27%
                     (GSM8K) and 1.92% (role-play) below bf16 LoRA's held-out loss where the
                     frozen A ended 0.59% and 0.23% above. Costs per layer: the fp32 A and its
                     Adam state, two small GEMMs in the backward (a fused LLaMA-7B step on an
                     H200: +3%, +0.94 GiB). Under FSDP2 lora_A is sharded like B and
                     gathered (r x in_features) for the rewrite.
    adapter_gain     adapter mode: a further factor on the adapter's output, scaling =
                     adapter_gain * alpha / rank. None (default): ADAPTER_GAIN (10: A is frozen,
                     so it stands in for the growth of a trained LoRA A) or, with train_a,
                     TRAINED_A_GAIN (2). Exports fold it into B, so a PEFT adapter keeps
                     lora_alpha = alpha. Ignored in the proxy mode.
    topk             proxy mode: rows of B folded into the FP8 weight after each optimizer step.
    warmup_topk      proxy mode: rows folded during the first `warmup_steps` steps. None: the
                     layer's rank (what the published code does).
    warmup_steps     proxy mode: length of that warm-up, in optimizer steps.
    keep_residual    proxy mode. False: B is zeroed after each update (the published policy);
                     True: the rows not folded in stay in B and keep accumulating.
    target_modules   None: every nn.Linear not excluded. A list of names: a layer is melded when its
                     qualified name equals one of them or ends with "." + one of them ("q_proj"
                     matches "model.layers.0.self_attn.q_proj"). A string: a regular expression
                     that must match the whole qualified name (PEFT's conventions); "all-linear"
                     (PEFT's shorthand): every nn.Linear but the model's output layer.
    exclude_modules  names never melded, matched like target_modules (lm_head by default).
    svd              "randomized" (fast, on the layer's device) or "exact" SVD at meld time.
    seed             seed of the randomized SVD's sketch.
    grad_dtype       FP8 format of the output gradient in the input-gradient GEMM: "e5m2" or "e4m3".
    transposed_copy  keep a transposed FP8 copy of each weight for the input gradient (more memory,
                     no per-step transpose; in the adapter mode it includes A's rows).
    amax_history_len 0 (default): current scaling, the paper's method (each activation and
                     gradient quantised with its own amax, two passes over it; in the adapter
                     mode on Hopper x per row, in one pass). H > 0: delayed
                     scaling, the scale from the largest amax of the last H calls (a (2, H)
                     buffer per layer, saved with the checkpoint): one pass over each tensor
                     instead of two, values above the recorded amax saturate. Transformer Engine
                     uses H = 16 to 1024.

    PEFT's names are accepted too (falqon.peft_compat): FalqonConfig(r=16, lora_alpha=32,
    target_modules="all-linear", lora_dropout=0.05, task_type="CAUSAL_LM") is rank 16, alpha 32;
    FalqonConfig.from_peft(peft.LoraConfig(...)) converts a LoraConfig. LoraConfig fields falqon
    cannot honour (use_dora, bias, modules_to_save, ...) are refused, naming them.
    """

    rank: int = 16
    alpha: float | None = None
    topk: int = 10
    warmup_topk: int | None = None
    warmup_steps: int = 0
    keep_residual: bool = False
    target_modules: Sequence[str] | str | None = None
    exclude_modules: Sequence[str] | str | None = ("lm_head",)
    svd: str = "randomized"
    seed: int = 0
    grad_dtype: str = "e5m2"
    transposed_copy: bool = False
    amax_history_len: int = 0
    update_mode: str = "adapter"
    adapter_gain: float | None = None
    adapter_init: str = "error_svd"
    train_a: bool = False

    def __post_init__(self):
        self.target_modules = _normalise_names("target_modules", self.target_modules)
        self.exclude_modules = _normalise_names("exclude_modules", self.exclude_modules)
        # rank, alpha, topk, amax_history_len: the rules MeldedLinear applies (falqon.validation)
        self.alpha = check_layer_options("FalqonConfig", self.rank, self.alpha, self.topk,
                                         self.amax_history_len)
        check_int("FalqonConfig", "warmup_steps", self.warmup_steps, 0)
        check_int("FalqonConfig", "seed", self.seed, None)
        if self.warmup_topk is not None:
            check_int("FalqonConfig", "warmup_topk", self.warmup_topk, 0)
        if self.adapter_gain is None:
            self.adapter_gain = default_adapter_gain(self.train_a is True)
        self.adapter_gain = check_adapter_gain("FalqonConfig", self.adapter_gain)
        for name in ("keep_residual", "transposed_copy", "train_a"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FalqonConfig: {name} must be True or False, got "
                                 f"{getattr(self, name)!r}")
        if self.update_mode not in UPDATE_MODES:
            raise ValueError(f"FalqonConfig: update_mode must be one of {UPDATE_MODES}, got "
                             f"{self.update_mode!r}")
        check_adapter_init("FalqonConfig", self.adapter_init, self.update_mode)
        if self.train_a and self.update_mode != "adapter":
            raise ValueError("FalqonConfig: train_a needs update_mode='adapter' (the proxy mode "
                             "folds B A into the FP8 weights; its A stays the melded one)")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"FalqonConfig: svd must be one of {SVD_METHODS}, got {self.svd!r}")
        if self.grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"FalqonConfig: grad_dtype must be one of {tuple(GRAD_DTYPES)}, got "
                             f"{self.grad_dtype!r}")

    @classmethod
    def from_peft(cls, lora_config, model=None, **overrides) -> "FalqonConfig":
        """The FalqonConfig of a peft.LoraConfig (falqon.peft_compat.from_lora_config); `model`
        resolves target_modules=None to PEFT's default targets for its type."""
        from .peft_compat import from_lora_config

        return from_lora_config(lora_config, model, **overrides)

    # ---- derived values ----------------------------------------------------------------------

    @property
    def scaling(self) -> float:
        """What the adapter's output is multiplied by: alpha / rank, times adapter_gain in the
        adapter mode."""
        gain = self.adapter_gain if self.update_mode == "adapter" else 1.0
        return gain * (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def grad_torch_dtype(self) -> torch.dtype:
        return GRAD_DTYPES[self.grad_dtype]

    def topk_at(self, step: int, rank: int | None = None) -> int:
        """Rows to fold in after optimizer step `step` (0-based) for a layer of this rank."""
        if step < self.warmup_steps:
            return (self.rank if rank is None else rank) if self.warmup_topk is None \
                else self.warmup_topk
        return self.topk

    def wants(self, name: str) -> str | None:
        """Why the layer called `name` is not to be melded, or None if it is."""
        if self.exclude_modules is not None and _matches(self.exclude_modules, name):
            return "excluded (exclude_modules)"
        if self.target_modules not in (None, ALL_LINEAR) and \
                not _matches(self.target_modules, name):
            return "not in target_modules"
        return None

    # ---- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FalqonConfig":
        if not isinstance(data, dict):
            raise ValueError(f"FalqonConfig.from_dict takes a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"FalqonConfig: unknown field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FalqonConfig":
        return cls.from_dict(json.loads(text))


def _normalise_names(what: str, value):
    """None, a regex string, or a tuple of module names."""
    if value is None:
        return None
    if isinstance(value, str):
        if what == "target_modules" and value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"FalqonConfig: {what} {value!r} is not a valid regular expression: "
                             f"{exc}") from None
        return value
    try:
        names = tuple(value)
    except TypeError:
        raise ValueError(f"FalqonConfig: {what} must be None, a regex string or a list of names, "
                         f"got {value!r}") from None
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"FalqonConfig: {what} must hold non-empty strings, got {value!r}")
    return names


def _matches(spec, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


__all__ = ["ADAPTER_GAIN", "ADAPTER_INITS", "FalqonConfig", "FalqonError", "GRAD_DTYPES",
           "SVD_METHODS", "TRAINED_A_DIVISOR", "TRAINED_A_GAIN", "UPDATE_MODES",
           "default_adapter_gain", "env_switch"]
