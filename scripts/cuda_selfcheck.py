"""Self-check of falqon's CUDA kernels against the CPU reference, and their timings.

    python scripts/cuda_selfcheck.py            # all checks, then timings at LLaMA-7B shapes
    python scripts/cuda_selfcheck.py --quick    # small shapes only, no timings
    python scripts/cuda_selfcheck.py --no-timings
    FALQON_QUANTIZE=fused python scripts/cuda_selfcheck.py --timings-only   # the layer with the
                                                    # other quantise (read once per process)

For every op, fresh random inputs are run on the GPU and, copied to the CPU, through the CPU
reference (torch.ops.falqon on CPU tensors = csrc/reference.cpp); the script prints the errors
and PASS/FAIL per case and exits with status 1 if any case fails. Elementwise ops (quantize,
transpose) must match bit for bit; GEMM outputs within tolerances explained at `gemm_tol`.
Timings: CUDA events, median of 50 runs after warm-up, L2 flushed before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import falqon  # noqa: E402
from falqon import ops  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
bench_ops = None  # torch.ops.falqon_bench, present in CUDA builds

LLAMA7B = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in_features K, out_features N)
LLAMA13B = [(5120, 5120), (5120, 13824), (13824, 5120)]

failures: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok:
        failures.append(name)


def rel_fro(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def max_norm_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """FP8 tensors equal byte for byte, NaNs compared as NaN (the reference's NaN sign depends on
    the CPU's NaN propagation, the GPU's arithmetic gives the canonical positive NaN)."""
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = a.float().isnan(), b.float().isnan()
    return bool(torch.equal(nan_a, nan_b)
                and torch.equal(a.view(torch.uint8)[~nan_a], b.view(torch.uint8)[~nan_b]))


def gemm_tol(out_dtype: torch.dtype, fast_accum: bool) -> float:
    """Tolerance on ||out - ref||_F / ||ref||_F for an FP8 GEMM output.

    Both sides multiply the same FP8 values exactly; they differ in the order (and, with fast
    accumulation, the precision) of the fp32 sums, then round to the output dtype. Rounding alone
    flips at most one ulp where the sums differ: <= 2^-8 relative for bf16, 2^-11 for fp16.
    cuBLASLt's fast accumulation keeps partial sums at reduced precision inside the tensor core
    (DeepSeek-V3 reports about 2^-7 worst-case relative error at K = 4096 without promotion), so
    we allow 2^-7 there and 2^-8 otherwise. A wrong layout, transpose or scale gives O(1)."""
    return 2.0 ** -7 if fast_accum else 2.0 ** -8


def rand_act(shape, dtype, device="cuda") -> torch.Tensor:
    """Random activations: normal with a few large outliers, never zero."""
    x = torch.randn(shape, device=device, dtype=torch.float32)
    if x.numel():
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 1000),), device=device)
        flat[idx] *= 20.0
    return x.to(dtype)


def melded_weight(K: int, N: int, r: int, device="cuda"):
    """A melded weight [W; A; 0] (FP8 E4M3) with its scale, from random W and A."""
    rows = N + ops.padded_rank(r)
    w = torch.zeros(rows, K, dtype=torch.float32)
    w[:N] = torch.randn(N, K) * 0.02
    w[N:N + r] = torch.randn(r, K) * 0.01
    q, s = torch.ops.falqon.quantize(w, E4M3)  # CPU reference quantisation
    return q.to(device), s.to(device)


# ---- quantize -----------------------------------------------------------------------------------

def check_quantize(quick: bool) -> None:
    print("\n== quantize (bitwise vs the CPU reference) ==")
    impls = ["op", "twopass", "fused"]

    def run(x, dtype, impl):
        if impl == "op":
            return torch.ops.falqon.quantize(x, dtype)
        return bench_ops.quantize(x, dtype, impl)

    cases = []
    sizes = [(1, 4096), (7, 4096), (1001,), (3, 5, 7), (0, 16)]
    if not quick:
        sizes += [(8192, 4096), (8192, 11008)]
    for size in sizes:
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            cases.append((f"{tuple(size)} {dt}", lambda size=size, dt=dt: rand_act(size, dt)))
    # Layout and value corner cases.
    cases += [
        ("unaligned storage offset", lambda: rand_act((4097,), torch.bfloat16)[1:]),
        ("non-contiguous (transposed)", lambda: rand_act((64, 48), torch.bfloat16).t()),
        ("single element", lambda: rand_act((1,), torch.float32)),
        ("all zeros (scale 1)", lambda: torch.zeros(7, 33, device="cuda", dtype=torch.bfloat16)),
        ("tiny values (scale < 2^-60)", lambda: rand_act((9, 100), torch.float32) * 1e-22),
        ("huge values (scale > 2^60)", lambda: rand_act((9, 100), torch.float32) * 1e25),
        ("subnormal inputs", lambda: rand_act((5, 64), torch.float32) * 1e-40),
        ("with +Inf", lambda: rand_act((7, 64), torch.float32).index_fill_(1, torch.tensor([3], device="cuda"), float("inf"))),
        ("with NaN", lambda: rand_act((7, 64), torch.bfloat16).index_fill_(1, torch.tensor([5], device="cuda"), float("nan"))),
        ("negative zeros", lambda: torch.cat([-torch.zeros(40, device="cuda"), rand_act((40,), torch.float32)])),
    ]
    for name, make in cases:
        x = make()
        ref = {dt: torch.ops.falqon.quantize(x.cpu(), dt) for dt in (E4M3, E5M2)}
        for dt in (E4M3, E5M2):
            q_ref, s_ref = ref[dt]
            for impl in impls:
                q, s = run(x, dt, impl)
                s_ok = (s.cpu().isnan() & s_ref.isnan()).item() or torch.equal(s.cpu(), s_ref)
                ok = same_bits(q, q_ref) and s_ok and q.shape == x.shape and s.dim() == 0
                report(f"quantize {name} -> {str(dt)[6:]} [{impl}]", ok,
                       "" if ok else f"scale {s.item()} vs {s_ref.item()}, "
                       f"{(q.cpu().view(torch.uint8) != q_ref.view(torch.uint8)).sum().item()} bytes differ")


def check_quantize_delayed() -> None:
    print("\n== quantize_delayed (bitwise vs the CPU reference) ==")
    for dt_in in (torch.bfloat16, torch.float32):
        for dt in (E4M3, E5M2):
            for size in [(7, 4096), (1001,), (256, 1024)]:
                x = rand_act(size, dt_in)
                amax_true = x.float().abs().amax()
                # Half the true amax (the top saturates), then an empty history (current scaling).
                for name, hist in (("history", torch.stack([amax_true * 0.5, amax_true * 0.25])),
                                   ("empty history", torch.zeros(16, device="cuda"))):
                    q, s, amax = torch.ops.falqon.quantize_delayed(x, dt, hist)
                    q_ref, s_ref, amax_ref = torch.ops.falqon.quantize_delayed(x.cpu(), dt, hist.cpu())
                    ok = (same_bits(q, q_ref) and torch.equal(s.cpu(), s_ref)
                          and torch.equal(amax.cpu(), amax_ref))
                    report(f"quantize_delayed {tuple(size)} {dt_in} -> {str(dt)[6:]}, {name}", ok)


# ---- transpose ----------------------------------------------------------------------------------

def check_transpose(quick: bool) -> None:
    print("\n== transpose_fp8 (bitwise) ==")
    shapes = [(16, 16), (48, 80), (80, 48), (4096, 4096 + 16)]
    if not quick:
        shapes += [(11008, 4096), (4096, 11008)]
    for rows, cols in shapes:
        w = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device="cuda")
        ok = torch.equal(bench_ops.transpose_fp8(w.view(E4M3)).view(torch.uint8), w.t().contiguous())
        report(f"transpose {rows}x{cols}", ok)
    flat = torch.randint(0, 256, (1 + 48 * 80,), dtype=torch.uint8, device="cuda")
    w = flat[1:].view(48, 80)  # contiguous, storage offset 1: the unaligned path
    ok = torch.equal(bench_ops.transpose_fp8(w.view(E4M3)).view(torch.uint8), w.t().contiguous())
    report("transpose 48x80 at an unaligned offset", ok)


# ---- melded_linear and its input gradient ---------------------------------------------------------

def check_linear(quick: bool) -> None:
    print("\n== melded_linear / melded_linear_grad_input (vs the CPU reference) ==")
    fast_fwd = os.environ.get("FALQON_FAST_ACCUM_FWD", "1") not in ("0", "false", "no", "off")
    fast_bwd = os.environ.get("FALQON_FAST_ACCUM_DGRAD", "1") not in ("0", "false", "no", "off")
    cases = []
    for K, N in LLAMA7B + LLAMA13B:
        for M in (1, 7):
            for r in (8, 16, 64):
                cases.append((M, K, N, r, torch.bfloat16))
    for dt in (torch.float16, torch.float32):
        cases.append((7, 4096, 4096, 16, dt))
        cases.append((33, 256, 512, 8, dt))
    if not quick:
        for K, N in LLAMA7B:
            cases.append((8192, K, N, 64, torch.bfloat16))
        for K, N in LLAMA13B:
            cases.append((8192, K, N, 64, torch.bfloat16))
    for M, K, N, r, dt in cases:
        w, s = melded_weight(K, N, r)
        lora_B = torch.randn(N, r, device="cuda") * 0.01
        x = rand_act((M, K), dt)
        with_bias = M == 7
        bias = torch.randn(N, device="cuda").to(dt) if with_bias else None
        y, xa, _ = torch.ops.falqon.melded_linear(x, w, s, lora_B, bias)
        y_ref, xa_ref, _ = torch.ops.falqon.melded_linear(x.cpu(), w.cpu(), s.cpu(), lora_B.cpu(),
                                                      None if bias is None else bias.cpu())
        tol = gemm_tol(dt, fast_fwd)
        e_y, e_xa = rel_fro(y, y_ref), rel_fro(xa, xa_ref)
        layout_ok = (y.shape == (M, N) and y.stride() == (N + ops.padded_rank(r), 1)
                     and xa.shape == (M, r) and xa.is_contiguous() and y.dtype == dt)
        report(f"melded_linear M={M} {K}->{N} r={r} {dt}{' +bias' if with_bias else ''}",
               layout_ok and e_y <= tol and e_xa <= tol,
               f"rel err y {e_y:.2e} xa {e_xa:.2e} (tol {tol:.1e}), max-norm err y {max_norm_err(y, y_ref):.2e}")
        g = rand_act((M, N), dt)
        for gdt in (E5M2, E4M3):
            for with_t in (False, True):
                wt = w[:N].t().contiguous() if with_t else None
                dx, _ = torch.ops.falqon.melded_linear_grad_input(g, w, s, wt, gdt)
                dx_ref, _ = torch.ops.falqon.melded_linear_grad_input(
                    g.cpu(), w.cpu(), s.cpu(), None if wt is None else wt.cpu(), gdt)
                tol = gemm_tol(dt, fast_bwd)
                e = rel_fro(dx, dx_ref)
                report(f"grad_input M={M} {K}->{N} {dt} g:{str(gdt)[6:]} {'weight_t' if with_t else 'transpose'}",
                       e <= tol and dx.shape == (M, K) and dx.dtype == dt, f"rel err {e:.2e} (tol {tol:.1e})")
            if M > 7:
                break  # large M: E5M2 only (the default), to bound the CPU reference's time
    # Leading dimensions and an fp32 bias with a bf16 input (rounded to bf16 for the epilogue).
    w, s = melded_weight(256, 128, 8)
    x = rand_act((2, 3, 256), torch.bfloat16)
    bias = torch.randn(128, device="cuda")
    B = torch.zeros(128, 8, device="cuda")
    y, xa, _ = torch.ops.falqon.melded_linear(x, w, s, B, bias)
    y_ref, xa_ref, _ = torch.ops.falqon.melded_linear(x.cpu(), w.cpu(), s.cpu(), B.cpu(), bias.cpu())
    e = rel_fro(y, y_ref)
    report("melded_linear 3-D input, fp32 bias with bf16 input", y.shape == (2, 3, 128) and e <= 2.0 ** -7,
           f"rel err {e:.2e}")


# ---- topk_update_ ---------------------------------------------------------------------------------

def check_topk(quick: bool) -> None:
    print("\n== topk_update_ (vs the CPU reference) ==")
    shapes = [(256, 512, 8), (4096, 4096, 64)] if quick else [
        (256, 512, 8), (4096, 4096, 64), (4096, 11008, 64), (11008, 4096, 16), (5120, 13824, 64)]
    for K, N, r in shapes:
        for keep_residual in (False, True):
            for b_dtype in (torch.float32, torch.bfloat16):
                for with_t in (False, True):
                    k = 10
                    # W' in the scaled domain with values up to ~100, A_q likewise: updates of a few
                    # units change many FP8 values (E4M3 steps are 4-8 there).
                    wf = (torch.randn(N + ops.padded_rank(r), K) * 40).clamp(-448, 448)
                    wf[N + r:] = 0
                    w = wf.to(E4M3).cuda()
                    B = torch.randn(N, r) * 1e-3
                    chosen = torch.randperm(N)[:k]
                    B[chosen] *= 20.0 + torch.arange(k, dtype=torch.float32).unsqueeze(1)  # clear top-k
                    B = B.to(b_dtype).cuda()
                    wt = w[:N].t().contiguous() if with_t else None
                    w_c, B_c = w.cpu().clone(), B.cpu().clone()
                    w0 = w_c.clone()
                    wt_c = None if wt is None else wt.cpu().clone()
                    torch.ops.falqon.topk_update_(w, B, wt, k, 0.5, keep_residual)
                    torch.ops.falqon.topk_update_(w_c, B_c, wt_c, k, 0.5, keep_residual)
                    # Equal bytes, except where the fp32 sum of r products, accumulated in another
                    # order, lands on the other side of an FP8 rounding midpoint: one step apart.
                    diff = (w.cpu().view(torch.uint8).int() - w_c.view(torch.uint8).int()).abs()
                    changed = bool((w_c.view(torch.uint8) != w0.view(torch.uint8)).any())
                    n_diff = int((diff != 0).sum())
                    ok = (int(diff.max()) <= 1 and n_diff <= max(2, k * K // 1000) and changed
                          and torch.equal(B.cpu(), B_c))
                    if with_t:
                        ok = ok and torch.equal(wt.cpu().view(torch.uint8), w[:N].t().contiguous().cpu().view(torch.uint8))
                    report(f"topk_update_ {K}x{N} r={r} B:{b_dtype} keep_residual={keep_residual}"
                           f"{' weight_t' if with_t else ''}", ok,
                           f"{n_diff} bytes one step apart; the update changed the weight: {changed}")
    # k beyond N and k = 0.
    w, _ = melded_weight(64, 32, 8)
    B = torch.randn(32, 8, device="cuda")
    w_c, B_c = w.cpu().clone(), B.cpu().clone()
    torch.ops.falqon.topk_update_(w, B, None, 100, 1.0, False)
    torch.ops.falqon.topk_update_(w_c, B_c, None, 100, 1.0, False)
    diff = (w.cpu().view(torch.uint8).int() - w_c.view(torch.uint8).int()).abs()
    report("topk_update_ k > N", int(diff.max()) <= 1 and bool((B == 0).all()))
    B = torch.randn(32, 8, device="cuda")
    before = w.clone()
    torch.ops.falqon.topk_update_(w, B, None, 0, 1.0, True)
    ok_keep = torch.equal(w.view(torch.uint8), before.view(torch.uint8)) and bool((B != 0).all())
    torch.ops.falqon.topk_update_(w, B, None, 0, 1.0, False)
    report("topk_update_ k = 0", ok_keep and bool((B == 0).all()))


# ---- meld_init --------------------------------------------------------------------------------------

def check_meld_init(quick: bool) -> None:
    print("\n== meld_init (vs the CPU reference) ==")
    cases = [(512, 1024, 16, "randomized"), (1024, 512, 64, "randomized"), (256, 256, 8, "exact")]
    if not quick:
        cases.append((4096, 4096, 64, "randomized"))
    for N, K, r, svd in cases:
        w = (torch.randn(N, K) * 0.02).to(torch.bfloat16)
        q, s = torch.ops.falqon.meld_init(w.cuda(), r, svd, 16, 4, 0)
        q_ref, s_ref = torch.ops.falqon.meld_init(w, r, svd, 16, 4, 0)
        q, s = q.cpu(), s.cpu()
        w_bytes_ok = torch.equal(q[:N].view(torch.uint8), q_ref[:N].view(torch.uint8))
        pad_ok = bool((q[N + r:].view(torch.uint8) == 0).all())
        # A comes from a float32 QR/SVD on another device: close, not equal; after FP8 rounding
        # (steps of 6-12%) a few values land one step apart.
        a, a_ref = q[N:N + r].float() * s, q_ref[N:N + r].float() * s_ref
        e_a = rel_fro(a, a_ref)
        frac = (q[N:N + r].view(torch.uint8) != q_ref[N:N + r].view(torch.uint8)).float().mean().item()
        ok = torch.equal(s, s_ref) and w_bytes_ok and pad_ok and e_a <= 0.05 and frac <= 0.05
        report(f"meld_init {N}x{K} r={r} {svd}", ok,
               f"scale equal {torch.equal(s, s_ref)}, W rows equal {w_bytes_ok}, A rel err {e_a:.2e}, "
               f"A bytes differing {frac:.2%}")


# ---- emulation, CUDA graphs, host synchronisation ------------------------------------------------

def emulation_probe() -> int:
    """Run in a subprocess with FALQON_FORCE_EMULATION=1: the ops must warn and match the CPU."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w, s = melded_weight(256, 128, 8)
        x = rand_act((7, 256), torch.bfloat16)
        B = torch.randn(128, 8, device="cuda")
        y, _, _ = torch.ops.falqon.melded_linear(x, w, s, B)
        y_ref, _, _ = torch.ops.falqon.melded_linear(x.cpu(), w.cpu(), s.cpu(), B.cpu())
        q, sq = torch.ops.falqon.quantize(x, E4M3)
        q_ref, _ = torch.ops.falqon.quantize(x.cpu(), E4M3)
        torch.cuda.synchronize()
    warned = any("emulates FP8" in str(c.message) for c in caught)
    # The emulated quantize runs ATen's CUDA kernels, whose tensor / CPU-scalar division is a
    # reciprocal multiply: its scale may differ from the CPU's by an ulp, so q is compared loosely.
    q_close = (q.cpu().float() - q_ref.float()).abs().max().item() <= 32
    e = rel_fro(y, y_ref)
    ok = warned and e <= 2.0 ** -8 and q_close
    print(json.dumps({"warned": warned, "rel_err": e, "q_close": q_close, "ok": ok}))
    return 0 if ok else 1


