"""Melded layers in a model on the GPU: torch.compile(fullgraph=True) of a melded LLaMA decoder
layer (both update modes), and a whole training step (forward, backward, Adam, and the proxy
update in the proxy mode) captured in a CUDA graph. Both prove that no op synchronises with the
host or breaks the graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import falqon
from falqon_testing import rel_err
from cuda_testing import DEVICE, assert_fp8_nearly_equal, cuda_only, gpu

pytestmark = [pytest.mark.gpu, gpu]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def melded_decoder_layer(rank: int = 16, update_mode: str = "proxy", train_a: bool = False):
    """A transformers LlamaDecoderLayer (hidden 256, GQA 8/4 heads, MLP 704) in bf16 on the device,
    all seven projections melded (in the adapter mode with a non-zero B, as after training), and
    its rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=32, num_hidden_layers=1,
                         max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0)
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.05)
    layer = layer.to(DEVICE, torch.bfloat16)
    melded = {}
    for parent in (layer.self_attn, layer.mlp):
        for name in PROJECTIONS:
            if hasattr(parent, name):
                m = falqon.MeldedLinear.from_linear(getattr(parent, name), rank=rank,
                                                    alpha=4 * rank, update_mode=update_mode,
                                                    train_a=train_a)
                if update_mode == "adapter":
                    with torch.no_grad():
                        m.lora_B.normal_(std=0.02)
                setattr(parent, name, m)
                melded[name] = m
    assert len(melded) == 7
    for p in layer.parameters():
        p.requires_grad_(False)
    for m in melded.values():
        m.lora_B.requires_grad_(True)
        if m.lora_A is not None:
            m.lora_A.requires_grad_(True)
    return layer, melded, LlamaRotaryEmbedding(config).to(DEVICE)


@pytest.mark.parametrize("update_mode", ["proxy", "adapter", "adapter_train_a"])
def test_compiled_decoder_layer_matches_eager(update_mode):
    torch._dynamo.reset()
    layer, melded, rotary = melded_decoder_layer(update_mode=update_mode.removesuffix("_train_a"),
                                                 train_a=update_mode.endswith("_train_a"))
    batch, seq = 2, 64
    x = torch.randn(batch, seq, 256, device=DEVICE, dtype=torch.bfloat16)
    position_ids = torch.arange(seq, device=DEVICE).expand(batch, seq)
    probe = torch.randn(batch, seq, 256, device=DEVICE)

    def step(fn):
        for m in melded.values():
            m.lora_B.grad = None
            if m.lora_A is not None:
                m.lora_A.grad = None
        xi = x.clone().requires_grad_()
        cos_sin = rotary(xi, position_ids)
        out = fn(xi, position_embeddings=cos_sin, position_ids=position_ids)
        out = out[0] if isinstance(out, tuple) else out
        (out.float() * probe).sum().backward()
        return out.detach(), xi.grad, {n: (m.lora_B.grad.clone(), None if m.lora_A is None
                                           else m.lora_A.grad.clone())
                                       for n, m in melded.items()}

    eager = step(layer)
    # fullgraph=True raises on any graph break: the melded ops and their autograd compile whole.
    # emulate_precision_casts: inductor rounds the bf16 glue (RMSNorm, rotary, residuals) where
    # eager does, instead of keeping fused intermediates in fp32. Without it a one-ulp bf16
    # change of a GEMM input can move its FP8 (E4M3, E5M2 for gradients: steps of 12.5-25%)
    # quantisation by a step, and the layer's results wander by a few % between eager and
    # compiled (seen on the CPU: up to 5% in the q/k/v lora_B gradients), which would hide real
    # differences. With it, what is left is the order of fp32 reductions (RMSNorm, softmax, each
    # GEMM's accumulation): rare bf16 flips, far under 2^-6 (on the CPU the two are identical).
    with torch._inductor.config.patch(emulate_precision_casts=True):
        compiled = step(torch.compile(layer, fullgraph=True))
    tol = 2.0 ** -6
    assert rel_err(compiled[0], eager[0]) < tol
    assert rel_err(compiled[1], eager[1]) < tol
    for name in PROJECTIONS:
        for c, e in zip(compiled[2][name], eager[2][name]):  # dB, and dA where A trains
            if e is not None:
                assert rel_err(c, e) < tol, name
                assert e.abs().sum() > 0, name


