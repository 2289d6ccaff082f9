"""Row-wise quantisation on the CPU: torch.ops.falqon.quantize_rows against the per-tensor formula
row by row, its edge rows, and where MeldedLinear uses it (falqon.ops.row_scales_supported). The
GPU kernel is tested against this reference in tests/test_cuda_row_scales.py."""

import math

import pytest
import torch

from falqon import ops
from falqon_testing import fp8_bytes
from cpu_formulas import E4M3, E5M2, FMAX, quantize_formula


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 33), (64, 128), (2, 0, 5)])
def test_quantize_rows_is_quantize_of_each_row(dtype, in_dtype, shape):
    # Rows of very different magnitudes: each gets its own scale.
    x = (torch.randn(shape) * torch.logspace(-3, 3, shape[-2] if len(shape) > 1 else 1)
         .reshape(*([-1, 1] if len(shape) > 1 else [1]))).to(in_dtype)
    q, s = ops.quantize_rows(x, dtype)
    assert q.dtype == dtype and q.shape == x.shape and s.shape == x.shape[:-1]
    assert s.dtype == torch.float32
    rows = x.reshape(-1, x.shape[-1])
    for i, (row, q_row, s_row) in enumerate(zip(rows, q.reshape(rows.shape), s.reshape(-1))):
        q_ref, s_ref = quantize_formula(row, dtype)
        assert torch.equal(s_row, s_ref), i
        assert torch.equal(fp8_bytes(q_row), fp8_bytes(q_ref)), i


def test_quantize_rows_edge_rows():
    x = torch.randn(5, 16)
    x[1] = 0.0                      # a zero row: scale 1, zeros
    x[3, 2] = float("nan")          # a NaN stays in its own row
    x[4] *= 1e4                     # an outlier row costs the others nothing
    q, s = ops.quantize_rows(x, E4M3)
    assert s[1].item() == 1.0 and not q[1].float().any()
    assert math.isnan(s[3].item()) and torch.isnan(q[3].float()).any()
    for i in (0, 2, 4):             # each row's largest magnitude lands on 448
        assert q[i].float().abs().max().item() == FMAX[E4M3]
    empty_rows, empty_scales = ops.quantize_rows(torch.randn(4, 0), E4M3)
    assert empty_rows.shape == (4, 0) and torch.equal(empty_scales, torch.ones(4))
    with pytest.raises(RuntimeError, match="the input needs a last dimension"):
        ops.quantize_rows(torch.tensor(1.0), E4M3)


@pytest.mark.parametrize("capability, supported", [((8, 0), True), ((8, 9), False), ((9, 0), True),
                                                    ((10, 0), False), ((12, 0), False)])
def test_row_scales_are_supported_where_the_fp8_gemm_takes_them(monkeypatch, capability,
                                                                supported):
    # Hopper (cuBLASLt's outer-vector scales) and the GPUs the op emulates (below 8.9); not Ada or
    # Blackwell, where the op would scale its output in extra passes.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.delenv("FALQON_FORCE_EMULATION", raising=False)
    monkeypatch.delenv(ops.ROW_SCALES_ENV, raising=False)
    ops._row_scales.cache_clear()
    try:
        assert ops.row_scales_supported("cpu")
        assert ops.row_scales_supported("cuda:0") is supported
        monkeypatch.setenv("FALQON_FORCE_EMULATION", "1")
        ops._row_scales.cache_clear()
        assert ops.row_scales_supported("cuda:0")
        monkeypatch.setenv(ops.ROW_SCALES_ENV, "0")  # the A/B switch: per tensor everywhere
        ops._row_scales.cache_clear()
        assert not ops.row_scales_supported("cpu") and not ops.row_scales_supported("cuda:0")
        monkeypatch.setenv(ops.ROW_SCALES_ENV, "maybe")
        ops._row_scales.cache_clear()
        with pytest.raises(ValueError, match="FALQON_ROW_SCALES must be 1 or 0, got 'maybe'"):
            ops.row_scales_supported("cpu")
    finally:
        ops._row_scales.cache_clear()