def check_emulation() -> None:
    print("\n== FALQON_FORCE_EMULATION=1 (subprocess) ==")
    env = dict(os.environ, FALQON_FORCE_EMULATION="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--emulation-probe"],
                          env=env, capture_output=True, text=True, timeout=300)
    report("emulated path warns and matches the CPU", proc.returncode == 0,
           (proc.stdout.strip().splitlines() or [""])[-1] + (proc.stderr.strip()[-500:] if proc.returncode else ""))


def capture_and_replay(fn):
    """fn's outputs from a CUDA graph replay (after a warm-up on the capture stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # plans, workspaces, kernel attributes: nothing is created during capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    graph.replay()
    torch.cuda.synchronize()
    return outs


def check_graphs_and_sync() -> None:
    print("\n== CUDA graph capture and host synchronisation ==")
    K, N, r, M = 1024, 512, 16, 256
    w, s = melded_weight(K, N, r)
    x = rand_act((M, K), torch.bfloat16)
    g = rand_act((M, N), torch.bfloat16)
    B = torch.randn(N, r, device="cuda") * 0.01

    def layer():
        return (bench_ops.quantize(x, E4M3, "twopass"),
                torch.ops.falqon.melded_linear(x, w, s, B)[0],
                torch.ops.falqon.melded_linear_grad_input(g, w, s)[0])

    def fused():
        return bench_ops.quantize(x, E4M3, "fused")

    eager, eager_fused = layer(), fused()
    torch.cuda.synchronize()
    # No host synchronisation: torch raises on any synchronising call it knows of.
    try:
        torch.cuda.set_sync_debug_mode("error")
        layer()
        fused()
        w2, B2 = w.clone(), B.clone()
        torch.ops.falqon.topk_update_(w2, B2, None, 10, 1.0, False)
        torch.cuda.set_sync_debug_mode("default")
        report("no host synchronisation (quantize, forward, grad_input, topk_update_)", True)
    except RuntimeError as exc:
        torch.cuda.set_sync_debug_mode("default")
        report("no host synchronisation", False, str(exc)[:300])
    try:
        (q2, _), y, dx = capture_and_replay(layer)
        # The GEMMs are compared loosely: a split-k algorithm may reduce in another order.
        e = max(rel_fro(y, eager[1]), rel_fro(dx, eager[2]))
        report("CUDA graph: two-pass quantize, forward, grad_input replay as eager",
               same_bits(q2, eager[0][0]) and e <= 2.0 ** -8, f"GEMM outputs rel err {e:.1e}")
    except RuntimeError as exc:
        report("CUDA graph: two-pass quantize, forward, grad_input", False, str(exc)[:300])
    try:
        qf, sf = capture_and_replay(fused)
        report("CUDA graph: fused (cooperative) quantize replays as eager",
               same_bits(qf, eager_fused[0]) and torch.equal(sf, eager_fused[1]))
    except RuntimeError as exc:
        report("CUDA graph: fused (cooperative) quantize", False, str(exc)[:300])


# ---- timings --------------------------------------------------------------------------------------

_flush = None


def bench(fn, iters: int = 50, warmup: int = 10) -> float:
    """Median ms of fn over `iters` runs (CUDA events), L2 flushed before each run."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timings() -> dict:
    print("\n== timings (ms, median of 50, M = 8192, r = 64, bf16) ==")
    results = {}
    M, r = 8192, 64
    hbm = 3.0e9  # bytes per ms at 3 TB/s, for the bandwidth column
    for K, N in LLAMA7B:
        tag = f"{K}->{N}"
        w, s = melded_weight(K, N, r)
        x = rand_act((M, K), torch.bfloat16)
        g = rand_act((M, N), torch.bfloat16)
        B = torch.zeros(N, r, device="cuda")
        wt = w[:N].t().contiguous()
        xq, sx = torch.ops.falqon.quantize(x, E4M3)
        gq, sg = torch.ops.falqon.quantize(g, E5M2)
        history = torch.zeros(16, device="cuda")
        history[3] = x.float().abs().amax()
        row = {}
        nx = x.numel()
        row["quantize x twopass"] = bench(lambda: bench_ops.quantize(x, E4M3, "twopass"))
        row["quantize x fused"] = bench(lambda: bench_ops.quantize(x, E4M3, "fused"))
        row["quantize x delayed"] = bench(lambda: torch.ops.falqon.quantize_delayed(x, E4M3, history))
        row["quantize g twopass"] = bench(lambda: bench_ops.quantize(g, E5M2, "twopass"))
        row["quantize g fused"] = bench(lambda: bench_ops.quantize(g, E5M2, "fused"))
        row["fwd GEMM fast-accum"] = bench(lambda: bench_ops.scaled_gemm(w, s, xq, sx, torch.bfloat16, True))
        row["fwd GEMM"] = bench(lambda: bench_ops.scaled_gemm(w, s, xq, sx, torch.bfloat16, False))
        row["transpose W"] = bench(lambda: bench_ops.transpose_fp8(w[:N]))
        row["dgrad GEMM"] = bench(lambda: bench_ops.scaled_gemm(wt, s, gq, sg, torch.bfloat16, False))
        row["dgrad GEMM fast-accum"] = bench(lambda: bench_ops.scaled_gemm(wt, s, gq, sg, torch.bfloat16, True))
        row["melded_linear op"] = bench(lambda: torch.ops.falqon.melded_linear(x, w, s, B))
        row["grad_input op (transpose)"] = bench(lambda: torch.ops.falqon.melded_linear_grad_input(g, w, s))
        row["grad_input op (weight_t)"] = bench(lambda: torch.ops.falqon.melded_linear_grad_input(g, w, s, wt))
        Bk = torch.randn(N, r, device="cuda") * 1e-3
        w_upd = w.clone()

        def topk():
            Bk.normal_()  # the update zeroes B; fresh rows every run (inside the timing, ~µs)
            torch.ops.falqon.topk_update_(w_upd, Bk, None, 10, 1.0, False)

        row["topk_update_ k=10"] = bench(topk)
        row["randn B (inside topk timing)"] = bench(lambda: Bk.normal_())

        # One layer fwd+bwd: FALQON vs a bf16 LoRA layer (W frozen, A and B trained, x needs grad).
        B_param = torch.zeros(N, r, device="cuda", requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)

        def falqon_layer(weight_t=None):
            xr.grad = B_param.grad = None  # no gradient accumulation kernels in the timing
            ops.melded_linear(xr, w, s, B_param, None, weight_t).backward(g)

        W16 = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
        A16 = (torch.randn(r, K, device="cuda") * 0.01).to(torch.bfloat16).requires_grad_(True)
        B16 = torch.zeros(N, r, device="cuda", dtype=torch.bfloat16, requires_grad=True)

        def lora_layer():
            xr.grad = A16.grad = B16.grad = None
            y = torch.nn.functional.linear(xr, W16) + torch.nn.functional.linear(
                torch.nn.functional.linear(xr, A16), B16)
            y.backward(g)

        row["layer fwd+bwd FALQON"] = bench(falqon_layer)
        row["layer fwd+bwd FALQON weight_t"] = bench(lambda: falqon_layer(wt))
        row["layer fwd+bwd bf16 LoRA"] = bench(lora_layer)
        results[tag] = row
        print(f"\n{tag}  (x: {nx * 2 / 2**20:.0f} MiB bf16; one read of it at 3 TB/s = {nx * 2 / hbm * 1e3:.1f} us)")
        for name, ms in row.items():
            print(f"  {name:34s} {ms * 1e3:9.1f} us")
        print(f"  speed-up over bf16 LoRA: {row['layer fwd+bwd bf16 LoRA'] / row['layer fwd+bwd FALQON']:.2f}x "
              f"(weight_t: {row['layer fwd+bwd bf16 LoRA'] / row['layer fwd+bwd FALQON weight_t']:.2f}x); "
              f"floor (fwd GEMM fast-accum + dgrad GEMM): "
              f"{(row['fwd GEMM fast-accum'] + row['dgrad GEMM']) * 1e3:.0f} us")

    # meld_init of LLaMA-7B's 224 layers, from the three shapes' times.
    melds = {}
    for K, N in LLAMA7B:
        w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
        torch.ops.falqon.meld_init(w, 64)  # warm-up (cuSOLVER handles, plans)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(3):
            start.record()
            torch.ops.falqon.meld_init(w, 64)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        melds[f"{K}->{N}"] = statistics.median(times)
    total_s = 32 * (4 * melds["4096->4096"] + 2 * melds["4096->11008"] + melds["11008->4096"]) / 1e3
    print("\nmeld_init r=64 (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in melds.items()))
    print(f"LLaMA-7B (224 layers) estimated meld time: {total_s:.1f} s (target < 30 s)")
    results["meld_init_ms"] = melds
    results["meld_7b_estimate_s"] = total_s
    return results


def main() -> int:
    global bench_ops
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only, no timings")
    parser.add_argument("--no-timings", action="store_true")
    parser.add_argument("--timings-only", action="store_true", help="skip the checks")
    parser.add_argument("--json", help="write the timings to this file")
    parser.add_argument("--emulation-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("cuda_selfcheck: no CUDA device; nothing to check")
        return 1
    torch.manual_seed(0)
    if args.emulation_probe:
        return emulation_probe()
    if not hasattr(torch.ops, "falqon_bench") or not hasattr(torch.ops.falqon_bench, "quantize"):
        print("cuda_selfcheck: falqon was built without its CUDA kernels (falqon_bench missing)")
        return 1
    bench_ops = torch.ops.falqon_bench
    print(f"device: {torch.cuda.get_device_name()} (cc {'.'.join(map(str, torch.cuda.get_device_capability()))}), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}, falqon build {falqon.build_info()}")
    print("env: " + ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in (
        "FALQON_QUANTIZE", "FALQON_FAST_ACCUM_FWD", "FALQON_FAST_ACCUM_DGRAD", "FALQON_FORCE_EMULATION")))
    if torch.cuda.get_device_capability() < (8, 9):
        print("this GPU has no FP8: only the emulated path can be checked")
        return emulation_probe()
    if not args.timings_only:
        check_quantize(args.quick)
        check_quantize_delayed()
        check_transpose(args.quick)
        check_linear(args.quick)
        check_topk(args.quick)
        check_meld_init(args.quick)
        check_graphs_and_sync()
        check_emulation()
    if not (args.quick or args.no_timings):
        results = timings()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "timings_ms": results}, f, indent=1)
    print(f"\n{'ALL PASS' if not failures else f'{len(failures)} FAILED: ' + ', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