class MeldedMLP(nn.Module):
    """Three melded layers: both proxy policies, with and without the transposed copy."""

    def __init__(self):
        super().__init__()
        lins = [nn.Linear(256, 512), nn.Linear(512, 512), nn.Linear(512, 256)]
        for lin in lins:
            nn.init.normal_(lin.weight, std=0.05)
        # alpha = 8 r: updates large enough to move FP8 weights (checked below).
        self.l1 = falqon.MeldedLinear.from_linear(lins[0], rank=16, alpha=128, topk=16,
                                                  update_mode="proxy")
        self.l2 = falqon.MeldedLinear.from_linear(lins[1], rank=8, alpha=64, topk=32,
                                                  keep_residual=True, transposed_copy=True,
                                                  update_mode="proxy")
        self.l3 = falqon.MeldedLinear.from_linear(lins[2], rank=16, alpha=128, topk=8,
                                                  grad_dtype=torch.float8_e4m3fn,
                                                  update_mode="proxy")

    def forward(self, x):
        return self.l3(torch.nn.functional.gelu(self.l2(torch.nn.functional.gelu(self.l1(x)))))

    def melded(self):
        return [self.l1, self.l2, self.l3]


class AdapterMLP(nn.Module):
    """Three melded layers in the adapter mode: current and delayed scaling, with and without the
    transposed copy (of every row of W'), both gradient formats."""

    def __init__(self):
        super().__init__()
        lins = [nn.Linear(256, 512), nn.Linear(512, 512), nn.Linear(512, 256)]
        for lin in lins:
            nn.init.normal_(lin.weight, std=0.05)
        self.l1 = falqon.MeldedLinear.from_linear(lins[0], rank=16, alpha=32)
        self.l2 = falqon.MeldedLinear.from_linear(lins[1], rank=8, transposed_copy=True,
                                                  amax_history_len=4)
        self.l3 = falqon.MeldedLinear.from_linear(lins[2], rank=16,
                                                  grad_dtype=torch.float8_e4m3fn)

    def forward(self, x):
        return self.l3(torch.nn.functional.gelu(self.l2(torch.nn.functional.gelu(self.l1(x)))))

    def melded(self):
        return [self.l1, self.l2, self.l3]


class TrainedAMLP(AdapterMLP):
    """AdapterMLP with A trained (FalqonConfig(train_a=True)) in l1 and l2 (the transposed copy
    and delayed scaling among them); l3 keeps a frozen A."""

    def __init__(self):
        super().__init__()
        lins = [nn.Linear(256, 512), nn.Linear(512, 512)]
        for lin in lins:
            nn.init.normal_(lin.weight, std=0.05)
        self.l1 = falqon.MeldedLinear.from_linear(lins[0], rank=16, alpha=32, train_a=True)
        self.l2 = falqon.MeldedLinear.from_linear(lins[1], rank=8, transposed_copy=True,
                                                  amax_history_len=4, train_a=True)


def _training(model):
    params = [p for m in model.melded() for p in (m.lora_B, m.lora_A) if p is not None]
    opt = torch.optim.Adam(params, lr=0.02, capturable=True)

    def step(x, target):
        opt.zero_grad(set_to_none=True)
        y = model(x)
        loss = (y.float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        for m in model.melded():
            if m.update_mode == "proxy":
                m.proxy_update()
            m.sync_adapter_A()  # a trained A's FP8 rows from lora_A (no-op for the others)
        return loss

    return opt, step


def _mlp_batch():
    """(x, target) for the MLPs' CUDA-graph steps."""
    return (torch.randn(512, 256, device="cuda", dtype=torch.bfloat16),
            torch.randn(512, 256, device="cuda"))


def _graph_and_eager_runs(build, x, target, warmup=3, replays=5):
    """(graph model, its optimizer, replayed losses, eager model, its optimizer, eager losses, the
    initial state dict): warm-up steps on a side stream, one step captured and replayed, and the
    same steps eagerly from the same initial state."""
    torch.manual_seed(0)
    graph_model = build().cuda()
    initial = copy.deepcopy(graph_model.state_dict())
    graph_opt, graph_step = _training(graph_model)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            graph_step(x, target)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph_opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):   # raises if any op synchronises with the host
        static_loss = graph_step(x, target)
    losses = []
    for _ in range(replays):
        graph.replay()
        losses.append(static_loss.clone())
    eager_model = build().cuda()
    eager_model.load_state_dict(initial)
    eager_opt, eager_step = _training(eager_model)
    eager_losses = [eager_step(x, target).detach() for _ in range(warmup + replays)]
    torch.cuda.synchronize()
    return (graph_model, graph_opt, torch.stack(losses), eager_model, eager_opt,
            torch.stack(eager_losses[warmup:]), initial)


