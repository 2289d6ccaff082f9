"""Calls every falqon op on small CUDA tensors, edge sizes included, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_ops.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_ops.py --ops quantize,topk

scripts/gpu_check.sh runs both, with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is an
allocation of its own and an access past its end is caught (torch's caching allocator would hand
out the bytes behind it). The shapes are small: the sanitizer slows kernels down a hundredfold.
Any Python error (a failed launch, a wrong shape) ends it with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys

import torch

import falqon
from falqon import ops

GROUPS = ("quantize", "linear", "grad_input", "backward", "meld_init", "topk")
ACT = (torch.bfloat16, torch.float16, torch.float32)


def run_quantize(dev):
    n = 0
    for dtype in ACT:
        for out in (ops.E4M3, ops.E5M2):
            for size in (0, 1, 7, 33, 1000, 4099):
                falqon.quantize(torch.randn(size, device=dev, dtype=dtype), out)
                n += 1
            base = torch.randn(67, 45, device=dev, dtype=dtype)
            for view in (base.t(), base[:, ::3], base.flatten()[1:], base.flatten()[3:-2]):
                falqon.quantize(view, out)  # non-contiguous and unaligned inputs
                n += 1
            # Delayed scaling: an empty history (the amax pass reads x) and a recorded one (it
            # does not), short and long histories.
            for history in (torch.zeros(1, device=dev), torch.rand(5, device=dev) + 0.5):
                for size in (0, 1, 7, 33, 1000, 4099):
                    falqon.quantize_delayed(torch.randn(size, device=dev, dtype=dtype), out,
                                            history)
                    n += 1
                falqon.quantize_delayed(base[:, ::3], out, history)
                n += 1
    return n


def _melded(K, N, r, dev, wt, history=0, mode="proxy"):
    """A MeldedLinear with a random FP8 weight [W; A; 0], made with the quantise kernel only (no
    meld_init: its SVD would take long under the sanitizer, and it has a group of its own); in the
    adapter mode with a non-zero B."""
    layer = falqon.MeldedLinear(K, N, rank=r, bias=True, transposed_copy=wt, device=dev,
                                dtype=torch.bfloat16, amax_history_len=history, update_mode=mode)
    full = torch.randn(N + ops.padded_rank(r), K, device=dev) * 0.02
    full[N + r:] = 0
    q, s = falqon.quantize(full, ops.E4M3)
    with torch.no_grad():
        layer.weight.data = q
        layer.weight_scale.copy_(s)
        layer.bias.normal_()
        layer.refresh_weight_t()
        if mode == "adapter":
            layer.lora_B.normal_(std=0.05)
    return layer


def _layers(dev, modes=("proxy", "adapter")):
    """Small melded layers, rank 1 included, with and without the transposed copy, and with
    delayed scaling (a history of 2 calls), in each update mode."""
    for mode in modes:
        for K, N, r in ((16, 16, 1), (64, 32, 8), (256, 128, 16)):
            for wt, history in ((False, 0), (True, 0), (False, 2)):
                yield _melded(K, N, r, dev, wt, history, mode)


def _adapter_B(layer):
    """The adapter mode's B for the gradient ops (None in the proxy mode)."""
    return layer.lora_B.detach() if layer.update_mode == "adapter" else None


