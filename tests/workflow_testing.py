"""Small models and data shared by the workflow and CLI tests (tests/test_workflow_*.py,
tests/test_cli.py): every model is built from a config with random weights, nothing downloaded."""

from __future__ import annotations

import json
import pathlib
import random

import torch

# Every linear layer of these is a multiple of 16 wide (FP8 GEMMs), k/v included (2 heads x 16).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=272, max_position_embeddings=256)


def tiny_config(arch: str = "llama", **overrides):
    import transformers as T

    kw = dict(TINY, **overrides)
    if arch == "llama":
        return T.LlamaConfig(**kw)
    if arch == "qwen2":
        return T.Qwen2Config(**kw)
    if arch == "mistral":
        return T.MistralConfig(**kw)
    if arch == "bert":
        kw.pop("num_key_value_heads")
        return T.BertConfig(**kw)
    raise ValueError(arch)


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **overrides):
    import transformers as T

    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))


def tiny_config_file(directory: pathlib.Path) -> pathlib.Path:
    """The tiny LLaMA config as a transformers config JSON (for --model-config)."""
    path = directory / "tiny.json"
    path.write_text(json.dumps(dict(TINY, model_type="llama", pad_token_id=256, bos_token_id=257,
                                    eos_token_id=258)))
    return path


WORDS = ("alpha beta gamma delta kappa sigma omega blue green red fast slow add sub mul list map "
         "sort key value token layer weight scale").split()


def records(n: int, seed: int = 0) -> list[dict]:
    """n random Alpaca records (some with an input)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, 4)
        out.append({"instruction": f"Repeat the words {' '.join(words)} reversed.",
                    "input": "" if i % 3 else f"case {i}",
                    "output": " ".join(reversed(words)) + "."})
    return out


def write_json(path: pathlib.Path, recs: list[dict]) -> pathlib.Path:
    path.write_text(json.dumps(recs, indent=2))
    return path


def snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    """Every file under `directory` and its bytes, to check that nothing changed."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def cli_inputs(root: pathlib.Path) -> dict:
    """A tiny model config file and 24 Alpaca records under `root`: a CLI run's inputs."""
    return {"config": str(tiny_config_file(root)),
            "data": str(write_json(root / "data.json", records(24)))}


def cli_finetune(inputs: dict, out, run_options, *extra) -> int:
    """`falqon finetune` on cli_inputs' model and data into `out`; its exit status."""
    from falqon.cli import main

    return main(["finetune", "--model-config", inputs["config"], "--data", inputs["data"],
                 "--output-dir", str(out), *run_options, *extra])
