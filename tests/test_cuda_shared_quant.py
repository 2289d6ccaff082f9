"""Shared input quantisation on the GPU (falqon.shared_quant): melded_linear with input_fp8 /
input_scale is bit-identical to the op quantising x itself at LLaMA-7B shapes, and a melded
decoder layer's forward runs one quantisation for q/k/v and one for gate/up (4 instead of 7).

FALQON_TEST_DEVICE=cpu dry-runs the identity tests at small shapes; the profiler test needs CUDA.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import falqon
from falqon import shared_quant
from cuda_testing import DEVICE, DRY_RUN, cuda_only, gpu, melded_weight, random_activations

pytestmark = [pytest.mark.gpu, gpu]

E4M3 = torch.float8_e4m3fn
OP = torch.ops.falqon.melded_linear.default
# (M tokens, K in_features, N out_features, rank): q/k/v and gate/up of LLaMA-7B at 2 x 2048
# tokens; the dry run on the CPU takes a small stand-in.
SHAPES = [(256, 128, 96, 16)] if DRY_RUN else [(4096, 4096, 4096, 64), (4096, 4096, 11008, 64)]


from test_shared_quant import _fresh_switch  # noqa: E402,F401 (autouse: the switch on, afresh)


@pytest.mark.parametrize("adapter", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,K,N,rank", SHAPES)
def test_op_with_the_quantisation_given_is_bit_identical(M, K, N, rank, bias, adapter):
    w, s = (t.to(DEVICE) for t in melded_weight(K, N, rank))
    x0 = random_activations((2, M // 2, K), torch.bfloat16).to(DEVICE)
    B0 = (torch.randn(N, rank) * 0.02).to(DEVICE)
    b = (torch.randn(N) * 0.1).to(DEVICE, torch.bfloat16) if bias else None
    probe = torch.randn(2, M // 2, N, device=DEVICE, dtype=torch.bfloat16)
    q, sx = torch.ops.falqon.quantize(x0, E4M3)  # what the op makes itself
    results = []
    for given in (False, True):
        x, B = x0.clone().requires_grad_(), B0.clone().requires_grad_()
        extra = (None, adapter, q, sx) if given else (None, adapter)
        y, xa, _ = OP(x, w, s, B, b, None, 2.0, None, *extra)
        (y * probe).sum().backward()
        results.append((y.detach(), xa, x.grad, B.grad))
    for a, c, what in zip(*results, ("y", "xa", "dx", "dB")):
        assert a.stride() == c.stride() and torch.equal(a, c), what


def decoder_layer(hidden=4096, intermediate=11008, heads=32):
    """A LLaMA-7B-shaped decoder layer (eager attention: deterministic) in bf16 on the device,
    its seven projections melded and sharing one InputQuantCache, with its rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         num_hidden_layers=1, max_position_embeddings=4096)
    config._attn_implementation = "eager"
    layer = LlamaDecoderLayer(config, layer_idx=0)
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    layer = falqon.meld(layer.to(DEVICE, torch.bfloat16), falqon.FalqonConfig(rank=16),
                        progress=False, verbose=False)
    for _, m in falqon.melded_layers(layer):
        with torch.no_grad():
            m.lora_B.normal_(std=0.02)
    return layer, LlamaRotaryEmbedding(config).to(DEVICE)


class QuantizeCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.falqon.quantize.default,
                               torch.ops.falqon.quantize_rows.default)
        return func(*args, **(kwargs or {}))


def run_layer(layer, rotary, x0, probe, calls):
    x = x0.clone().requires_grad_()
    position_ids = torch.arange(x.shape[1], device=DEVICE).expand(x.shape[0], -1)
    with calls:
        out = layer(x, position_embeddings=rotary(x, position_ids), position_ids=position_ids)
    out = out[0] if isinstance(out, tuple) else out
    (out.float() * probe).sum().backward()
    grads = [m.lora_B.grad.clone() for _, m in falqon.melded_layers(layer)]
    for _, m in falqon.melded_layers(layer):
        m.lora_B.grad = None
    return [out.detach(), x.grad, *grads]


def test_decoder_layer_is_bit_identical_with_and_without_sharing(monkeypatch):
    layer, rotary = decoder_layer(256, 704, 8) if DRY_RUN else decoder_layer()
    hidden = layer.self_attn.q_proj.in_features
    x0 = random_activations((2, 64 if DRY_RUN else 1024, hidden), torch.bfloat16).to(DEVICE)
    probe = torch.randn(*x0.shape, device=DEVICE)
    calls = QuantizeCalls()
    shared = run_layer(layer, rotary, x0, probe, calls)
    assert calls.count == 4, "q/k/v's input, o's, gate/up's, down's"
    monkeypatch.setenv(shared_quant.ENV, "0")
    shared_quant.enabled.cache_clear()
    calls = QuantizeCalls()
    alone = run_layer(layer, rotary, x0, probe, calls)
    # Unshared, the adapter mode's layers quantise x per row themselves where the device allows
    # (each of the 7 projections), else the op does it inside (per tensor, no op call seen).
    assert calls.count == (7 if falqon.ops.row_scales_supported(DEVICE) else 0)
    for i, (a, b) in enumerate(zip(shared, alone)):
        assert torch.equal(a, b), i


# One per quantisation: the cast of the per-tensor ones, the row-wise (adapter mode) kernel.
QUANT_KERNEL = re.compile(r"scaled_map_kernel|fused_quantize_kernel|quantize_rows_kernel")


def quantise_kernels(fn) -> int:
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and QUANT_KERNEL.search(e.name))


@cuda_only
def test_decoder_layer_forward_quantises_qkv_and_gate_up_input_once(monkeypatch):
    layer, rotary = decoder_layer()
    x = torch.randn(2, 1024, 4096, device=DEVICE, dtype=torch.bfloat16)
    position_ids = torch.arange(1024, device=DEVICE).expand(2, -1)
    cos_sin = rotary(x, position_ids)

    def attention():
        layer.self_attn(x, position_embeddings=cos_sin, attention_mask=None)

    def mlp():
        layer.mlp(x)

    with torch.no_grad():
        attention(), mlp()  # warm up (cuBLASLt plans, the allocator)
        counts = {name: quantise_kernels(fn) for name, fn in (("attention", attention),
                                                              ("mlp", mlp))}
        monkeypatch.setenv(shared_quant.ENV, "0")
        shared_quant.enabled.cache_clear()
        alone = {name: quantise_kernels(fn) for name, fn in (("attention", attention),
                                                             ("mlp", mlp))}
    # attention: q/k/v's input once + o_proj's (was 3 + 1); MLP: gate/up's once + down's (2 + 1).
    assert alone == {"attention": 4, "mlp": 3}, alone
    assert counts == {"attention": 2, "mlp": 2}, counts


@cuda_only
def test_a_captured_cuda_graph_quantises_its_static_input_itself():
    from test_shared_quant import TwoHeads

    model = falqon.meld(TwoHeads(256, 128, 384).to(DEVICE, torch.bfloat16), falqon.FalqonConfig(rank=16),
                        progress=False, verbose=False)
    static = torch.randn(64, 256, device=DEVICE, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # the warm-up stores static's quantisation
        model(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = model(static)
    static.copy_(torch.randn_like(static) * 3)
    graph.replay()
    with torch.no_grad():
        ref = model(static.clone())
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
