"""Helpers shared by the test files (imported as `from falqon_testing import ...`)."""

from __future__ import annotations

import contextlib
import os
import pathlib

import pytest
import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
REPO = pathlib.Path(__file__).resolve().parents[1]
# Real instruction data lives beside the checkout (../shared/data), never inside it.
DATA_DIR = pathlib.Path(os.environ.get("FALQON_DATA_DIR", REPO.parent / "shared" / "data"))


def has_fp8_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_fp8_cuda = pytest.mark.skipif(
    not has_fp8_cuda(), reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")


def data_file(name: str) -> pathlib.Path:
    """A file of ../shared/data, or skip the test with the reason."""
    path = DATA_DIR / name
    if not path.is_file():
        pytest.skip(f"real data {path} is absent on this machine")
    return path


@contextlib.contextmanager
def _fp8_comparable():
    # opcheck's schema test checks that inputs were not mutated with torch.allclose, which has no
    # FP8 kernel. Compare FP8 tensors by their bytes instead (stricter than allclose) while
    # opcheck runs; every other dtype goes to the real allclose.
    real_allclose = torch.allclose

    def allclose(a, b, *args, **kwargs):
        if a.dtype in FP8_DTYPES:
            return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        return real_allclose(a, b, *args, **kwargs)

    torch.allclose = allclose
    try:
        yield
    finally:
        torch.allclose = real_allclose


def opcheck(op, args, **kwargs):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) on an op
    whose inputs may be FP8."""
    with _fp8_comparable():
        torch.library.opcheck(op, args, **kwargs)


def fp8_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def adapter_operand(g2: torch.Tensor, B: torch.Tensor, scaling: float, rows: int) -> torch.Tensor:
    """The adapter mode's dgrad operand G = [g | scaling g B | 0] (M, rows) in the ops' fp32
    arithmetic: B rounded to g's dtype, fp32 products and sums, scaled once (csrc/reference.cpp,
    adapter_grad_operand)."""
    u = (g2.float() @ B.to(g2.dtype).float()) * scaling
    pad = torch.zeros(g2.shape[0], rows - g2.shape[1] - B.shape[1])
    return torch.cat([g2.float(), u, pad], 1)


def adapter_operand_q(g2, B, scaling, rows, grad_dtype, history=None):
    """(G_q, scale, amax of G): the adapter operand quantised as one tensor by the CPU ops, at its
    own amax (current scaling) or at the delayed scale of `history`."""
    import falqon

    G = adapter_operand(g2, B, scaling, rows)
    if history is None:
        q, scale = falqon.quantize(G, grad_dtype)
        return q, scale, G.abs().amax()
    return falqon.quantize_delayed(G, grad_dtype, history)
