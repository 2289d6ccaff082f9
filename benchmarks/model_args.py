"""The model benchmarks' shared command line (benchmarks/model.py, profile_step.py and
distributed.py): the model shapes, the options that pick the model and its training setup, their
checks, what a results file records about the run, and where it goes by default."""

from __future__ import annotations

import argparse
import pathlib

import torch

if __package__ in (None, ""):
    import common
else:
    from . import common

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

# LlamaConfig fields per model shape. "tiny" is for CPU smoke tests only. llama2-70b has
# grouped-query attention (8 KV heads); its bf16 weights (~138 GB) do not fit one 141 GB GPU with
# anything else, so its models are built layer by layer (model_build.py).
SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, num_hidden_layers=32),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, num_hidden_layers=40),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, num_hidden_layers=80),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256, num_hidden_layers=2),
}


def model_name(shape: str, layers: int) -> str:
    """"llama-7b" for the full depth, "llama-7b-8L" for a layer cut."""
    full = SHAPES[shape]["num_hidden_layers"]
    return shape if layers == full else f"{shape}-{layers}L"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options that pick the model and its training setup (model.py, profile_step.py,
    distributed.py)."""
    p.add_argument("--model", choices=sorted(SHAPES), default="llama-7b")
    p.add_argument("--layers", type=int, help="cut the model to N decoder layers (default: all)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="PEFT adapter dtype; float32 adds torch.autocast(bf16) around the forward")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build", choices=("auto", "layerwise"), default="auto",
                   help="auto: the bf16 model is built whole unless its weights take more than "
                   "half the device (then falqon and QLoRA build layer by layer, the rest are "
                   "recorded as not fitting); layerwise: always layer by layer")
    p.add_argument("--memory-gib", type=float,
                   help="the device memory the fit checks assume (default: the GPU's; none on "
                   "the CPU)")
    p.add_argument("--checkpointing", choices=("non_reentrant", "reentrant"),
                   default="non_reentrant",
                   help="torch.utils.checkpoint's kind for every method (default non_reentrant, "
                   "transformers' default; reentrant keeps no saved-tensor hooks, less host "
                   "time a layer)")


def check_model_args(p: argparse.ArgumentParser, args) -> None:
    """Validate add_model_args' options; fill in layers, device and dtype."""
    full = SHAPES[args.model]["num_hidden_layers"]
    args.layers = args.layers or full
    if not 1 <= args.layers <= full:
        p.error(f"--layers must be between 1 and {full}")
    for name in ("batch", "seq", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    args.shape = SHAPES[args.model]
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible")
    # bf16 on the GPU; the CPU reference ops and CPU smoke tests run in float32.
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32


def model_config(args) -> dict:
    """The setup a results file records."""
    return {"model": model_name(args.model, args.layers), "layers": args.layers,
            "batch": args.batch, "seq": args.seq, "rank": args.rank, "topk": args.topk,
            "lora_dtype": args.lora_dtype, "dtype": str(args.dtype).removeprefix("torch."),
            "gradient_checkpointing": True, "checkpointing": args.checkpointing,
            "optimizer": f"AdamW(lr={args.lr})"}


def results_meta(device: torch.device, script: str, argv: list[str]) -> dict:
    """What a results file records about the run (common.run_metadata), with the versions of the
    peers and of falqon."""
    meta = common.run_metadata(device.type, script, argv)
    meta["versions"] = common.versions_of("transformers", "peft", "bitsandbytes", "torchao",
                                          "liger-kernel")
    try:
        import falqon

        meta["versions"]["falqon"] = falqon.__version__
        meta["falqon_build"] = falqon.build_info()
    except Exception as exc:  # the falqon method will record why it could not run
        meta["versions"]["falqon"] = f"not importable: {exc}"
    return meta


def default_out(prefix: str, args, quick: bool = False) -> pathlib.Path:
    """benchmarks/results/<prefix>_<device>.json, with the model and "quick" in the name for a
    layer cut or a quick run, so that they never overwrite the full run's file."""
    name = model_name(args.model, args.layers)
    short = common.device_tag(args.device.type)
    suffix = "" if name == "llama-7b" and not quick else f"_{name}{'_quick' * quick}"
    return RESULTS_DIR / f"{prefix}_{short}{suffix}.json"
