"""Helpers of the GPU test files (test_cuda_*.py): the device under test, comparisons of CUDA
results with the CPU reference, and random operands.

The GPU tests compare each CUDA op with the CPU op (csrc/reference.cpp) on the same inputs:
inputs are drawn on the CPU, copied to the GPU, and the CPU op runs on the CPU copies.

FALQON_TEST_DEVICE=cpu runs these test files with the "device" set to the CPU, i.e. the CPU op
against itself. That proves nothing about CUDA; it is a dry run of the tests' own code (shapes,
plumbing, the comparisons) on a machine without a GPU. Tests that need CUDA itself (CUDA graphs,
torch._scaled_mm on the GPU, compute-sanitizer) still skip there.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from falqon_testing import has_fp8_cuda, rel_err

import falqon
from falqon import ops

DEVICE = os.environ.get("FALQON_TEST_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"FALQON_TEST_DEVICE must be 'cuda' or 'cpu', got {DEVICE!r}")
DRY_RUN = DEVICE == "cpu"
# The emulated path (FALQON_FORCE_EMULATION=1) runs the reference on CUDA tensors; the test that
# sets it re-runs this suite in a subprocess on the small cases only (see test_cuda_ops.py).
EMULATED = os.environ.get("FALQON_FORCE_EMULATION") == "1"

# The CUDA kernels read FALQON_FAST_ACCUM_FWD and FALQON_FAST_ACCUM_DGRAD (both default on) for
# cuBLASLt's fast accumulation; the dgrad floor follows the latter (the forward's floor is
# always measured with fast accumulation: where the forward runs without it, that only loosens).
FAST_ACCUM_DGRAD = os.environ.get("FALQON_FAST_ACCUM_DGRAD", "1").lower() not in ("0", "false",
                                                                                   "no", "off")

# Every GPU test carries this mark: skipped without a CUDA GPU with FP8, unless it is a dry run.
gpu = pytest.mark.skipif(not (DRY_RUN or has_fp8_cuda()),
                         reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
# Tests that need CUDA itself (not only "the device under test").
cuda_only = pytest.mark.skipif(not has_fp8_cuda(),
                               reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")

E4M3, E5M2 = ops.E4M3, ops.E5M2
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8 = (E4M3, E5M2)
# Unit roundoff (half an ulp, relative) of each output format: 8, 11 and 24 significant bits.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}

LLAMA_7B = [(4096, 4096), (4096, 11008), (11008, 4096)]     # (in_features K, out_features N)
LLAMA_13B = [(5120, 5120), (5120, 13824), (13824, 5120)]


def to_dev(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEVICE)


def short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float8_", "")


# ---- FP8 comparisons ----------------------------------------------------------------------------

def fp8_ordinal(t: torch.Tensor) -> torch.Tensor:
    """The position of each FP8 value on the number line, as an int32: FP8 codes are
    sign-magnitude, so neighbouring values of one sign have neighbouring magnitude codes, and
    +0 and -0 both map to 0. Two values are one FP8 step apart iff their ordinals differ by 1."""
    b = t.cpu().view(torch.uint8).to(torch.int32)
    mag = b & 0x7F
    return torch.where(b >= 0x80, -mag, mag)


def assert_fp8_equal(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """Bitwise equality of two FP8 tensors; NaN compares equal to NaN whatever its payload (the
    sign of a NaN carries no information and differs between conversions)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (what, out.dtype, ref.dtype,
                                                               out.shape, ref.shape)
    out, ref = out.cpu(), ref.cpu()
    nan_o, nan_r = out.float().isnan(), ref.float().isnan()
    assert torch.equal(nan_o, nan_r), f"{what}: NaN at different places"
    ob, rb = out.view(torch.uint8)[~nan_o], ref.view(torch.uint8)[~nan_r]
    bad = (ob != rb).nonzero()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} of {ob.numel()} FP8 values differ; first at flat index "
        f"{bad[0].item()}: {ob[bad[0]].item():#04x} vs {rb[bad[0]].item():#04x}")


