"""The `falqon` command line's options: the parser, a YAML config file beside the flags, and which
options the command line (or the config file) gave."""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

from ..config import ADAPTER_GAIN, ADAPTER_INITS, TRAINED_A_GAIN, UPDATE_MODES, FalqonError
from ..export import FORMATS as EXPORT_FORMATS
from ..fusion import BACKENDS as FUSE_BACKENDS
from .models import DEFAULT_PRESET, PRESETS

REPORT_TO = ("none", "tensorboard", "wandb")


class Parser(argparse.ArgumentParser):
    """argparse with falqon's one-line errors (`falqon: error: ...`, exit status 2)."""

    def error(self, message):
        print(f"falqon: error: {' '.join(message.split())} (see {self.prog} --help)",
              file=sys.stderr)
        raise SystemExit(2)


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
    parser = Parser(prog="falqon", description="FALQON: LoRA fine-tuning with FP8 arithmetic.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=Parser)
    f = _finetune_parser(sub)
    e = _export_parser(sub)
    b = _bench_parser(sub)
    i = sub.add_parser("info", help="build and GPU information",
                       description="What this build of falqon holds and whether this machine's "
                                   "GPU can run it.")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    parser._falqon_subparsers = {"finetune": f, "export": e, "bench": b, "info": i}
    return parser


def version_line() -> str:
    import torch

    from .. import __version__, build_info

    info = build_info()
    kernels = f"CUDA kernels for {' '.join(info['cuda_archs'])}" if info["with_cuda"] else \
        "CPU reference ops only"
    return f"falqon {__version__} (torch {torch.__version__}, {kernels})"


def _finetune_parser(sub):
    f = sub.add_parser(
        "finetune", help="fine-tune a causal language model with FALQON",
        description="Fine-tune a causal LM with FALQON. With no --model and no --model-config, a "
                    "small LLaMA-architecture model is built from the shipped tiny-llama config "
                    "(random weights); with no --data, instruction data is derived from the "
                    "installed Python standard library.")
    f.add_argument("--config", metavar="YAML",
                   help="a YAML file of finetune options (their names, with - or _); the flags "
                        "given beside it override it")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH",
                     help="a local transformers causal-LM directory (config.json, weights, "
                          "tokenizer)")
    src.add_argument("--model-config", metavar="PRESET|JSON",
                     help=f"build a model with random weights from a preset "
                          f"({', '.join(PRESETS)}) or a transformers config JSON file "
                          f"(default: {DEFAULT_PRESET})")
    f.add_argument("--data", metavar="FILE",
                   help=".json, .jsonl or .parquet file of Alpaca (instruction, optional input, "
                        "output), prompt/completion or messages (chat, rendered with the "
                        "tokenizer's chat template) records (default: data derived from the "
                        "standard library)")
    f.add_argument("--output-dir", metavar="DIR",
                   help="run directory (default: runs/finetune-<date>-<time>)")
    _falqon_options(f.add_argument_group("FALQON"))
    _training_options(f.add_argument_group("training"))
    _run_options(f.add_argument_group("the run"))
    return f


