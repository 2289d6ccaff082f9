"""The adapter mode's cuBLASLt GEMMs through every algorithm cuBLASLt's heuristic offers for
falqon's descriptors, not only its first choice (which csrc/cuda/gemm.cu takes). Run 102 found a
faster one for u = scaling g B; runs 85 and 89 saw the heuristic take a 128x128 tile for FP8
GEMMs with outer-vector scales at a contraction of 11,008 (+15 us against the per-tensor
128x256). Builds gemm_algos.cpp with torch.utils.cpp_extension.load (needs nvcc and cublasLt.h;
no falqon build).

    python benchmarks/route_probe/gemm_algos.py            # M = 8192, the LLaMA-7B shapes, r = 64
    python benchmarks/route_probe/gemm_algos.py --gemms u  # one GEMM (run 102's question)
    python benchmarks/route_probe/gemm_algos.py --gemms fwd,adapter,fwd_w,fwd_w_c,xa,z  # run 106

GEMMs (K -> N at M rows): fwd = x_q W'^T with row scales of x and W' (N + r16 outputs, the
adapter mode's forward), fwd_tensor = the same with per-tensor scales (the other modes),
dgrad = [g | u | 0]_q W' (E5M2 x E4M3, per tensor, K outputs), adapter = y_base + scaling xa B^T
(bf16, C strided as the forward's product), u = scaling g B (fp32 out). The C route's GEMMs
(run 106): fwd_w = the forward over W alone (N outputs, row scales), fwd_w_c = the same with a
bf16 C added in the epilogue, xa = x_q A_q^T (r16 outputs), z = scaling xa B^T (no C).

Prints a table (median us a call of 20 calls queued between two CUDA events; each algorithm's
largest difference from the first's, relative to the first's peak; 0 = bitwise the same output)
and writes benchmarks/results/gemm_algos_<gpu>.json.
"""

from __future__ import annotations

import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
GEMMS = ("fwd", "fwd_tensor", "dgrad", "adapter", "u")
# The route that adds the adapter in the forward GEMM's epilogue as cuBLASLt's C: xa = x_q A_q^T
# first (an FP8 GEMM of r16 outputs), z = scaling xa B^T (bf16, written once), then y = x_q W^T +
# z (the GEMM over W alone, C = z): against fwd + adapter above.
C_ROUTE = ("fwd_w", "fwd_w_c", "xa", "z")
RANK = 64  # r16 = 64 too: no padding rows
SCALING = 2.0
BATCH = 20
MAX_ALGOS = 16


