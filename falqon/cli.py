"""The `falqon` console script.

  falqon finetune   fine-tune a causal LM with FALQON (default: a small LLaMA-architecture model
                    built from a shipped config, on instruction data derived from the standard
                    library: nothing is downloaded)
  falqon export     write a fine-tuned run as a compressed-tensors FP8 checkpoint
  falqon bench      time one FALQON layer against a bf16 LoRA layer on this device
  falqon info       build and GPU information

A problem with the input (a missing or malformed file, a path that is not a model, an output
directory holding another run, a damaged checkpoint) ends the command with one line,
`falqon: error: ...`, exit status 2, and no file changed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import time

import torch

from .config import ADAPTER_GAIN, UPDATE_MODES, FalqonConfig, FalqonError
from .export import FORMATS as EXPORT_FORMATS

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"
PRESETS = {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}
DEFAULT_PRESET = "tiny-llama"
RUN_FILE = "run.json"
RUN_FORMAT = "falqon-run"
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
BASE_DIR = "base-model"
FINAL_DIR = "final"
# The options that define a run: resuming with any of them changed is refused, because the
# result would no longer be the run that was started.
FINGERPRINT = ("model", "data", "rank", "alpha", "topk", "warmup_topk", "warmup_steps",
               "keep_residual", "target_modules", "exclude_modules", "lr", "lr_warmup_steps",
               "schedule", "weight_decay", "steps", "batch_size", "grad_accum", "seq_len",
               "template", "eval_size", "max_grad_norm", "seed", "dtype", "amax_history_len",
               "transposed_copy", "update_mode", "adapter_gain")
# Fingerprint options added after the first release: a run.json without them was made with
# these values (every run before --update-mode existed used the proxy update).
# Runs from before --adapter-gain trained the adapter with gain 1.
LATER_OPTION_DEFAULTS = {"amax_history_len": 0, "transposed_copy": False, "update_mode": "proxy",
                         "adapter_gain": 1.0}
# Options of the proxy update only; given with --update-mode adapter they are refused.
PROXY_ONLY = ("topk", "warmup_topk", "warmup_steps", "keep_residual")
# Default peak learning rates. Adapter mode: PEFT LoRA's usual 2e-4 for a pretrained --model (A
# has a LoRA A's row norm and the adapter gain stands in for a trained A's growth, so LoRA's
# learning rates carry over); 2e-3 for the random weights of a
# --model-config, which have far to go in a short demonstration run. Proxy mode: 2e-4 for a
# --model, 3e-2 for random weights, whose small values have FP8 steps that swallow smaller
# updates.
DEFAULT_LR = {("adapter", "model"): 2e-4, ("adapter", "config"): 2e-3,
              ("proxy", "model"): 2e-4, ("proxy", "config"): 3e-2}


def _positive(kind=int, minimum=1):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= minimum or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    return parse


def _names(text: str):
    names = [t.strip() for t in text.split(",") if t.strip()]
    return names or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="falqon", description="FALQON: LoRA fine-tuning with FP8 arithmetic.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    f = sub.add_parser(
        "finetune", help="fine-tune a causal language model with FALQON",
        description="Fine-tune a causal LM with FALQON. With no --model and no --model-config, a "
                    "small LLaMA-architecture model is built from the shipped tiny-llama config "
                    "(random weights); with no --data, instruction data is derived from the "
                    "installed Python standard library.")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH",
                     help="a local transformers causal-LM directory (config.json, weights, "
                          "tokenizer)")
    src.add_argument("--model-config", metavar="PRESET|JSON",
                     help=f"build a model with random weights from a preset "
                          f"({', '.join(PRESETS)}) or a transformers config JSON file "
                          f"(default: {DEFAULT_PRESET})")
    f.add_argument("--data", metavar="FILE",
                   help="Alpaca-format .json (array) or .jsonl file: instruction, optional input, "
                        "output (default: data derived from the standard library)")
    f.add_argument("--output-dir", metavar="DIR",
                   help="run directory (default: runs/finetune-<date>-<time>)")
    g = f.add_argument_group("FALQON")
    g.add_argument("--update-mode", choices=UPDATE_MODES, default="adapter",
                   help="adapter (default): B is a LoRA adapter in the forward, trained in fp32 "
                        "and never folded during training (docs/accuracy.md: 5%% below bf16 "
                        "LoRA's held-out loss on GSM8K, 3%% above on role-play); "
                        "proxy: the paper's top-k proxy update of the FP8 weights (the options "
                        "marked 'proxy mode' below are for it only and refused with adapter)")
    g.add_argument("--rank", type=_positive(), default=16, help="adapter rank (default: 16)")
    g.add_argument("--alpha", type=_positive(float, 1e-12), default=None,
                   help="LoRA alpha (default: rank, i.e. scaling 1)")
    g.add_argument("--adapter-gain", type=_positive(float, 1e-12), default=ADAPTER_GAIN,
                   help="adapter mode: a further factor on the adapter's output, scaling = gain * "
                        f"alpha / rank (default: {ADAPTER_GAIN:g}, which stands in for the growth "
                        "of a trained LoRA A, A being frozen here, so that LoRA's learning rates "
                        "carry over; exports fold it into B)")
    g.add_argument("--topk", type=_positive(int, 0), default=10,
                   help="proxy mode: rows of B folded into each FP8 weight per step (default: 10)")
    g.add_argument("--warmup-topk", type=_positive(int, 0), default=None,
                   help="proxy mode: rows folded during the first --warmup-steps steps "
                        "(default: rank)")
    g.add_argument("--warmup-steps", type=_positive(int, 0), default=0,
                   help="proxy mode: steps that fold --warmup-topk rows (default: 0)")
    g.add_argument("--keep-residual", action="store_true",
                   help="proxy mode: keep B's unapplied rows (default: zero B after each step)")
    g.add_argument("--amax-history-len", type=_positive(int, 0), default=0, metavar="H",
                   help="0 (default): current scaling, the paper's method; H > 0: delayed "
                        "scaling from the largest amax of the last H calls (one pass over each "
                        "activation and gradient instead of two)")
    g.add_argument("--transposed-copy", action="store_true",
                   help="keep a transposed FP8 copy of each weight for the input gradient "
                        "(a faster backward for twice the FP8 weight memory)")
    g.add_argument("--target-modules", type=_names, default=None, metavar="NAMES",
                   help="comma-separated layer names to meld (default: every linear layer)")
    g.add_argument("--exclude-modules", type=_names, default=["lm_head"], metavar="NAMES",
                   help="comma-separated layer names never melded (default: lm_head)")
    t = f.add_argument_group("training")
    t.add_argument("--lr", type=_positive(float, 1e-12), default=None,
                   help="peak learning rate of AdamW. Adapter mode: 2e-4 for a --model (PEFT "
                        "LoRA's usual value: A is scaled to a LoRA A's row norm, so LoRA's "
                        "learning rates carry over), 2e-3 for a model built from a config "
                        "(random weights, far from any data). Proxy mode: 2e-4 for a --model, "
                        "3e-2 for a model built from a config (the FP8 rounding of its small "
                        "random weights swallows smaller steps)")
    t.add_argument("--lr-warmup-steps", type=_positive(int, 0), default=None,
                   help="linear learning-rate warm-up (default: 5%% of --steps)")
    t.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="after the warm-up: cosine decay to 10%% of --lr, or constant "
                        "(default: cosine)")
    t.add_argument("--weight-decay", type=_positive(float, 0.0), default=0.0,
                   help="AdamW weight decay on B (default: 0)")
    t.add_argument("--steps", type=_positive(), default=200,
                   help="optimizer steps (default: %(default)s)")
    t.add_argument("--batch-size", type=_positive(), default=8,
                   help="sequences per micro-batch (default: %(default)s)")
    t.add_argument("--grad-accum", type=_positive(), default=1,
                   help="micro-batches per optimizer step (default: 1)")
    t.add_argument("--seq-len", type=_positive(int, 8), default=128,
                   help="tokens per sequence, prompt and response (default: %(default)s)")
    t.add_argument("--max-grad-norm", type=_positive(float, 0.0), default=1.0,
                   help="gradient clipping by global norm (0: off; default: 1)")
    t.add_argument("--template", choices=("auto", "alpaca", "short"), default="auto",
                   help="prompt template (auto: short for the byte-level tokenizer, else alpaca)")
    t.add_argument("--eval-size", type=_positive(int, 0), default=None,
                   help="examples held out for the eval loss (default: 5%%, at most 64)")
    t.add_argument("--eval-every", type=_positive(int, 0), default=25,
                   help="steps between eval losses (0: only at the start and the end; "
                        "default: 25)")
    t.add_argument("--save-every", type=_positive(int, 0), default=50,
                   help="steps between checkpoints (0: only at the end; default: 50)")
    t.add_argument("--keep-checkpoints", type=_positive(), default=2,
                   help="newest checkpoints kept (default: 2)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights, the data split and order, the SVD sketch")
    t.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    t.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model dtype (auto: bfloat16 on GPU, float32 on CPU)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run in --output-dir from its latest checkpoint (or the "
                        "given one)")
    t.add_argument("--stop-after", type=_positive(), default=None, metavar="N",
                   help="save and stop after step N (the schedule stays that of --steps)")
    t.add_argument("--export", metavar="DIR", help="also export the result (see falqon export)")
    t.add_argument("--export-format", choices=EXPORT_FORMATS, default=None,
                   help="the --export's format (see falqon export --format)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--no-plot", action="store_true", help="no loss plot")
    f.set_defaults(func=cmd_finetune)

    e = sub.add_parser(
        "export", help="export a fine-tuned run: FP8 base + PEFT LoRA adapter, merged FP8 or bf16",
        description="Write a fine-tuned run as a Hugging Face checkpoint. fp8+lora (the adapter "
                    "mode's default): the FP8 base exactly as trained, in compressed-tensors' "
                    "float-quantized format, plus a PEFT LoRA adapter in OUTPUT/adapter (PEFT's "
                    "PeftModel.from_pretrained and vLLM's --enable-lora load it). fp8 (the proxy "
                    "mode's default, and its only FP8 format): the weights as FP8 with their "
                    "scales; in the adapter mode W + scaling B A re-quantised (the share of the "
                    "update the rounding keeps is printed). bf16: the merged weights in the "
                    "model's dtype, a plain checkpoint any stack loads.")
    e.add_argument("source", help="a finetune run directory, or a checkpoint directory in one")
    e.add_argument("output", help="directory to write (must not exist or be empty)")
    e.add_argument("--base-model", metavar="PATH",
                   help="the base model directory (default: the run's)")
    e.add_argument("--activations", choices=("tensor", "token", "none"), default="tensor",
                   help="FP8 dynamic activation quantisation per tensor (as in training), per "
                        "token, or none (weight-only)")
    e.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                   help="fp8+lora, fp8 or bf16 (default: fp8+lora for adapter-mode runs, fp8 for "
                        "proxy-mode runs)")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser(
        "bench", help="time a FALQON layer against a bf16 LoRA layer on this device",
        description="A quick forward+backward timing of one layer. On a CPU the FP8 arithmetic "
                    "is emulated, so the numbers say nothing about FALQON's speed; the real "
                    "benchmarks are in benchmarks/.")
    b.add_argument("--tokens", type=_positive(), default=None,
                   help="M (default: 8192 GPU, 512 CPU)")
    b.add_argument("--in-features", type=_positive(), default=None,
                   help="K (default: 4096 GPU, 1024 CPU)")
    b.add_argument("--out-features", type=_positive(), default=None,
                   help="N (default: 4096 GPU, 1024 CPU)")
    b.add_argument("--rank", type=_positive(), default=16)
    b.add_argument("--iters", type=_positive(), default=None, help="timed iterations")
    b.add_argument("--device", default="auto")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="build and GPU information")
    i.set_defaults(func=cmd_info)
    parser._falqon_subparsers = {"finetune": f, "export": e, "bench": b, "info": i}
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = args.func(args)
    except FalqonError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"falqon: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("falqon: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


# ---- shared helpers -----------------------------------------------------------------------------

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


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers renamed from_pretrained's / from_config's torch_dtype to dtype in 4.56."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def check_model_dir(path: pathlib.Path) -> None:
    if not path.exists():
        raise FalqonError(f"model path {path} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FalqonError(f"{path} is not a model: a transformers model directory holds a "
                          f"config.json")


def load_base_model(path: pathlib.Path, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a local transformers directory; the byte tokenizer where the
    directory has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import byte_tokenizer

    check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **_dtype_kwarg(dtype))
    except Exception as exc:  # noqa: BLE001 (transformers raises many types for a bad model dir)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FalqonError(f"{path} is not a loadable causal LM: {first}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception:  # noqa: BLE001 (no or broken tokenizer files)
        if model.config.vocab_size < 259:
            raise FalqonError(f"{path} has no tokenizer and a vocabulary too small for the "
                              f"byte-level one") from None
        print(f"falqon: {path} has no tokenizer; using the byte-level tokenizer", file=sys.stderr)
        tokenizer = byte_tokenizer()
    return model.to(device), tokenizer


def build_random_model(config, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM

    from .data import byte_tokenizer

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


# ---- finetune -----------------------------------------------------------------------------------

def _run_options(args, model_id: str, data_id: str) -> dict:
    opts = {k: getattr(args, k) for k in FINGERPRINT if hasattr(args, k)}
    opts.update(model=model_id, data=data_id)
    return opts


def check_output_dir(out: pathlib.Path, resume: str | None) -> dict | None:
    """The run.json of the directory when resuming; errors where the directory cannot be used."""
    if out.exists() and not out.is_dir():
        raise FalqonError(f"output path {out} exists and is not a directory")
    run_file = out / RUN_FILE
    if resume:
        from .checkpoint import read_json

        run = read_json(run_file, "falqon run (nothing to resume)")
        if run.get("format") != RUN_FORMAT:
            raise FalqonError(f"{run_file} is not a falqon run file")
        return run
    if out.exists() and any(out.iterdir()):
        if run_file.is_file():
            raise FalqonError(f"output directory {out} already holds a run: pass --resume to "
                              f"continue it, or choose another --output-dir")
        raise FalqonError(f"output directory {out} is not empty and holds no falqon run: choose "
                          f"another --output-dir")
    return None


def _compare_run(run: dict, opts: dict, out: pathlib.Path) -> None:
    before = run.get("options", {})
    def was(k):
        return before.get(k, LATER_OPTION_DEFAULTS.get(k))

    differ = [k for k in FINGERPRINT if was(k) != _jsonable(opts.get(k))]
    if differ:
        detail = ", ".join(f"{k}: {was(k)!r} -> {_jsonable(opts.get(k))!r}"
                           for k in differ[:4])
        raise FalqonError(f"output directory {out} holds a different run ({detail}); resume it "
                          f"with its own options or choose another --output-dir")


def _jsonable(value):
    return json.loads(json.dumps(value))


def list_checkpoints(out: pathlib.Path) -> list[pathlib.Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _read_metrics(out: pathlib.Path, upto: int) -> list[dict]:
    path = out / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
        if row.get("step", 0) <= upto:
            rows.append(row)
    return rows


def plot_losses(rows: list[dict], path: pathlib.Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train (per step)")
        smooth, ema = [], losses[0]
        for v in losses:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(steps, smooth, color="tab:blue", lw=2, label="train (EMA 0.9)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", lw=2, label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _explicit_options(argv) -> set[str]:
    """The finetune options given on the command line (not left at their defaults)."""
    parser = build_parser()
    finetune = parser._falqon_subparsers["finetune"]
    for action in finetune._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _inherit(args, run: dict, explicit: set[str]) -> bool:
    """On --resume, options not given now are the run's own (for an option its run.json
    predates, the value every run had then: LATER_OPTION_DEFAULTS); True if the model is."""
    for key in FINGERPRINT:
        if key in ("model", "data") or key in explicit:
            continue
        if key in run["options"]:
            setattr(args, key, run["options"][key])
        elif key in LATER_OPTION_DEFAULTS:
            setattr(args, key, LATER_OPTION_DEFAULTS[key])
    if "data" not in explicit:
        args.data = run.get("data_path")
    return "model" not in explicit and "model_config" not in explicit


def _check_update_mode(args, explicit: set[str]) -> None:
    """Refuse the proxy update's options when the run is in the adapter mode (they would be
    silently meaningless there)."""
    if args.update_mode == "proxy" and "adapter_gain" in explicit:
        raise FalqonError("--adapter-gain only applies to the adapter mode: leave it out with "
                          "--update-mode proxy (the proxy update folds B A unscaled by it)")
    given = [k for k in PROXY_ONLY if k in explicit]
    if args.update_mode == "adapter" and given:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        verb, pronoun = ("apply", "them") if len(given) > 1 else ("applies", "it")
        raise FalqonError(f"{names} only {verb} to the proxy update: pass --update-mode proxy, or "
                          f"leave {pronoun} out (the adapter mode never folds B into the FP8 "
                          f"weights during training)")


def _resolve_inputs(args, run: dict | None, inherit_model: bool):
    """(records, data id, model config or None, model path or None, model id): the user's
    inputs, checked before anything is written. A resumed run's model is its saved base model."""
    from . import data as D

    if args.data:
        records = D.load_records(args.data)
        data_id = f"file:{pathlib.Path(args.data).name}:sha256:{_sha256(pathlib.Path(args.data))}"
    else:
        records = D.stdlib_records()
        data_id = f"stdlib:python-{platform.python_version()}:{len(records)}-functions"
    if inherit_model:
        model_path = pathlib.Path(run["base_model"])
        check_model_dir(model_path)
        return records, data_id, None, model_path, run["options"]["model"]
    if args.model:
        model_path = pathlib.Path(args.model)
        check_model_dir(model_path)
        return records, data_id, None, model_path, f"path:{model_path.resolve()}"
    config = load_model_config(args.model_config)
    spec = args.model_config or DEFAULT_PRESET
    model_id = f"config:{spec}" if spec in PRESETS else \
        f"config:{pathlib.Path(spec).name}:sha256:{_sha256(pathlib.Path(spec))}"
    return records, data_id, config, None, model_id


