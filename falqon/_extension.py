"""Loading the compiled library falqon._C and what it was built with."""

from __future__ import annotations

import importlib

_loaded = False


def load() -> None:
    """Import falqon._C, which registers torch.ops.falqon.*; a clear error where it is missing."""
    global _loaded
    if _loaded:
        return
    import torch  # noqa: F401  (loads libtorch and the CUDA libraries _C links against)

    try:
        importlib.import_module("falqon._C")
    except ImportError as exc:
        raise ImportError(
            "falqon's compiled extension (falqon._C) could not be loaded: "
            f"{exc}. Build it against the installed torch with "
            "`pip install --no-build-isolation -e .` (see README.md)") from exc
    _loaded = True


def build_info() -> dict:
    """What setup.py recorded at build time: CUDA or not, GPU archs, torch and CUDA versions."""
    try:
        from . import _build_info as info
    except ImportError:  # built by CMake, which records nothing
        return {"with_cuda": None, "cuda_archs": [], "torch": None, "cuda": None}
    return {"with_cuda": info.WITH_CUDA, "cuda_archs": list(info.CUDA_ARCHS),
            "torch": info.TORCH, "cuda": info.CUDA}
