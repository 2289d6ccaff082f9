"""Devices, dtypes and the base model of a run: a local transformers directory, or random weights
built from a preset or a config JSON."""

from __future__ import annotations

import json
import pathlib
import sys

import torch

from ..config import FalqonConfig, FalqonError
from ..loading import dtype_kwarg as _dtype_kwarg

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
PRESETS = {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}
DEFAULT_PRESET = "tiny-llama"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FalqonError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FalqonError(f"--device {name}: no CUDA GPU is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model_config(spec: str | None):
    """A transformers config from a preset name or a config JSON file."""
    from transformers import AutoConfig

    spec = spec or DEFAULT_PRESET
    path = PRESETS.get(spec, pathlib.Path(spec))
    if not path.is_file():
        raise FalqonError(f"--model-config {spec!r} is neither a preset ({', '.join(PRESETS)}) "
                          f"nor a config JSON file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FalqonError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise FalqonError(f"{path} is not a transformers config (no model_type)")
    data = dict(data)
    try:
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (ValueError, KeyError, TypeError) as exc:
        raise FalqonError(f"{path} is not a usable transformers config: {exc}") from None


def check_model_dir(path: pathlib.Path) -> None:
    if not path.exists():
        raise FalqonError(f"model path {path} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FalqonError(f"{path} is not a model: a transformers model directory holds a "
                          f"config.json")


def load_base_model(path: pathlib.Path, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a local transformers directory; the byte tokenizer where the
    directory has none."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **_dtype_kwarg(dtype))
    except Exception as exc:  # noqa: BLE001 (transformers raises many types for a bad model dir)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FalqonError(f"{path} is not a loadable causal LM: {first}") from None
    return model.to(device), load_tokenizer(path, model.config.vocab_size)


def load_tokenizer(path: pathlib.Path, vocab_size: int):
    """The directory's tokenizer; the byte tokenizer where it has none."""
    from transformers import AutoTokenizer

    from ..data import byte_tokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:  # noqa: BLE001 (no or broken tokenizer files)
        if vocab_size < 259:
            raise FalqonError(f"{path} has no tokenizer and a vocabulary too small for the "
                              f"byte-level one") from None
        print(f"falqon: {path} has no tokenizer; using the byte-level tokenizer", file=sys.stderr)
        return byte_tokenizer()


def load_melded_model(path: pathlib.Path, device: torch.device, dtype: torch.dtype, args,
                      progress: bool):
    """(melded model, tokenizer, fingerprint of the base weights) of a local transformers
    directory: melded while it loads (falqon.meld_pretrained: one layer's high-precision weights
    at a time), its state dict hashed on the way. A directory without safetensors weights (only
    .bin files) is loaded whole, then melded."""
    from ..loading import meld_pretrained
    from ..weight_sources import INDEX_FILE, SINGLE_FILE
    from ..fingerprint import Fingerprint, weights_fingerprint

    check_model_dir(path)
    if not (path / INDEX_FILE).is_file() and not (path / SINGLE_FILE).is_file():
        model, tokenizer = load_base_model(path, device, dtype)
        fingerprint = weights_fingerprint(model)
        return meld_for_run(model, args, path, progress), tokenizer, fingerprint
    fingerprint, cfg = Fingerprint(), falqon_config(args)
    try:
        model = meld_pretrained(path, cfg, device=device, dtype=dtype, progress=progress,
                                on_tensor=fingerprint.update)
    except (ValueError, RuntimeError) as exc:  # FalqonError (a ValueError) names the file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FalqonError(first) from None
    return model, load_tokenizer(path, model.config.vocab_size), fingerprint.value()


def build_random_model(config, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM

    from ..data import byte_tokenizer

    if getattr(config, "vocab_size", 0) < 259:
        raise FalqonError(f"the model config's vocab_size {config.vocab_size} is below the 259 "
                          f"tokens of the byte-level tokenizer")
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(dtype))
    except ValueError as exc:
        raise FalqonError(f"cannot build a causal LM from the config: {exc}") from None
    return model, byte_tokenizer()


def check_finite(model, where: str) -> None:
    """Refuse a model with a NaN or infinite weight (the SVD of meld would fail on it)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise FalqonError(f"{where} has non-finite weights: {name} holds NaN or inf")


def falqon_config(args) -> FalqonConfig:
    """The run's FalqonConfig; what it refuses becomes a one-line error."""
    try:
        return FalqonConfig(
            rank=args.rank, alpha=args.alpha, topk=args.topk, warmup_topk=args.warmup_topk,
            warmup_steps=args.warmup_steps, keep_residual=args.keep_residual,
            target_modules=args.target_modules, exclude_modules=args.exclude_modules,
            seed=args.seed, transposed_copy=args.transposed_copy,
            amax_history_len=args.amax_history_len, update_mode=args.update_mode,
            adapter_gain=args.adapter_gain, adapter_init=args.adapter_init,
            train_a=args.train_a)
    except ValueError as exc:
        raise FalqonError(str(exc).strip().splitlines()[0]) from None


def meld_for_run(model, args, where: str, progress: bool):
    """falqon.meld with the run's FalqonConfig; what it refuses becomes a one-line error."""
    from ..convert import meld

    check_finite(model, where)
    cfg = falqon_config(args)
    try:
        meld(model, cfg, progress=progress, verbose=True)
    except (ValueError, RuntimeError) as exc:  # a rank or a pattern that fits no layer, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FalqonError(first) from None
    return model