def assert_fp8_nearly_equal(out: torch.Tensor, ref: torch.Tensor, max_fraction: float,
                            what: str = "") -> int:
    """FP8 tensors equal except for at most `max_fraction` of the values, which may be one FP8
    step apart and no more. Returns how many differ."""
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    d = (fp8_ordinal(out) - fp8_ordinal(ref)).abs()
    if d.numel() == 0:
        return 0
    assert int(d.max()) <= 1, (
        f"{what}: values differ by up to {int(d.max())} FP8 steps (at most 1 allowed)")
    n = int((d != 0).sum())
    assert n <= max_fraction * d.numel(), (
        f"{what}: {n} of {d.numel()} values differ by one FP8 step; at most "
        f"{max_fraction:g} of them may")
    return n


# ---- GEMM results ---------------------------------------------------------------------------------

def gemm_tolerance(dtype: torch.dtype, rms: float, floor_abs: float | None,
                   floor_rel: float | None) -> tuple[float, float, float]:
    """(rtol, atol, frobenius bound) for an FP8 GEMM result of the given output dtype compared
    with the CPU reference, element by element as |out - ref| <= rtol |ref| + atol.

    Why these bounds. The GPU and the CPU quantise the operands identically (the quantise tests
    check that bitwise), and products of two FP8 values are exact in fp32, so the two results
    differ only through (1) the order and precision of the accumulation and (2) the final
    rounding to the output dtype.
    (2) Both round a nearly equal fp32 value once to the output format: they end up at most one
        output ulp apart, which is at most 2u |ref| (u = the format's unit roundoff: 2^-8 for
        bf16, so rtol = 2^-7 as the design asks).
    (1) The CPU sums in fp32; its summation-order error is ~2^-24 sqrt(K) of the result's scale,
        far under one bf16 ulp. The GPU's FP8 tensor cores keep ~13 mantissa bits (truncating)
        inside each group of k-steps before the partial sum is promoted to fp32; with fast
        accumulation (cuBLASLt's FAST_ACCUM, which the forward may use) they never promote and
        the error grows with K to around 1% of the rms at K = 14k. That term is an absolute one,
        of the size of the output's rms, not of each element (an element near zero gets the
        same absolute error). So atol = (4u + 2^-9) rms: a few output ulps of the rms for the
        rounding, and 2^-9 rms for the promoted accumulation (its typical size is ~2^-12 rms).
        Where the caller measured the floor (torch._scaled_mm on the same FP8 operands, in the
        accumulation mode the op is allowed to use) against the same reference, its worst
        element error and relative Frobenius error, times 2, widen the bounds: the op may be
        as inexact as the GPU's own FP8 GEMM, within a factor of 2.
    The relative Frobenius error must stay under 2^-8 (bf16) or 2^-10 (fp16, fp32), or twice the
    floor's."""
    u = UNIT_ROUNDOFF[dtype]
    rtol = 2 * u
    atol = (4 * u + 2.0 ** -9) * rms
    frob = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -10
    if floor_abs is not None:
        atol += 2 * floor_abs
        frob = max(frob, 2 * floor_rel)
    return rtol, atol, frob


