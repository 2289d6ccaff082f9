"""benchmarks/model.py's fused methods: a method of model.py with falqon.fuse's kernels around
its GEMMs (Liger Kernel's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy, or torch.compile
of the decoder layers). register() adds them to model.py's tables."""

from __future__ import annotations

import functools
import pathlib
import sys

if __package__ in (None, ""):  # imported with benchmarks/ on sys.path, as model.py does
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import common
else:
    from . import common

# (the method it extends, falqon.fuse's backend). Liger's fusions are put on the model instance
# only (falqon/fusion/liger.py), so the eager methods of the same run stay eager whatever the order.
FUSED = {"bf16_lora_liger": ("bf16_lora", "liger"), "qlora_nf4_liger": ("qlora_nf4", "liger"),
         "falqon_fused": ("falqon_adapter", "auto"),
         "falqon_fused_train_a": ("falqon_adapter_train_a", "auto"),
         "falqon_fused_compile": ("falqon_adapter", "compile"),
         "falqon_fused_liger": ("falqon_adapter", "liger"),
         "falqon_fused_cudagraphs": ("falqon_adapter", "compile")}
# falqon.fuse's keyword arguments of a method, beyond its backend.
FUSE_OPTIONS = {"falqon_fused_cudagraphs": {"compile_mode": "reduce-overhead"}}
# Liger's four fusions; a liger method that got fewer is an error, not a partial measurement.
LIGER_FUSIONS = ("rms_norm", "swiglu", "rope", "fused_linear_cross_entropy")
NOTES = {
    "bf16_lora_liger": ("bf16_lora with Liger Kernel's RMSNorm, SwiGLU, RoPE and fused linear "
                        "cross-entropy (falqon.fuse(model, 'liger') on the PEFT model)"),
    "qlora_nf4_liger": "qlora_nf4 with the same Liger Kernel fusions",
    "falqon_fused": ("falqon_adapter + falqon.fuse(model) (auto: torch.compile of the decoder "
                     "layers, Liger Kernel's fused loss where installed), falqon's default fast "
                     "path"),
    "falqon_fused_train_a": "falqon_adapter_train_a + falqon.fuse(model): the fast path, A trained",
    "falqon_fused_compile": "falqon_adapter + falqon.fuse(model, 'compile')",
    "falqon_fused_liger": ("falqon_adapter + falqon.fuse(model, 'liger') (Liger Kernel's four "
                           "fusions)"),
    "falqon_fused_cudagraphs": ("falqon_adapter + falqon.fuse(model, 'compile', "
                                "compile_mode='reduce-overhead'): the compiled decoder layers "
                                "replayed as CUDA graphs (reentrant checkpointing only)"),
}


def setup_fused(method: str, setup: dict, model, args, info):
    base, _ = FUSED[method]
    check_fuse_device(args)
    return apply_fuse(method, setup[base](model, args, info), info)


def check_fuse_device(args) -> None:
    if args.device.type != "cuda":  # (tests/test_fusion.py runs both backends' code on the CPU)
        raise common.Skip(f"falqon.fuse is measured on a CUDA GPU only (Liger Kernel's kernels "
                          f"run on CUDA tensors; torch.compile on a CPU smoke test would only "
                          f"add minutes of compiling)")


def apply_fuse(method: str, model, info):
    """falqon.fuse with the method's backend on its built model, the report into the record."""
    import falqon

    _, backend = FUSED[method]
    try:
        report = falqon.fuse(model, backend, **FUSE_OPTIONS.get(method, {}))
    except falqon.FalqonError as exc:  # Liger Kernel not installed, an architecture it lacks
        raise common.Skip(str(exc)) from None
    missing = [f for f in LIGER_FUSIONS if f not in report.fused]
    if report.backend == "off" or (report.backend == "liger" and missing):
        raise RuntimeError(f"{method}: falqon.fuse did not fuse {missing or 'anything'}: {report}")
    info["fuse"] = {"backend": report.backend, "fused": report.fused,
                    "skipped": [list(s) for s in report.skipped],
                    **({"compile_mode": report.compile_mode} if report.compile_mode else {})}
    return model


def register(setup: dict, falqon_options: dict, notes: dict) -> None:
    """Add the fused methods to model.py's SETUP, FALQON_OPTIONS and NOTES."""
    for method, (base, _) in FUSED.items():
        if base in falqon_options:
            falqon_options[method] = falqon_options[base]
        setup[method] = functools.partial(setup_fused, method, setup)
    notes.update(NOTES)
