"""The grouped proxy update on the GPU (ops.topk_update_many_, csrc/cuda/topk_update.cu): bit for
bit the per-layer CUDA op on 224 layers shaped like LLaMA-7B's (scaled down), four kernels and
no host synchronisation, the CPU's row order (ties to the lower row index), and ProxyUpdater's
results unchanged by the grouped path. Skipped without a CUDA GPU with FP8;
FALQON_TEST_DEVICE=cpu dry-runs the tests that take a device on the CPU reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import falqon
from falqon import FalqonConfig, MeldedLinear, ops
from falqon.training import ProxyUpdater, proxy_state
from falqon_testing import opcheck
from cuda_testing import DEVICE, cuda_only, gpu, melded_weight

# LLaMA-7B's seven projections per decoder layer (K, N), dimensions divided by 8.
HIDDEN, INTER = 512, 1376
PROJECTIONS = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTER)] * 2 + [(INTER, HIDDEN)]


def llama_layers(r=64, k=10, B_dtype=torch.float32, decoder_layers=32, mixed=False, seed=0):
    """224 layers (weight, B, weight_t, k, scaling) on the device. mixed: ranks, k's, B dtypes
    and weight_t presence vary from layer to layer."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    layers = []
    for i in range(decoder_layers * len(PROJECTIONS)):
        K, N = PROJECTIONS[i % len(PROJECTIONS)]
        rank = (8, 16, 64, 24)[i % 4] if mixed else r
        rows = N + ops.padded_rank(rank)
        w = (torch.randn(rows, K, device=DEVICE, generator=g) * 100).clamp(-448, 448)
        w[N + rank:] = 0
        w = w.to(ops.E4M3)
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3] if mixed else B_dtype
        B = torch.randn(N, rank, device=DEVICE, generator=g) * 0.02
        B[N // 3:N // 3 + 12] = B[5] * 3  # 12 exact ties above every other row: k = 10 splits them
        B = B.to(dtype)
        wt = w[:N].t().contiguous() if not mixed or i % 5 else None
        layers.append((w, B, wt, (k, 3, 40, 0, 200)[i % 5] if mixed else k, 0.5 + (i % 3)))
    return layers


def run_per_layer(layers, keep):
    out = [(w.clone(), B.clone(), None if t is None else t.clone(), k, s)
           for w, B, t, k, s in layers]
    for w, B, t, k, s in out:
        ops.topk_update_(w, B, t, k, s, keep)
    return out


def run_grouped(layers, keep, discard=False):
    out = [(w.clone(), B.clone(), None if t is None else t.clone(), k, s)
           for w, B, t, k, s in layers]
    finite = ops.topk_update_many_([x[0] for x in out], [x[1] for x in out],
                                   [x[2] for x in out], [x[3] for x in out],
                                   [x[4] for x in out], keep, discard_nonfinite=discard)
    return out, finite


def assert_bitwise(a, b):
    for i, ((w1, B1, t1, _, _), (w2, B2, t2, _, _)) in enumerate(zip(a, b)):
        assert torch.equal(w1.view(torch.uint8), w2.view(torch.uint8)), f"weight of layer {i}"
        assert torch.equal(B1, B2), f"lora_B of layer {i}"
        if t1 is not None:
            assert torch.equal(t1.view(torch.uint8), t2.view(torch.uint8)), f"weight_t of {i}"


@gpu
@pytest.mark.parametrize("case", ["k10", "warmup_k64_bf16", "keep", "mixed", "mixed_keep"])
def test_grouped_equals_per_layer_on_224_layers(case):
    keep = case.endswith("keep")
    layers = llama_layers(k=64 if "k64" in case else 10,
                          B_dtype=torch.bfloat16 if "bf16" in case else torch.float32,
                          mixed=case.startswith("mixed"))
    assert len(layers) == 224
    one = run_per_layer(layers, keep)
    many, finite = run_grouped(layers, keep)
    assert finite.device.type == torch.device(DEVICE).type and bool(finite.all())
    assert_bitwise(one, many)
    changed = sum(not torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
                  for a, b in zip(layers, many))
    assert changed >= 150, f"only {changed} of 224 layers changed"


@gpu
def test_grouped_discards_a_nonfinite_step():
    layers = llama_layers(decoder_layers=4)
    layers[9][1][100, 3] = float("nan")
    many, finite = run_grouped(layers, False, discard=True)
    assert finite.cpu().tolist() == [i != 9 for i in range(len(layers))]
    for (w0, _, t0, _, _), (w, B, t, _, _) in zip(layers, many):
        assert torch.equal(w.view(torch.uint8), w0.view(torch.uint8)) and not B.any()
        assert torch.equal(t.view(torch.uint8), t0.view(torch.uint8))
    # Without the discard the grouped op is the per-layer one (the NaN row keeps its weights).
    many, finite = run_grouped(layers, True)
    assert_bitwise(run_per_layer(layers, True), many)


@gpu
def test_row_order_matches_the_cpu_exactly():
    """Scores are left-to-right fp32 sums on both devices and ties go to the lower row: the
    CUDA op selects exactly the CPU's rows, without separating near ties first."""
    e = 2.0 ** -24
    B = torch.randn(256, 64).abs() * 0.01
    B[0] = e
    B[0, 0] = 1.0                       # 1 from the left, 1 + 63 e in other orders
    B[1] = 0
    B[1, 0] = 1.0 + 2.0 ** -23
    B[10:40] = B[7] * 50                # 30 exact ties
    B[[200, 90]] = float("nan")         # NaN ranks first
    w, _ = melded_weight(128, 256, 64)
    def dev(t):
        return t.to(DEVICE).clone()

    expected = {1: [90], 3: [10, 90, 200], 12: sorted([90, 200, *range(10, 20)]),
                33: sorted([1, 90, 200, *range(10, 40)])}  # row 1 over row 0: left-to-right sums
    for k in (1, 3, 12, 33):
        B_c, B_d, B_g = B.clone(), dev(B), dev(B)
        ops.topk_update_(w.clone(), B_c, None, k, 1.0, True)
        ops.topk_update_(dev(w), B_d, None, k, 1.0, True)
        ops.topk_update_many_([dev(w)], [B_g], None, [k], [1.0], True)
        for out, what in ((B_d, "per-layer"), (B_g, "grouped")):
            assert torch.equal(out.cpu().isnan(), B_c.isnan()) and torch.equal(
                out.cpu().nan_to_num(), B_c.nan_to_num()), f"{what}, k={k}"
        applied = (B_c == 0).all(1).nonzero().flatten().tolist()
        assert applied == expected[k], (k, applied)


@cuda_only
def test_four_kernels_and_no_host_synchronisation():
    layers = llama_layers()
    args = ([x[0] for x in layers], [x[1] for x in layers], [x[2] for x in layers],
            [x[3] for x in layers], [x[4] for x in layers], False, True)
    ops.topk_update_many_(*args)  # builds and caches the layer table
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")  # a synchronising call inside the op raises
        try:
            ops.topk_update_many_(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and "emcpy" not in e.name
               and "emset" not in e.name]
    assert len(kernels) == 4, kernels


@cuda_only
def test_opcheck_topk_update_many_cuda():
    layers = llama_layers(decoder_layers=1, mixed=True)
    present = [i for i, x in enumerate(layers) if x[2] is not None]
    opcheck(torch.ops.falqon.topk_update_many_.default,
            ([x[0].clone() for x in layers], [x[1].clone() for x in layers],
             [layers[i][2].clone() for i in present], present, [x[3] for x in layers],
             [x[4] for x in layers], [i % 2 == 0 for i in range(len(layers))], True))


# ---- ProxyUpdater -------------------------------------------------------------------------------

class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        dims = [(512, 512), (512, 1376), (1376, 512)] * 3
        self.layers = nn.ModuleList(nn.Linear(k, n, bias=False) for k, n in dims)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def train_stack(model, grouped, monkeypatch, keep_residual, steps=4, nan_step=None):
    if grouped is False:
        monkeypatch.setattr(ProxyUpdater, "grouped", lambda self: False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    handle = falqon.attach(opt, model)
    assert handle.updater.grouped() == (grouped and DEVICE == "cuda")
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    for step in range(steps):
        x = torch.randn(64, 512, device=DEVICE, generator=gen)
        loss = model(x).float().pow(2).mean()
        if step == nan_step:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    monkeypatch.undo()
    return model


@gpu
@pytest.mark.parametrize("keep_residual", [False, True])
def test_proxy_updater_results_unchanged(keep_residual, monkeypatch):
    torch.manual_seed(0)
    base = falqon.meld(Stack(), FalqonConfig(rank=16, topk=4, warmup_steps=1, update_mode="proxy",
                                             keep_residual=keep_residual, exclude_modules=None),
                       progress=False, verbose=False).to(DEVICE)
    a = train_stack(copy.deepcopy(base), False, monkeypatch, keep_residual)
    b = train_stack(copy.deepcopy(base), True, monkeypatch, keep_residual)
    for (name, t1), t2 in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(t1.reshape(-1).view(torch.uint8), t2.reshape(-1).view(torch.uint8)), name
    assert proxy_state(a) == proxy_state(b) and proxy_state(b).step == 4
    with pytest.warns(RuntimeWarning, match="non-finite lora_B"):
        c = train_stack(copy.deepcopy(base), True, monkeypatch, keep_residual, nan_step=2)
    assert proxy_state(c).skipped_steps == 1 and proxy_state(c).step == 3