def assert_gemm_close(out: torch.Tensor, ref: torch.Tensor, floor: torch.Tensor | None = None,
                      what: str = "") -> None:
    """out (the op on the device) against ref (the CPU op), with gemm_tolerance's bounds; `floor`
    is the GPU's own FP8 GEMM of the same operands (or None)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (what, out.dtype, ref.dtype,
                                                               out.shape, ref.shape)
    o, r = out.detach().cpu().double(), ref.detach().double()
    if r.numel() == 0:
        return
    assert torch.isfinite(o).all(), f"{what}: non-finite values in the device result"
    rms = r.pow(2).mean().sqrt().item()
    floor_abs = floor_rel = None
    if floor is not None:
        f = floor.detach().cpu().double()
        floor_abs, floor_rel = (f - r).abs().max().item(), rel_err(f, r)
    rtol, atol, frob = gemm_tolerance(ref.dtype, rms, floor_abs, floor_rel)
    diff = (o - r).abs()
    excess = diff - (rtol * r.abs() + atol)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{what}: {int((excess > 0).sum())} of {r.numel()} elements outside "
        f"|out - ref| <= {rtol:.3g}|ref| + {atol:.3g} (rms {rms:.4g}, floor max error "
        f"{floor_abs}); worst at flat index {worst}: {o.flatten()[worst].item():.6g} vs "
        f"{r.flatten()[worst].item():.6g}")
    err = rel_err(o, r)
    assert err < frob, f"{what}: relative Frobenius error {err:.3g} >= {frob:.3g}"


# ---- operands ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def melded_weight(K: int, N: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random melded weight [W; A; 0] (N + r16, K) in E4M3 with its scale, on the CPU.

    W ~ N(0, 0.02^2) like a pretrained layer; A smaller, like the SVD factor of W's quantisation
    error. Drawn from a generator of its own (the same weight for a (K, N, rank) in any test),
    and cached because the large ones take a while to draw (at most 32 of at most 72 MB: every
    (shape, rank) of the GEMM tests, shared by the forward and the dgrad tests); the inputs of
    each test are fresh."""
    g = torch.Generator().manual_seed(K * 1_000_003 + N * 101 + rank)
    w = torch.randn(N, K, generator=g) * 0.02
    a = torch.randn(rank, K, generator=g) * 0.005
    pad = torch.zeros(ops.padded_rank(rank) - rank, K)
    q, s = falqon.quantize(torch.cat([w, a, pad]), E4M3)
    return q, s


def random_activations(shape, dtype: torch.dtype, amax_row: int = 0) -> torch.Tensor:
    """Standard normal values in `shape`, and the largest magnitude (1.5 x the others') in the
    given row of the flattened (M, K) view, so that any set of rows that holds that row has the
    same per-tensor amax, hence the same FP8 scale, as the whole tensor (see subset_rows)."""
    x = torch.randn(shape, dtype=torch.float32)
    flat = x.view(-1, shape[-1])
    if flat.numel():
        flat[amax_row, 0] = 1.5 * flat.abs().max()
    return x.to(dtype)


def subset_rows(M: int, limit: int = 2048) -> torch.Tensor | None:
    """Rows of an (M, K) operand on which the CPU reference is evaluated, or None for all of them.

    The CPU reference of an 8192 x 13824 x 5120 product takes seconds even on many cores; rows of
    a per-tensor-scaled GEMM are independent once the scale is fixed, and the scale is fixed by
    the amax, which random_activations puts in row 0. So for large M the CPU op runs on row 0,
    the first and last 128 rows (the edge tiles) and 128 random rows in between, and gives
    exactly the rows the full CPU op would."""
    if M <= limit:
        return None
    middle = torch.randperm(M - 256)[:128] + 128
    return torch.cat([torch.arange(128), middle.sort().values, torch.arange(M - 128, M)])


def scaled_mm_floor(a_q: torch.Tensor, s_a: torch.Tensor, b_q_t: torch.Tensor, s_b: torch.Tensor,
                    fast_accum: bool) -> torch.Tensor | None:
    """(a_q @ b_q_t) * (s_a s_b) in fp32 through torch._scaled_mm on the GPU: the GPU's own FP8
    GEMM of the operands the op uses, whose error against the CPU reference is the accumulation
    floor of gemm_tolerance. b_q_t is (K, cols) column-major; s_a one value or a column of row
    scales (M, 1). Returned on the CPU; None where it
    cannot run (a dry run on the CPU, or operands _scaled_mm rejects)."""
    if DRY_RUN or not torch.cuda.is_available() or a_q.shape[0] == 0:
        return None
    M = a_q.shape[0]
    # Zero rows up to a multiple of 16 (some FP8 GEMM paths want it); they change no other row.
    a = torch.nn.functional.pad(a_q.view(torch.uint8), (0, 0, 0, -M % 16)).view(a_q.dtype).cuda()
    b = b_q_t.cuda()
    if s_a.dim() == 2:  # row scales (M, 1): padded with the rows
        s_a = torch.nn.functional.pad(s_a, (0, 0, 0, -M % 16), value=1.0)
    s_a, s_b = s_a.cuda(), s_b.cuda()
    one = torch.ones((), device="cuda")
    try:
        # fp32 out with unit scales, then the scales in the order the reference applies them
        # (acc x (s_a s_b)), so that only the accumulation differs.
        acc = torch._scaled_mm(a, b, one, one, out_dtype=torch.float32, use_fast_accum=fast_accum)
        acc = acc * (s_a * s_b)
    except RuntimeError:
        try:  # no fp32 output for these operands: bf16 out (one more rounding, a looser floor)
            acc = torch._scaled_mm(a, b, s_a, s_b, out_dtype=torch.bfloat16,
                                   use_fast_accum=fast_accum).float()
        except RuntimeError:
            return None
    return acc[:M].cpu()