def run_linear(dev):
    n = 0
    for layer in _layers(dev):
        K = layer.in_features
        for lead in ((0,), (1,), (3,), (37,), (2, 64)):
            x = torch.randn(*lead, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
            y = layer(x)  # forward, then its autograd: dx through grad_input, dB, d bias
            y.backward(torch.randn_like(y))
            n += 1
        # The raw op with both outputs used, fp32 activations and no bias.
        x = torch.randn(5, K, device=dev)
        torch.ops.falqon.melded_linear(x, layer.weight, layer.weight_scale,
                                       layer.lora_B.detach().float(), None, layer.weight_t, 1.0,
                                       None, None, layer.update_mode == "adapter")
        n += 1
    return n


def run_grad_input(dev):
    n = 0
    for layer in _layers(dev):
        for rows in (0, 1, 3, 37, 128):
            for gdt in (None, ops.E4M3):
                for dtype in ACT:
                    g = torch.randn(rows, layer.out_features, device=dev, dtype=dtype)
                    # A delayed-scaling layer's gradient history (row 1), as its backward uses.
                    history = None if layer.amax_history_len == 0 else layer.amax_history[1]
                    falqon.melded_linear_grad_input(g, layer.weight, layer.weight_scale,
                                                    layer.weight_t, gdt, history,
                                                    _adapter_B(layer), 0.5)
                    n += 1
    return n


def run_backward(dev):
    """melded_linear_backward (the fused read of g for its quantisation and dB) at odd row counts,
    every activation and dB dtype, ranks of one and several passes, current and delayed scaling;
    and record_amax_ across its 256-value chunks."""
    n = 0
    layers = list(_layers(dev)) + [_melded(512, 256, 200, dev, False, 2),
                                   _melded(512, 256, 200, dev, True, 0, "adapter")]
    for layer in layers:
        for rows in (0, 1, 3, 65, 300):
            for dtype in ACT:
                g = torch.randn(rows, layer.out_features, device=dev, dtype=dtype)
                xa = torch.randn(rows, layer.rank, device=dev, dtype=dtype)
                history = None if layer.amax_history_len == 0 else layer.amax_history[1]
                for gdt, bdt in ((None, torch.float32), (ops.E4M3, dtype)):
                    falqon.melded_linear_backward(g, xa, layer.weight, layer.weight_scale,
                                                  layer.weight_t, 0.5, gdt, history, bdt,
                                                  _adapter_B(layer))
                    n += 1
    for H in (1, 2, 255, 256, 257, 700):
        falqon.ops.record_amax_(torch.rand(H, device=dev), torch.tensor(3.0, device=dev))
        n += 1
    return n


def run_meld_init(dev):
    n = 0
    for N, K, r in ((16, 16, 1), (64, 48, 8), (128, 256, 16)):
        for svd in ("randomized", "exact"):
            for dtype in ACT:
                for row_norm in (0.0, 3 ** -0.5):  # the proxy mode's A, the adapter mode's
                    falqon.meld_init(torch.randn(N, K, device=dev, dtype=dtype) * 0.02, r,
                                     svd=svd, adapter_row_norm=row_norm)
                    n += 1
    return n


def run_topk(dev):
    n = 0
    for layer in _layers(dev, modes=("proxy",)):  # the proxy mode's update
        N = layer.out_features
        for keep in (False, True):
            for k in (0, 3, N, N + 5):
                for B_dtype in (torch.float32, torch.bfloat16):
                    B = torch.randn(N, layer.rank, device=dev, dtype=B_dtype)
                    B[1, 0] = float("nan")
                    falqon.topk_update_(layer.weight, B, layer.weight_t, k, 2.0, keep)
                    n += 1
    # The grouped op over every layer at once (mixed shapes and B dtypes, a NaN in one B).
    layers = list(_layers(dev, modes=("proxy",)))
    for discard in (False, True):
        for k in (0, 3, 100):
            Bs = [torch.randn(m.out_features, m.rank, device=dev,
                              dtype=(torch.float32, torch.bfloat16)[i % 2])
                  for i, m in enumerate(layers)]
            Bs[-1][1, 0] = float("nan")
            falqon.topk_update_many_([m.weight for m in layers], Bs,
                                     [m.weight_t for m in layers], [k] * len(layers),
                                     [2.0] * len(layers), [i % 2 == 0 for i in range(len(layers))],
                                     discard_nonfinite=discard)
            n += 1
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(GROUPS),
                        help=f"comma-separated groups of calls, of {', '.join(GROUPS)}")
    parser.add_argument("--device", default="cuda",
                        help="cuda; cpu only dry-runs this script against the CPU reference")
    args = parser.parse_args(argv)
    groups = [g for g in args.ops.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown op groups {unknown}; choose from {', '.join(GROUPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    runners = {"quantize": run_quantize, "linear": run_linear, "grad_input": run_grad_input,
               "backward": run_backward,
               "meld_init": run_meld_init, "topk": run_topk}
    for g in groups:
        calls = runners[g](args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()   # a kernel fault surfaces here, within its group
        print(f"sanitize_ops: {g}: {calls} calls", flush=True)
    print("sanitize_ops: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
