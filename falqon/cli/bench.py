"""`falqon bench`: one layer, FALQON against a bf16 LoRA layer, on this device. Only a GPU with
FP8 tensor cores that this build has kernels for times FALQON's FP8 path: anywhere else the
timings are of the emulation, and no speed-up is shown."""

from __future__ import annotations

import os
import platform
import time

import torch

from ..config import FalqonError
from .models import resolve_device


def emulated_because(device: torch.device) -> str | None:
    """Why FALQON's FP8 kernels would not run on `device` (None: they would)."""
    from .. import build_info
    from ..info import EMULATION_ENV, FP8_MIN_CAPABILITY, Arch, coverage

    if device.type != "cuda":
        return f"this is a {device.type.upper()}: FALQON's FP8 arithmetic is emulated in float32"
    cc = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if cc < FP8_MIN_CAPABILITY:
        return (f"{name} (compute capability {cc[0]}.{cc[1]}) has no FP8 tensor cores (8.9 or "
                f"newer): FALQON's FP8 arithmetic is emulated")
    info = build_info()
    if not info.get("with_cuda"):
        return "this falqon build has no CUDA kernels: FALQON's FP8 arithmetic is emulated"
    archs = [a for a in map(Arch.parse, info.get("cuda_archs") or []) if a is not None]
    covered, text = coverage(archs, cc)
    if not covered:
        return f"this build's kernels do not run on {name}: {text}"
    if os.environ.get(EMULATION_ENV) == "1":
        return f"{EMULATION_ENV}=1: FALQON's FP8 arithmetic is emulated"
    return None


def _time_it(fn, iters: int, device: torch.device) -> float:
    """Median seconds per call of fn after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def cmd_bench(args) -> int:
    from torch import nn

    from ..modules import MeldedLinear

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    M = args.tokens or (8192 if gpu else 512)
    K = args.in_features or (4096 if gpu else 1024)
    N = args.out_features or (4096 if gpu else 1024)
    iters = args.iters or (50 if gpu else 5)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    base = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    try:
        melded = MeldedLinear.from_linear(base, rank=args.rank)
    except ValueError as exc:
        raise FalqonError(str(exc)) from None
    base.weight.requires_grad_(False)
    lora_A = torch.randn(args.rank, K, device=device, dtype=dtype) / K ** 0.5
    lora_B = torch.zeros(N, args.rank, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(M, N, device=device, dtype=dtype)

    def lora_step():
        y = base(x) + (x @ lora_A.t()) @ lora_B.t()
        y.backward(g)

    def falqon_step():
        melded(x).backward(g)

    t_lora = _time_it(lora_step, iters, device)
    t_falqon = _time_it(falqon_step, iters, device)
    _report(device, (M, K, N), args.rank, iters, t_lora, t_falqon)
    return 0


def _report(device, shape, rank: int, iters: int, t_lora: float, t_falqon: float) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        platform.processor() or "CPU"
    why = emulated_because(device)
    if why:
        print(f"falqon bench: these timings say nothing about FALQON's speed: {why}; it needs a "
              f"GPU with FP8 tensor cores (compute capability 8.9 or newer). Measured figures: "
              f"benchmarks/ and the README.")
    M, K, N = shape
    print(f"falqon bench on {device.type} ({name}): M={M} K={K} N={N} rank={rank}, "
          f"forward+backward, median of {iters}")
    print(f"  bf16 LoRA layer   {t_lora * 1e3:9.3f} ms")
    ratio = "" if why else f"   ({t_lora / t_falqon:.2f}x)"
    print(f"  FALQON layer      {t_falqon * 1e3:9.3f} ms{ratio}" +
          ("   (emulated: no speed-up shown)" if why else ""))