def fp8_codes_sorted(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of an FP8 format, ascending, as float32."""
    codes = torch.arange(0, 0x80, dtype=torch.uint8).view(dtype).float()
    return codes[torch.isfinite(codes)].sort().values


def emulation_subset(cases, small):
    """The emulated re-run (test_cuda_ops.test_emulated_path_matches_cpu) keeps only the small
    cases: it proves the fallback path, and the large ones would only repeat the CPU reference's
    cost."""
    return [c for c in cases if small(c)] if EMULATED else cases


# ---- inputs and checks of the quantisation tests ------------------------------------------------
# (test_cuda_quantize.py, test_cuda_row_scales.py; delayed_history also test_cuda_ops.py's)

def wide_range(shape, dtype):
    """Normal values times a log-normal factor: magnitudes over ~12 binades, so that the FP8
    results cover subnormals and every exponent of the format. Kept finite in the input dtype
    (a rare |x| > 65504 would be Inf in fp16, which has a test of its own)."""
    x = torch.randn(shape) * torch.exp(2 * torch.randn(shape))
    return x.clamp(-6e4, 6e4).to(dtype)


def check_quantize(x_dev, x_cpu, dtype, what, rows=False):
    """falqon.quantize (rows: quantize_rows, a scale per row) on the device against the CPU: the
    FP8 values bitwise and the scales equal."""
    op = falqon.quantize_rows if rows else falqon.quantize
    q_d, s_d = op(x_dev, dtype)
    q_c, s_c = op(x_cpu, dtype)
    assert q_d.device == x_dev.device and s_d.device == x_dev.device, what
    assert q_d.dtype == dtype and q_d.shape == x_dev.shape and q_d.is_contiguous(), what
    assert s_d.dtype == torch.float32 and s_d.shape == (x_dev.shape[:-1] if rows else ()), what
    assert_fp8_equal(q_d, q_c, what)
    # amax is exact and amax / fmax one correctly rounded division on both: the same float32.
    s_d = s_d.cpu()
    same = (s_d == s_c) | (s_d.isnan() & s_c.isnan())
    assert bool(same.all()), (what, s_d[~same][:4], s_c[~same][:4])
    return q_d, s_d


# Non-contiguous inputs and storage offsets that are not a multiple of the vector width.
VIEWS = {
    "transposed": lambda t: t.t(),
    "strided_cols": lambda t: t[:, ::3],
    "offset_1": lambda t: t.flatten()[1:],
    "offset_3_odd_len": lambda t: t.flatten()[3:-2],
}


def delayed_history(kind: str, amax: float, H: int = 16) -> torch.Tensor:
    """An amax history (float32, H values, fresh random) relative to the input's amax."""
    h = torch.rand(H) * 0.5 + 0.25
    if kind == "empty":               # nothing recorded: the kernel takes the two-pass path
        return torch.zeros(H)
    if kind == "below":               # the input exceeds the history: its top saturates
        h[H // 2:] = 0                # a partly filled history
        return h * amax
    if kind == "above":
        return (h + 1.5) * amax
    if kind == "nan":                 # max(history) is NaN: the input's own amax, as the CPU
        h[H - 1] = float("nan")
        return h * amax
    raise ValueError(kind)