def _falqon_options(g):
    g.add_argument("--update-mode", choices=UPDATE_MODES, default="adapter",
                   help="adapter (default): B is a LoRA adapter in the forward, trained in fp32 "
                        "and never folded during training (docs/accuracy.md: 3.2%% below bf16 "
                        "LoRA's held-out loss on GSM8K, 1.15%% above on role-play); "
                        "proxy: the paper's top-k proxy update of the FP8 weights (the options "
                        "marked 'proxy mode' below are for it only and refused with adapter)")
    g.add_argument("--rank", type=_positive(), default=16, help="adapter rank (default: 16)")
    g.add_argument("--alpha", type=_positive(float, 1e-12), default=None,
                   help="LoRA alpha (default: rank, i.e. scaling 1)")
    g.add_argument("--adapter-gain", type=_positive(float, 1e-12), default=None,
                   help="adapter mode: a further factor on the adapter's output, scaling = gain * "
                        f"alpha / rank (default: {ADAPTER_GAIN:g}, which stands in for the growth "
                        "of a trained LoRA A, A being frozen here, so that LoRA's learning rates "
                        f"carry over; {TRAINED_A_GAIN:g} with --train-a; exports fold it into B)")
    g.add_argument("--train-a", action="store_true",
                   help="adapter mode: train A as well (LoRA over the FP8 base instead of "
                        "LoRA-FA: an fp32 A per layer, its FP8 rows rewritten after each step; "
                        "docs/accuracy.md: a probe of it ended below bf16 LoRA's held-out loss on "
                        "both tasks)")
    g.add_argument("--adapter-init", choices=ADAPTER_INITS, default="error_svd",
                   help="adapter mode: where the frozen A comes from: error_svd (default, the "
                        "paper's: the SVD of W's FP8 quantisation error), random (a seeded "
                        "Gaussian A, LoRA-FA's) or weight_svd (W's top-r right singular vectors); "
                        "rescaled to a LoRA A's row norm either way. Under study "
                        "(docs/accuracy.md)")
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


def _training_options(t):
    t.add_argument("--lr", type=_positive(float, 1e-12), default=None,
                   help="peak learning rate of AdamW. Adapter mode: 2e-4 for a --model (PEFT "
                        "LoRA's usual value: A has a LoRA A's row norm and the adapter gain, so "
                        "LoRA's learning rates carry over), 2e-3 for a model built from a config "
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
                   help="sequences per micro-batch, i.e. per GPU and forward (default: "
                        "%(default)s)")
    t.add_argument("--grad-accum", type=_positive(), default=1,
                   help="micro-batches per optimizer step, over all processes under torchrun "
                        "(default: 1, or the number of processes)")
    t.add_argument("--seq-len", type=_positive(int, 8), default=128,
                   help="tokens per sequence, prompt and response (default: %(default)s)")
    t.add_argument("--max-grad-norm", type=_positive(float, 0.0), default=1.0,
                   help="gradient clipping by global norm (0: off; default: 1)")
    t.add_argument("--template", choices=("auto", "alpaca", "short"), default="auto",
                   help="prompt template (auto: short for the byte-level tokenizer, else alpaca)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights, the data split and order, the SVD sketch")
    t.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model dtype (auto: bfloat16 on GPU, float32 on CPU)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--fuse", choices=FUSE_BACKENDS, default="auto",
                   help="fused kernels around the FP8 GEMMs (falqon.fuse): liger (Liger Kernel's "
                        "RMSNorm, SwiGLU, RoPE and fused linear cross-entropy, for LLaMA, Mistral "
                        "and Qwen2: pip install 'falqon[fast]'), compile (torch.compile of the "
                        "decoder layers, with Liger's fused loss where Liger is installed), off; "
                        "auto (default): compile on a CUDA GPU (measured faster than liger on "
                        "an H200), off on the CPU")


def _run_options(t):
    t.add_argument("--eval-size", type=_positive(int, 0), default=None,
                   help="examples held out for the eval loss (default: 5%%, at most 64)")
    t.add_argument("--eval-every", type=_positive(int, 0), default=25,
                   help="steps between eval losses (0: only at the start and the end; "
                        "default: 25)")
    t.add_argument("--save-every", type=_positive(int, 0), default=50,
                   help="steps between checkpoints (0: only at the end; default: 50)")
    t.add_argument("--keep-checkpoints", type=_positive(), default=2,
                   help="newest checkpoints kept (default: 2)")
    t.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    t.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run in --output-dir from its latest checkpoint (or the "
                        "given one), with the options it was started with; a run whose start "
                        "was interrupted starts again")
    t.add_argument("--stop-after", type=_positive(), default=None, metavar="N",
                   help="save and stop after step N (the schedule stays that of --steps)")
    t.add_argument("--export", metavar="DIR", help="also export the result (see falqon export)")
    t.add_argument("--export-format", choices=EXPORT_FORMATS, default=None,
                   help="the --export's format (see falqon export --format)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--no-plot", action="store_true", help="no loss plot")
    t.add_argument("--report-to", choices=REPORT_TO, default="none",
                   help="also log the metrics to TensorBoard (DIR/runs) or Weights & Biases "
                        "(needs that package; default: none)")