def build():
    """gemm_algos.cpp (host code only) linked against the toolkit's libcublasLt, or the one of
    torch's nvidia-cublas wheel."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    site = pathlib.Path(torch.__file__).resolve().parents[1]
    libdirs = [pathlib.Path(CUDA_HOME or "/usr/local/cuda") / "lib64", site / "nvidia/cu13/lib"]
    ldflags = []
    for libdir in libdirs:
        libs = sorted(libdir.glob("libcublasLt.so*"), key=lambda p: len(p.name))
        if libs:
            ldflags = [f"-L{libdir}", f"-l:{libs[0].name}", f"-Wl,-rpath,{libdir}"]
            break
    return load("falqon_gemm_algos_probe", [str(HERE / "gemm_algos.cpp")],
                extra_include_paths=[str(site / "nvidia/cu13/include")],
                extra_cflags=["-O2"], extra_ldflags=ldflags, with_cuda=True, verbose=False)


def problem(mod, gemm: str, M: int, K: int, N: int):
    """(handle, output tensor, bytes the GEMM must move at least) for one GEMM on random data."""
    dev = "cuda"
    rows = N + RANK
    if gemm in ("fwd", "fwd_tensor", "fwd_w", "fwd_w_c", "xa"):
        rows = {"fwd_w": N, "fwd_w_c": N, "xa": RANK}.get(gemm, rows)
        w = torch.randn(rows, K, device=dev).to(torch.float8_e4m3fn)
        x = torch.randn(M, K, device=dev).to(torch.float8_e4m3fn)
        out = torch.empty(M, rows, device=dev, dtype=torch.bfloat16)
        if gemm == "fwd_tensor":
            sw, sx = torch.tensor(0.01, device=dev), torch.tensor(0.007, device=dev)
        else:
            sw = torch.full((rows,), 0.01, device=dev)
            sx = 0.005 + 0.01 * torch.rand(M, device=dev)
        c = torch.randn(M, rows, device=dev, dtype=torch.bfloat16) if gemm == "fwd_w_c" else None
        handle = mod.prepare_fp8(w, sw, x, sx, c, out, True, MAX_ALGOS)
        tensors = (w, sw, x, sx, c)
        moved = w.numel() + x.numel() + 2 * out.numel() * (2 if c is not None else 1)
    elif gemm == "dgrad":
        wt = torch.randn(K, rows, device=dev).to(torch.float8_e4m3fn)
        g = torch.randn(M, rows, device=dev).to(torch.float8_e5m2)
        out = torch.empty(M, K, device=dev, dtype=torch.bfloat16)
        sw, sg = torch.tensor(0.01, device=dev), torch.tensor(1e-3, device=dev)
        handle = mod.prepare_fp8(wt, sw, g, sg, None, out, True, MAX_ALGOS)
        tensors = (wt, sw, g, sg)
        moved = wt.numel() + g.numel() + 2 * out.numel()
    elif gemm == "adapter":
        b = (0.01 * torch.randn(N, RANK, device=dev)).to(torch.bfloat16)
        product = torch.randn(M, rows, device=dev, dtype=torch.bfloat16)
        xa = product[:, N:].contiguous()
        out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
        handle = mod.prepare_16bit(b, False, xa, product[:, :N], out, SCALING, MAX_ALGOS)
        tensors = (b, product, xa)
        moved = 2 * (2 * M * N + xa.numel())
    elif gemm == "z":
        b = (0.01 * torch.randn(N, RANK, device=dev)).to(torch.bfloat16)
        xa = torch.randn(M, RANK, device=dev, dtype=torch.bfloat16)
        out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
        handle = mod.prepare_16bit(b, False, xa, None, out, SCALING, MAX_ALGOS)
        tensors = (b, xa)
        moved = 2 * (M * N + xa.numel())
    else:  # u
        b = (0.01 * torch.randn(N, RANK, device=dev)).to(torch.bfloat16)
        g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        out = torch.empty(M, RANK, device=dev, dtype=torch.float32)
        handle = mod.prepare_16bit(b, True, g, None, out, SCALING, MAX_ALGOS)
        tensors = (b, g)
        moved = 2 * g.numel() + 4 * out.numel()
    return handle, out, moved, tensors


def measure(mod, gemm: str, M: int, K: int, N: int, reps: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    handle, out, moved, _tensors = problem(mod, gemm, M, K, N)
    mod.run(handle, 0, 1)
    first = out.float().clone()
    peak = first.abs().max().item()
    records = []
    for index, algo_id, tile, splitk, stages, ws in mod.algos(handle):
        us = common.batched_gpu_us(lambda calls: mod.run(handle, index, calls), reps, warmup,
                                   BATCH)
        out.zero_()
        mod.run(handle, index, 1)
        diff = (out.float() - first).abs().max().item()
        records.append({"gemm": gemm, "M": M, "K": K, "N": N, "r": RANK, "algo": index,
                        "algo_id": algo_id, "tile_id": tile, "splitk": splitk,
                        "stages_id": stages, "workspace": ws, "us": us,
                        "tb_s": moved / us / 1e6, "max_diff_vs_first": diff / peak})
    return records


def main(argv=None):
    args = common.probe_args(__doc__, argv, reps=10, warmup=5,
                             extra=[("--gemms", {"default": ",".join(GEMMS)})])
    gemms = [g for g in args.gemms.split(",") if g]
    unknown = sorted(set(gemms) - set(GEMMS + C_ROUTE))
    if unknown:
        sys.exit(f"gemm_algos: unknown GEMM(s) {', '.join(unknown)}; choose from "
                 f"{', '.join(GEMMS + C_ROUTE)}")
    if not torch.cuda.is_available():
        sys.exit("gemm_algos: needs a CUDA GPU")
    mod = build()
    records = [r for K, N in SHAPES for gemm in gemms
               for r in measure(mod, gemm, args.M, K, N, args.reps, args.warmup)]
    rows = [[f"{r['K']}->{r['N']}", r["gemm"], r["algo"], r["algo_id"], r["tile_id"],
             r["splitk"], r["stages_id"], r["us"], r["tb_s"], r["max_diff_vs_first"]]
            for r in records]
    common.finish_probe("gemm_algos", __file__, argv, args.out,
                        ["shape", "gemm", "algo", "algo id", "tile id", "split-k", "stages id",
                         "us", "TB/s moved", "max diff vs first"], rows, records)


if __name__ == "__main__":
    main()
