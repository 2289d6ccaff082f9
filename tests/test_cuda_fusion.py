"""falqon.fuse on the GPU: a melded tiny LLaMA (bf16, adapter mode, gradient checkpointing) trains
with each backend's kernels as it trains eager, and so does a PEFT LoRA model under Liger's.

Tolerance. The fused kernels compute the same functions as the eager code with other roundings:
Liger's RMSNorm, SwiGLU and RoPE round once where eager rounds each op to bf16, torch.compile keeps
fused intermediates in fp32, and the fused cross-entropy accumulates the loss in fp32 over chunks
of the vocabulary. Each changes a bf16 value by at most one ulp (2^-8 relative), and a value moved
by one ulp can cross an FP8 rounding boundary (E4M3 steps are 2^-4 to 2^-3 relative), so a few
quantised activations move by one FP8 step. The loss is a mean over 512 tokens, in which such
changes average out: before any update the two losses must agree to 2^-7 (relative), twice the
bf16 ulp of the loss itself. Training compounds the differences (Adam normalises each gradient
element, so a tiny gradient element whose sign flips moves its weight by 2 lr), so after 8 steps
the losses must agree to 2^-5, while each falls by more than 10%: a fused path that broke the
gradients (no update, or a wrong one) fails the fall or the agreement.
"""

from __future__ import annotations

import pytest
import torch

import falqon
from cuda_testing import cuda_only
from workflow_testing import tiny_causal_lm

pytestmark = [pytest.mark.gpu, cuda_only]

SHAPE = dict(hidden_size=256, intermediate_size=704, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, vocab_size=512, num_hidden_layers=2,
             max_position_embeddings=512)
STEPS, LR = 8, 2e-3


def melded(device="cuda", dtype=torch.bfloat16, reentrant=False):
    model = tiny_causal_lm("llama", seed=0, **SHAPE).to(device, dtype)
    falqon.meld(model, falqon.FalqonConfig(rank=16), progress=False, verbose=False)
    falqon.training.enable_gradient_checkpointing(model, reentrant=reentrant)
    return model.train()


def peft_lora(device="cuda", dtype=torch.bfloat16):
    from peft import LoraConfig, get_peft_model

    model = tiny_causal_lm("llama", seed=0, **SHAPE).to(device, dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    falqon.training.enable_gradient_checkpointing(model.get_base_model())
    return model.train()


def train(model, lr=LR) -> list[float]:
    """Losses of STEPS AdamW steps on one batch of 4 x 128 tokens (the loss before each step)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, SHAPE["vocab_size"], (4, 128),
                        generator=torch.Generator().manual_seed(3)).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def assert_trains_alike(fused: list[float], eager: list[float]) -> None:
    assert abs(fused[0] - eager[0]) <= 2.0 ** -7 * eager[0], (fused, eager)
    assert all(abs(f - e) <= 2.0 ** -5 * e for f, e in zip(fused, eager)), (fused, eager)
    for losses in (fused, eager):
        assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("backend, compile_mode", [("liger", None), ("compile", None),
                                                   ("compile", "reduce-overhead")])
def test_fused_melded_model_trains_like_eager(backend, compile_mode):
    """(reduce-overhead: the compiled layers run as CUDA graphs, under reentrant checkpointing's
    recompute too; falqon.fuse refuses the non-reentrant one there, run 71.)"""
    if backend == "liger":
        pytest.importorskip("liger_kernel")
    torch._dynamo.reset()
    reentrant = compile_mode == "reduce-overhead"
    eager = train(melded(reentrant=reentrant))
    model = melded(reentrant=reentrant)
    report = falqon.fuse(model, backend, compile_mode=compile_mode)
    assert report.compile_mode == compile_mode
    if backend == "liger":
        assert report.fused == {"rms_norm": 5, "swiglu": 2, "rope": 2,
                                "fused_linear_cross_entropy": 1}, report
    else:
        assert report.fused["compiled_layers"] == 2, report
    assert_trains_alike(train(model), eager)


def test_cuda_graphs_refuse_non_reentrant_checkpointing():
    torch._dynamo.reset()
    model = melded()
    falqon.fuse(model, "compile", compile_mode="reduce-overhead")
    with pytest.raises(falqon.FalqonError, match="non-reentrant gradient checkpointing"):
        train(model)


def test_auto_picks_a_backend_on_the_gpu():
    report = falqon.fuse(melded())
    assert report.backend in ("liger", "compile") and report.fused, report


def test_liger_on_peft_lora_trains_like_eager():
    pytest.importorskip("liger_kernel")
    eager = train(peft_lora(), lr=5e-3)
    model = peft_lora()
    assert len(falqon.fuse(model, "liger").fused) == 4
    assert_trains_alike(train(model, lr=5e-3), eager)