def _export_parser(sub):
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
    e.add_argument("source", help="a finetune run directory, a checkpoint directory in one, or "
                                  "a melded model's save_pretrained directory (a Trainer's "
                                  "checkpoint-N, or its output directory: the newest one)")
    e.add_argument("output", help="directory to write (must not exist or be empty)")
    e.add_argument("--base-model", metavar="PATH",
                   help="the base model directory (default: the run's, else the local "
                        "directory the melded model was loaded from)")
    e.add_argument("--activations", choices=("auto", "tensor", "token", "none"), default="auto",
                   help="FP8 dynamic activation quantisation: as in training (auto: per token "
                        "for adapter-mode runs, per tensor for proxy-mode or delayed-scaling "
                        "ones), per tensor, per token, or none (weight-only)")
    e.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                   help="fp8+lora, fp8 or bf16 (default: fp8+lora for adapter-mode runs, fp8 for "
                        "proxy-mode runs)")
    return e


def _bench_parser(sub):
    b = sub.add_parser(
        "bench", help="time a FALQON layer against a bf16 LoRA layer on this device",
        description="A quick forward+backward timing of one layer. Only a GPU with FP8 tensor "
                    "cores (compute capability 8.9 or newer) runs FALQON's FP8 kernels; on a CPU "
                    "or another GPU the FP8 arithmetic is emulated, the timings say nothing about "
                    "FALQON's speed and no speed-up is shown. The real benchmarks are in "
                    "benchmarks/.")
    b.add_argument("--tokens", type=_positive(), default=None,
                   help="M (default: 8192 GPU, 512 CPU)")
    b.add_argument("--in-features", type=_positive(), default=None,
                   help="K (default: 4096 GPU, 1024 CPU)")
    b.add_argument("--out-features", type=_positive(), default=None,
                   help="N (default: 4096 GPU, 1024 CPU)")
    b.add_argument("--rank", type=_positive(), default=16)
    b.add_argument("--iters", type=_positive(), default=None, help="timed iterations")
    b.add_argument("--device", default="auto")
    return b




# ---- the config file and the options given ------------------------------------------------------

def _config_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config value, argv without it)."""
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if token.startswith("--config="):
            return token.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def _load_yaml(path: str) -> dict:
    try:
        import yaml
    except ImportError:
        raise FalqonError("--config needs PyYAML (pip install pyyaml)") from None
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise FalqonError(f"--config {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise FalqonError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FalqonError(f"--config {path} must be a mapping of option names to values")
    return data


def _config_tokens(data: dict, path: str) -> list[str]:
    """The config file's options as command-line tokens."""
    actions = {a.dest: a for a in build_parser()._falqon_subparsers["finetune"]._actions}
    tokens = []
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "config"):
            raise FalqonError(f"--config {path}: {key!r} is not a finetune option")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch: true or false
            if not isinstance(value, bool):
                raise FalqonError(f"--config {path}: {key} must be true or false, got {value!r}")
            tokens += [flag] if value else []
        elif value is True and action.nargs == "?":
            tokens.append(flag)
        elif value is not None:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            tokens.append(f"{flag}={text}")
    return tokens


def expand_config(argv: list[str]) -> list[str]:
    """argv with a `finetune --config FILE`'s options put before the flags, which override them
    (argparse keeps an option's last value)."""
    path, rest = _config_path(argv)
    if path is None or "finetune" not in rest:
        return argv
    at = rest.index("finetune") + 1
    return rest[:at] + _config_tokens(_load_yaml(path), path) + rest[at:]


def explicit_options(argv: list[str]) -> set[str]:
    """The finetune options given on the command line or in its config file (not left at their
    defaults)."""
    parser = build_parser()
    for action in parser._falqon_subparsers["finetune"]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))
