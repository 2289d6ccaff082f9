"""Meld while loading on the GPU: the peak memory of falqon.meld_pretrained is the melded model
plus one layer's weights (never the whole bf16 model), a failed load leaves nothing on the GPU,
and meld_from_config's seeded random weights are the same on every build."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import falqon
from falqon.config import FalqonError
from cuda_testing import cuda_only

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = [pytest.mark.gpu, cuda_only]

CFG = falqon.FalqonConfig(rank=16)


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
              num_key_value_heads=4, num_hidden_layers=4, vocab_size=4096)
    return LlamaConfig(**{**kw, **overrides})


def checkpoint(path, **overrides):
    """A ~120 MB bf16 LLaMA (GQA) saved as several shards."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(**overrides), dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="20MB")
    return model


def meld_peak_of_one_layer(in_features: int, out_features: int) -> int:
    """Device bytes melding one bf16 layer takes above its weight and the melded result."""
    linear = nn.Linear(in_features, out_features, bias=False, device="cuda",
                       dtype=torch.bfloat16)
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    melded = falqon.MeldedLinear.from_linear(linear, rank=CFG.rank)
    extra = torch.cuda.max_memory_allocated() - before
    del melded, linear
    return extra


def test_peak_memory_is_the_melded_model_plus_one_layer(tmp_path):
    model = checkpoint(tmp_path / "ckpt")
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ref = falqon.meld(model.cuda().eval(), CFG, progress=False, verbose=False)
    expected = {k: v.cpu() for k, v in ref.state_dict().items()}
    del model, ref
    gc.collect()
    torch.cuda.empty_cache()
    largest = meld_peak_of_one_layer(1024, 2816)
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    melded = falqon.meld_pretrained(tmp_path / "ckpt", CFG, device="cuda", progress=False,
                                    verbose=False)
    peak = torch.cuda.max_memory_allocated() - base
    final = torch.cuda.memory_allocated() - base
    # The layer being melded on top of the model so far: its bf16 weight, its finiteness check
    # (at most as large) and what melding it takes.
    weight = 1024 * 2816 * 2
    assert peak <= final + largest + 2 * weight, (peak, final, largest)
    assert peak < bf16_bytes
    got = melded.state_dict()
    for k, v in expected.items():  # the same model as meld of the whole model on the GPU
        a, b = got[k].cpu(), v
        if a.element_size() == 1:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), k


def test_a_failed_load_leaves_nothing_on_the_gpu(tmp_path):
    model = checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "bad", max_shard_size="20MB")
    del model
    meld_peak_of_one_layer(1024, 1024)  # the ops' one-time allocations, before the baseline
    gc.collect()
    before = torch.cuda.memory_allocated()
    message = None
    try:
        falqon.meld_pretrained(tmp_path / "bad", CFG, device="cuda", progress=False,
                               verbose=False)
    except FalqonError as exc:
        message = str(exc)
    gc.collect()
    assert "model.layers.3.mlp.down_proj.weight holds NaN or inf" in message
    assert torch.cuda.memory_allocated() == before


def test_meld_from_config_on_the_gpu_is_seeded():
    config = llama_config(num_hidden_layers=2)
    a = falqon.meld_from_config(config, CFG, device="cuda", seed=1, progress=False, verbose=False)
    b = falqon.meld_from_config(config, CFG, device="cuda", seed=1, progress=False, verbose=False)
    assert all(torch.equal(x.view(torch.uint8) if x.element_size() == 1 else x,
                           y.view(torch.uint8) if y.element_size() == 1 else y)
               for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.model.layers[0].self_attn.k_proj.weight.shape == (256 + 16, 1024)  # GQA, A's rows
    assert a.model.embed_tokens.weight.device.type == "cuda"
    assert len(falqon.melded_layers(a)) == 14
    ids = torch.randint(0, 4096, (2, 64), device="cuda")
    assert torch.isfinite(a(input_ids=ids).logits).all()