@cuda_only
def test_adapter_training_step_in_cuda_graph_matches_eager():
    g_model, g_opt, g_losses, e_model, e_opt, e_losses, initial = _graph_and_eager_runs(
        AdapterMLP, *_mlp_batch())
    for name, g, e in zip(("l1", "l2", "l3"), g_model.melded(), e_model.melded()):
        # W' never changes in the adapter mode; B is trained like LoRA's.
        assert torch.equal(g.weight.view(torch.uint8), initial[f"{name}.weight"].view(torch.uint8))
        assert g.lora_B.abs().sum() > 0, name
        assert rel_err(g.lora_B, e.lora_B) < 1e-3, name
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel_err(g_opt.state[g.lora_B][key], e_opt.state[e.lora_B][key]) < 1e-3
    assert torch.equal(g_model.l2.amax_history, e_model.l2.amax_history)
    assert torch.allclose(g_losses, e_losses, rtol=1e-3)
    assert e_losses[-1] < e_losses[0], "the adapter trains"


@cuda_only
def test_trained_A_step_in_cuda_graph_matches_eager():
    # dA, Adam on lora_A and the rewrite of A's FP8 rows, all captured: nothing synchronises.
    from falqon.trained_a import a_image_rows

    g_model, _, g_losses, e_model, _, e_losses, initial = _graph_and_eager_runs(
        TrainedAMLP, *_mlp_batch())
    for name, g, e in zip(("l1", "l2"), g_model.melded(), e_model.melded()):
        assert not torch.equal(g.lora_A, initial[f"{name}.lora_A"]), name  # A trained
        assert rel_err(g.lora_A, e.lora_A) < 1e-3, name
        rows, _ = a_image_rows(g.lora_A, g.weight_scale)
        n = g.out_features
        assert torch.equal(g.weight[n:n + g.rank].view(torch.uint8), rows.view(torch.uint8))
    assert torch.allclose(g_losses, e_losses, rtol=1e-3)
    assert e_losses[-1] < e_losses[0]


@cuda_only
def test_training_step_in_cuda_graph_matches_eager():
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(512, 256, device="cuda")
    graph_model, graph_opt, losses, eager_model, eager_opt, eager_losses, initial = \
        _graph_and_eager_runs(MeldedMLP, x, target)

    changed = 0
    for name, g, e in zip(("l1", "l2", "l3"), graph_model.melded(), eager_model.melded()):
        # The same kernels on the same data: equal but for rare one-step FP8 flips (and none is
        # expected: every kernel here is deterministic).
        assert_fp8_nearly_equal(g.weight, e.weight, 1e-3, f"{name}.weight")
        assert rel_err(g.lora_B, e.lora_B) < 1e-3, name
        if g.weight_t is not None:
            assert torch.equal(g.weight_t.view(torch.uint8),
                               g.weight[:g.out_features].t().contiguous().view(torch.uint8))
        changed += int((e.weight.view(torch.uint8) != initial[f"{name}.weight"].view(torch.uint8))
                       .sum())
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel_err(graph_opt.state[g.lora_B][key], eager_opt.state[e.lora_B][key]) < 1e-3
    assert changed > 0, "the proxy updates moved no weight: the comparison would prove nothing"
    # keep_residual leaves the unapplied rows of l2's B; the drop policy zeroes l1's and l3's.
    assert not graph_model.l1.lora_B.any() and graph_model.l2.lora_B.any()
    assert torch.allclose(losses, eager_losses, rtol=1e-3)
