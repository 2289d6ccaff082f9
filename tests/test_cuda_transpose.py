"""transpose.cu's FP8 transpose (the dgrad's W'^T when no persistent copy is kept) against
torch's, byte for byte: a transpose moves bytes, so any difference is a fault. Random bytes
(every FP8 code, NaNs included, viewed as uint8), sizes that end in a part of a 64 x 64 tile,
and a base address off the 16-byte grid (the byte-wise load path)."""

from __future__ import annotations

import pytest
import torch

from cuda_testing import DRY_RUN, cuda_only

pytestmark = [pytest.mark.gpu, cuda_only,
              pytest.mark.skipif(DRY_RUN, reason="falqon_bench.transpose_fp8 is a CUDA op only")]

SHAPES = [(4160, 4096), (11072, 4096), (4160, 11008), (16, 16), (48, 80), (528, 1040), (64, 4112)]


def _random_bytes(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")


@pytest.mark.parametrize("rows,cols", SHAPES, ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_transpose_fp8_matches_torch(rows, cols, aligned):
    # Unaligned: a contiguous matrix starting one byte into its storage.
    flat = _random_bytes(rows * cols + 1)
    data = (flat[:-1] if aligned else flat[1:]).view(rows, cols)
    assert data.is_contiguous() and (data.data_ptr() % 16 == 0) == aligned
    before = data.clone()
    w = data.view(torch.float8_e4m3fn)
    out = torch.ops.falqon_bench.transpose_fp8(w)
    assert out.shape == (cols, rows) and out.dtype == w.dtype and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), data.t().contiguous())
    assert torch.equal(data, before), "input kept"


def test_transpose_fp8_refuses_sizes_off_the_16_grid():
    w = _random_bytes(24 * 32).view(24, 32).view(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        torch.ops.falqon_bench.transpose_fp8(w)