def cmd_finetune(args) -> int:
    from . import checkpoint as ckpt
    from . import data as D
    from .convert import meld, melded_summary
    from .training import (attach, enable_gradient_checkpointing, evaluate, lm_loss_sum, lr_at,
                           proxy_state)

    if args.resume and not args.output_dir:
        raise FalqonError("--resume needs the run's --output-dir")
    out = pathlib.Path(args.output_dir or time.strftime("runs/finetune-%Y%m%d-%H%M%S"))
    run = check_output_dir(out, args.resume)
    explicit = _explicit_options(args.argv)
    inherit_model = run is not None and _inherit(args, run, explicit)
    _check_update_mode(args, explicit)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.dtype = str(dtype).removeprefix("torch.")
    if args.stop_after is not None and args.stop_after > args.steps:
        raise FalqonError(f"--stop-after {args.stop_after} is beyond --steps {args.steps}")
    if args.export:
        _check_export_dir(pathlib.Path(args.export))

    # Everything that can fail on the user's input is checked before anything is written.
    records, data_id, config, model_path, model_id = _resolve_inputs(args, run, inherit_model)
    if args.lr is None:  # see --lr's help
        source = "config" if model_id.startswith("config:") else "model"
        args.lr = DEFAULT_LR[(args.update_mode, source)]
    if args.lr_warmup_steps is None:
        args.lr_warmup_steps = args.steps // 20
    if args.eval_size is None:
        args.eval_size = min(64, len(records) // 20)
    opts = _run_options(args, model_id, data_id)
    resume_from = None
    if run is not None:
        _compare_run(run, opts, out)
        checkpoints = list_checkpoints(out)
        if args.resume != "latest":
            resume_from = pathlib.Path(args.resume)
        elif checkpoints:
            resume_from = checkpoints[-1]
        else:
            raise FalqonError(f"--resume: {out} holds no checkpoint yet")
        state = ckpt.read_trainer_state(resume_from)  # size checks before anything is loaded
        ckpt.read_checkpoint_meta(resume_from)
        if state.get("options") != run["options"]:
            raise FalqonError(f"checkpoint {resume_from} belongs to another run than {out}")
        if config is not None:  # the run's random base weights were saved at its start
            config, model_path = None, pathlib.Path(run["base_model"])

    if config is not None:
        model, tokenizer = build_random_model(config, device, dtype, args.seed)
    else:
        model, tokenizer = load_base_model(model_path, device, dtype)
    template = args.template
    if template == "auto":
        template = "short" if D.is_byte_tokenizer(tokenizer) else "alpaca"
    examples = D.encode(records, tokenizer, args.seq_len, template)
    train, held_out = D.split(examples, args.eval_size, args.seed)
    per_step = args.batch_size * args.grad_accum
    order = D.BatchOrder(len(train), per_step, args.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id

    # From here on files are written.
    out.mkdir(parents=True, exist_ok=True)
    if run is None:
        if config is not None:  # keep the random base weights: resume and export need them
            model.save_pretrained(out / BASE_DIR)
            tokenizer.save_pretrained(out / BASE_DIR)
            base_path = (out / BASE_DIR).resolve()
        else:
            base_path = model_path.resolve()
        run = {"format": RUN_FORMAT, "options": _jsonable(opts), "base_model": str(base_path),
               "model_path": args.model and str(model_path.resolve()),
               "model_config": args.model_config,
               "data_path": args.data and str(pathlib.Path(args.data).resolve()),
               "template": template, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        (out / RUN_FILE).write_text(json.dumps(run, indent=2))

    def make_optimizer(m):
        params = [p for p in m.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999),
                                 weight_decay=args.weight_decay)

    start = 0
    if resume_from is not None:
        model, optimizer, trainer_state = ckpt.load_training_checkpoint(model, make_optimizer,
                                                                        resume_from)
        start = int(trainer_state["step"])
        print(f"falqon: resuming {out} at step {start} from {resume_from}")
        print(melded_summary(model))
    else:
        cfg = FalqonConfig(
            rank=args.rank, alpha=args.alpha, topk=args.topk, warmup_topk=args.warmup_topk,
            warmup_steps=args.warmup_steps, keep_residual=args.keep_residual,
            target_modules=args.target_modules, exclude_modules=args.exclude_modules,
            seed=args.seed, transposed_copy=args.transposed_copy,
            amax_history_len=args.amax_history_len, update_mode=args.update_mode,
            adapter_gain=args.adapter_gain)
        try:
            meld(model, cfg, progress=not args.no_progress, verbose=True)
        except ValueError as exc:
            raise FalqonError(str(exc)) from None
        optimizer = make_optimizer(model)
        torch.manual_seed(args.seed)  # dropout, if the model has any; resume restores it
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    handle = attach(optimizer, model)
    model.train()

    rows = _read_metrics(out, start)
    metrics = open(out / METRICS_FILE, "w")  # drops what a stopped run logged after `start`
    metrics.writelines(json.dumps(r) + "\n" for r in rows)

    def log(row):
        rows.append(row)
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    def to_device(batch):
        return {k: v.to(device) for k, v in batch.items()}

    eval_batches = [to_device(D.collate(held_out[i:i + args.batch_size], pad_id))
                    for i in range(0, len(held_out), args.batch_size)]

    def run_eval(step):
        if not eval_batches:
            return None
        log({"step": step, "eval_loss": evaluate(model, eval_batches)})
        return rows[-1]["eval_loss"]

    from tqdm.auto import tqdm

    trainable = [p for p in model.parameters() if p.requires_grad]
    stop = min(args.steps, args.stop_after or args.steps)
    if start == 0:
        run_eval(0)
    bar = tqdm(total=args.steps, initial=start, desc="falqon finetune", unit="step",
               disable=args.no_progress, dynamic_ncols=True)
    began, tokens = time.perf_counter(), 0
    for step in range(start, stop):
        lr = lr_at(step, args.lr, args.steps, args.lr_warmup_steps, args.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = order.indices(step)
        micro = [D.collate([train[j] for j in idx[i:i + args.batch_size]], pad_id)
                 for i in range(0, per_step, args.batch_size)]
        # Counted on the host before the batches move: no device read-back.
        labelled = max(sum(int((b["labels"][:, 1:] != D.IGNORE_INDEX).sum()) for b in micro), 1)
        tokens += sum(int(b["attention_mask"].sum()) for b in micro)
        micro = [to_device(b) for b in micro]
        total = torch.zeros((), device=device)
        for batch in micro:
            loss_sum, _ = lm_loss_sum(model, batch)
            # The step's loss is the mean over all its labelled tokens, whichever micro-batch
            # holds them.
            (loss_sum / labelled).backward()
            total += loss_sum.detach()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()  # proxy mode: falqon's hook folds this step's B into the FP8 weights
        optimizer.zero_grad(set_to_none=True)
        loss = float(total) / labelled
        done = step + 1
        log({"step": done, "loss": loss, "lr": lr})
        postfix = {"loss": f"{loss:.3f}"}
        if args.eval_every and done % args.eval_every == 0 and done < args.steps and eval_batches:
            postfix["eval"] = f"{run_eval(done):.3f}"
        bar.set_postfix(postfix)
        bar.update(1)
        if (args.save_every and done % args.save_every == 0) or done == stop:
            epoch, position = order.position(done)
            state = {"step": done, "epoch": epoch, "position": position,
                     "proxy": proxy_state(model).to_dict(), "options": run["options"]}
            ckpt.save_training_checkpoint(model, optimizer,
                                          out / CHECKPOINTS / f"step-{done:07d}", state)
            for old in list_checkpoints(out)[:-args.keep_checkpoints]:
                shutil.rmtree(old)
    bar.close()
    handle.remove()
    elapsed = time.perf_counter() - began
    if start >= args.steps:
        metrics.close()
        print(f"falqon: the run in {out} is already complete ({args.steps} steps)")
        return 0
    if stop == args.steps:
        run_eval(stop)
    metrics.close()
    plotted = not args.no_plot and plot_losses(
        rows, out / PLOT_FILE,
        f"FALQON {model_id.split(':')[1]}: rank {args.rank}, "
        f"{'adapter mode' if args.update_mode == 'adapter' else f'proxy mode, top-k {args.topk}'}"
        f", lr {args.lr:g}")
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    report = [f"falqon: steps {start}->{stop} in {elapsed:.1f}s "
              f"({tokens / max(elapsed, 1e-9):,.0f} tokens/s on {device.type})",
              f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}"]
    if len(evals) >= 2:
        report.append(f"eval loss {evals[0]:.3f} -> {evals[-1]:.3f}")
    print("; ".join(report))
    if stop < args.steps:
        print(f"falqon: stopped after step {stop}; continue with: falqon finetune --output-dir "
              f"{out} --resume")
        return 0
    ckpt.save_pretrained(model, out / FINAL_DIR)
    tokenizer.save_pretrained(out / FINAL_DIR)
    print(f"falqon: model saved to {out / FINAL_DIR}" +
          (f", loss plot {out / PLOT_FILE}" if plotted else ""))
    if args.export:
        _export_and_report(model, pathlib.Path(args.export), tokenizer, "tensor",
                           args.export_format)
    return 0


# ---- export -------------------------------------------------------------------------------------

def _check_export_dir(path: pathlib.Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FalqonError(f"export directory {path} exists and is not empty")


def _find_run(source: pathlib.Path) -> tuple[pathlib.Path, dict | None]:
    """(checkpoint directory, run.json or None) for a run or checkpoint directory."""
    from .checkpoint import CONFIG_FILE

    if not source.is_dir():
        raise FalqonError(f"{source} is not a directory")
    if (source / RUN_FILE).is_file():
        run = check_output_dir(source, "latest")
        final = source / FINAL_DIR
        if (final / CONFIG_FILE).is_file():
            return final, run
        checkpoints = list_checkpoints(source)
        if not checkpoints:
            raise FalqonError(f"run {source} has no checkpoint yet")
        return checkpoints[-1], run
    if (source / CONFIG_FILE).is_file():
        for parent in (source.parent, source.parent.parent):
            if (parent / RUN_FILE).is_file():
                return source, check_output_dir(parent, "latest")
        return source, None
    raise FalqonError(f"{source} is neither a falqon run nor a falqon checkpoint")


def cmd_export(args) -> int:
    from .checkpoint import from_pretrained, read_checkpoint_meta
    from .export import export

    out = pathlib.Path(args.output)
    _check_export_dir(out)
    checkpoint, run = _find_run(pathlib.Path(args.source))
    meta = read_checkpoint_meta(checkpoint)
    # A format the run cannot have is refused before the model is loaded.
    from .export import resolve_format

    fmt = resolve_format(meta.get("config", {}).get("update_mode", "proxy"), args.format)
    base = args.base_model or (run or {}).get("base_model")
    if not base:
        raise FalqonError(f"{checkpoint} is not inside a falqon run: pass --base-model")
    dtype_name = (run or {}).get("options", {}).get("dtype", "float32")
    model, tokenizer = load_base_model(pathlib.Path(base), torch.device("cpu"),
                                       getattr(torch, dtype_name))
    model = from_pretrained(model, checkpoint)
    _export_and_report(model, out, tokenizer, args.activations, fmt)
    return 0


def _export_and_report(model, out: pathlib.Path, tokenizer, activations: str, fmt) -> None:
    """falqon.export in `fmt` (None: the model's default), then a line saying what was written
    and how to load it."""
    from .convert import melded_layers
    from .export import export, resolve_format, update_mode_of

    fmt = resolve_format(update_mode_of(model, melded_layers(model)), fmt)
    export(model, out, tokenizer=tokenizer,
           activations=None if activations == "none" else activations, format=fmt)
    what = {"fp8+lora": f"the FP8 base (compressed-tensors float-quantized) and a PEFT LoRA "
                        f"adapter in {out / 'adapter'}: PeftModel.from_pretrained("
                        f"AutoModelForCausalLM.from_pretrained('{out}'), '{out / 'adapter'}'), "
                        f"or vllm serve {out} --enable-lora --lora-modules NAME={out / 'adapter'}",
            "fp8": "FP8 weights with per-tensor scales, compressed-tensors float-quantized",
            "bf16": "the merged weights in the model's dtype (a plain checkpoint)"}[fmt]
    print(f"falqon: exported to {out} ({fmt}: {what})")


# ---- bench --------------------------------------------------------------------------------------

def _time_it(fn, iters: int, device: torch.device) -> float:
    """Median seconds per call of fn after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def cmd_bench(args) -> int:
    from torch import nn

    from .modules import MeldedLinear

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    M = args.tokens or (8192 if gpu else 512)
    K = args.in_features or (4096 if gpu else 1024)
    N = args.out_features or (4096 if gpu else 1024)
    iters = args.iters or (50 if gpu else 5)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    base = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    try:
        melded = MeldedLinear.from_linear(base, rank=args.rank)
    except ValueError as exc:
        raise FalqonError(str(exc)) from None
    base.weight.requires_grad_(False)
    lora_A = torch.randn(args.rank, K, device=device, dtype=dtype) / K ** 0.5
    lora_B = torch.zeros(N, args.rank, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(M, N, device=device, dtype=dtype)

    def lora_step():
        y = base(x) + (x @ lora_A.t()) @ lora_B.t()
        y.backward(g)

    def falqon_step():
        melded(x).backward(g)

    t_lora = _time_it(lora_step, iters, device)
    t_falqon = _time_it(falqon_step, iters, device)
    name = torch.cuda.get_device_name(device) if gpu else platform.processor() or "CPU"
    print(f"falqon bench on {device.type} ({name}): M={M} K={K} N={N} rank={args.rank}, "
          f"forward+backward, median of {iters}")
    print(f"  bf16 LoRA layer   {t_lora * 1e3:9.3f} ms")
    print(f"  FALQON layer      {t_falqon * 1e3:9.3f} ms   ({t_lora / t_falqon:.2f}x)")
    if not gpu:
        print("  note: on a CPU the FP8 arithmetic is emulated in float32; these numbers say "
              "nothing about FALQON's speed on FP8 hardware (see benchmarks/).")
    return 0


# ---- info ---------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    try:
        info = importlib.import_module("falqon.info")
    except ImportError as exc:
        if getattr(exc, "name", None) == "falqon.info":
            raise FalqonError("`falqon info` is not available: this falqon has no falqon.info "
                              "module") from None
        raise
    return info.main() or 0


if __name__ == "__main__":
    sys.exit(main())
