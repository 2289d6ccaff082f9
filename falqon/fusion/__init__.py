"""falqon.fuse: one switch for fused kernels around the FP8 GEMMs, in the manner of Liger
Kernel's `apply_liger_kernel_to_llama(model=...)`.

A melded model's FP8 GEMMs are fast; what surrounds them (RMSNorm, SwiGLU, RoPE, the residual
adds, the LM head's loss, and their recomputation under gradient checkpointing) is the model's
own eager code, about half of a 7B training step. Backends:

  liger    Liger Kernel's Triton kernels (pip install 'falqon[fast]') put on this model instance:
           RMSNorm, SwiGLU, RoPE and the fused linear cross-entropy (the logits are never
           materialised), for LLaMA, Mistral and Qwen2 (liger.SUPPORTED).
  compile  torch.compile of each decoder layer (falqon's ops are registered custom ops, so the
           melded layers compile whole); the LM head and the loss: Liger's fused linear
           cross-entropy where Liger is installed, else eager.
  auto     compile (with Liger's fused loss where Liger is installed) on a CUDA GPU (liger where
           torch.compile cannot run there, e.g. without Triton; the report says why): on an H200
           at LLaMA-7B it measured 0.413-0.416 s a step where liger measured 0.419-0.425 in the
           same runs (benchmarks/NOTES.md, runs 64-65); nothing on the CPU (neither pays off).
  off      nothing.

compile_mode (fuse's keyword) is torch.compile's mode for the compile backend, e.g.
"reduce-overhead" (the compiled layers replayed as CUDA graphs: each call of the model starts a new
graph step, and gradient checkpointing must be reentrant or off; compiled.py says why) or
"max-autotune".

Only this model instance changes (no class or module of transformers is replaced for other
models), before or after falqon.meld, PEFT's get_peft_model or gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import FalqonError

BACKENDS = ("auto", "liger", "compile", "off")
# torch.compile's modes, for the compile backend's compile_mode ("reduce-overhead": CUDA graphs).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MARK = "_falqon_fusion"  # the FuseReport of a fused model, on the model (PEFT's base model)


@dataclass
class FuseReport:
    """What falqon.fuse did: the backend that ran (`requested` is what was asked for), the
    number of places each fusion was put (e.g. {"rms_norm": 65}) and what was left as it was,
    with the reason; str() gives one line."""

    requested: str
    backend: str
    fused: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    compile_mode: str | None = None  # torch.compile's mode where the compile backend ran

    def __str__(self) -> str:
        names = {"liger": "Liger Kernel", "compile": "torch.compile", "off": "nothing fused"}
        done = ", ".join(f"{k} x{n}" for k, n in self.fused.items())
        mode = f" mode={self.compile_mode!r}" if self.compile_mode else ""
        text = f"falqon.fuse({self.requested!r}): {names[self.backend]}{mode}" + \
            (f" ({done})" if done else "")
        return text + "".join(f"; {what}: {why}" for what, why in self.skipped)

    @property
    def fused_loss(self) -> bool:
        """Whether the LM head and the loss are one fused kernel (no logits in training)."""
        return self.fused.get("fused_linear_cross_entropy", 0) > 0


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (PeftModel.get_base_model) or DDP, or
    `model`."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def check_args(model, backend, loss, compile_mode=None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"falqon.fuse: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"falqon.fuse: backend must be a string, one of {', '.join(BACKENDS)}; "
                        f"got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"falqon.fuse: backend must be one of {', '.join(BACKENDS)}; got "
                         f"{backend!r}")
    if not isinstance(loss, bool):
        raise TypeError(f"falqon.fuse: loss must be True or False, got {loss!r}")
    if compile_mode is not None:
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"falqon.fuse: compile_mode must be None or one of torch.compile's "
                             f"modes, {', '.join(COMPILE_MODES)}; got {compile_mode!r}")
        if backend not in ("auto", "compile"):
            raise ValueError(f"falqon.fuse: compile_mode is torch.compile's, for the compile "
                             f"backend (or auto, where it compiles); backend={backend!r} "
                             f"compiles nothing")


def choose_backend(target: nn.Module) -> tuple[str, list[tuple[str, str]]]:
    """auto's choice for this model: (backend, [(what, why)] of what it passed over)."""
    from . import compiled, liger

    device = model_device(target)
    if device.type != "cuda":
        return "off", [("auto", f"the model is on the {device.type}: the fused kernels pay off "
                                f"on a CUDA GPU only")]
    why = compiled.unavailable(device)
    if why is None:
        return "compile", []  # (its report says whether Liger's fused loss came with it)
    liger_why = liger.unavailable(target)
    if liger_why is None:
        return "liger", [("compile", why)]
    return "off", [("compile", why), ("liger", liger_why)]


def fuse(model: nn.Module, backend: str = "auto", *, loss: bool = True,
         compile_mode: str | None = None) -> FuseReport:
    """Put fused kernels on `model` (a transformers causal LM, melded or not, or a PEFT model
    around one), in place; see the module's docstring for the backends. loss=False leaves the
    LM head and the loss as they are (the fused loss, liger's and compile's where Liger is
    installed, returns no logits in training). compile_mode: torch.compile's mode for the
    compile backend (None: its default); auto passes it on where it compiles and says in the
    report's skipped where it did not. Fusing a fused model again with the same backend (and
    mode) changes nothing; with another one it is refused. Returns what was done."""
    check_args(model, backend, loss, compile_mode)
    compile_mode = None if compile_mode == "default" else compile_mode  # torch.compile's None
    target = unwrapped(model)
    done = getattr(target, MARK, None)
    if done is not None:
        same_mode = compile_mode is None or compile_mode == done.compile_mode
        if backend in ("auto", done.requested, done.backend) and same_mode:
            return done
        raise FalqonError(f"falqon.fuse: this model is fused with "
                          f"{_with_mode(done.backend, done.compile_mode)} already; build it "
                          f"again to fuse it with {_with_mode(backend, compile_mode)}")
    chosen, passed = choose_backend(target) if backend == "auto" else (backend, [])
    if compile_mode is not None and chosen != "compile":
        passed = passed + [("compile_mode", f"{compile_mode!r} unused: the backend is {chosen}")]
    report = FuseReport(backend, chosen, skipped=passed)
    if chosen == "liger":
        from . import liger

        liger.apply(target, report, loss)
    elif chosen == "compile":
        from . import compiled

        compiled.apply(target, report, loss, compile_mode)
    if chosen != "off":
        setattr(target, MARK, report)
    return report


def _with_mode(backend: str, compile_mode: str | None) -> str:
    return backend + (f" (compile_mode={compile_mode!r})" if compile_mode else "")


def fusion_report(model: nn.Module) -> FuseReport | None:
    """The FuseReport of a fused model (or of the model under a PEFT wrapper), else None."""
    return getattr(unwrapped(model), MARK, None)


__all__ = ["BACKENDS", "FuseReport", "fuse", "fusion_report"]
