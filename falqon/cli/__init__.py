"""The `falqon` console script.

  falqon finetune   fine-tune a causal LM with FALQON (default: a small LLaMA-architecture model
                    built from a shipped config, on instruction data derived from the standard
                    library: nothing is downloaded)
  falqon export     write a fine-tuned run as a Hugging Face checkpoint
  falqon bench      time one FALQON layer against a bf16 LoRA layer on this device
  falqon info       build and GPU information
  falqon --version

A problem with the input (a missing or malformed file, a path that is not a model, an option no
layer can take, an output directory holding another run or in use by one, a damaged
checkpoint, a full disk) ends the command with one line, `falqon: error: ...`, exit status 2;
finetune checks everything and melds the model before it writes anything.

The package: parser (options, the YAML config file), models (devices, the base model),
run_dir (a run directory: run.json, lock, fingerprint), run_options (which options define a
run and which a --resume restores), finetune, world (several processes: torchrun), reporting
(loss plot, --report-to), export, bench.
"""

from __future__ import annotations

import errno
import sys

from ..config import FalqonError
from .parser import build_parser, expand_config
from .run_options import FINGERPRINT, LATER_OPTION_DEFAULTS
from .world import is_leader

# Errors of the file system that are the user's to fix: one line, not a traceback.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def cmd_finetune(args) -> int:
    from .finetune import cmd_finetune as run

    return run(args)


def cmd_export(args) -> int:
    from .export import cmd_export as run

    return run(args)


def cmd_bench(args) -> int:
    from .bench import cmd_bench as run

    return run(args)


def cmd_info(args) -> int:
    import importlib

    try:
        info = importlib.import_module("falqon.info")
    except ImportError as exc:
        if getattr(exc, "name", None) == "falqon.info":
            raise FalqonError("`falqon info` is not available: this falqon has no falqon.info "
                              "module") from None
        raise
    return info.main(["--json"] if args.json else []) or 0


COMMANDS = {"finetune": cmd_finetune, "export": cmd_export, "bench": cmd_bench, "info": cmd_info}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = expand_config(argv)
        args = build_parser().parse_args(argv)
        args.argv = argv
        return int(COMMANDS[args.command](args) or 0)
    except FalqonError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        if is_leader():  # under torchrun every rank fails alike; rank 0 says so
            print(f"falqon: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in USER_ERRNOS:
            raise
        if is_leader():
            print(f"falqon: error: {exc.strerror}: {exc.filename or ''}".rstrip(": "),
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("falqon: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `falqon info | head`: the reader has gone
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


__all__ = ["FINGERPRINT", "LATER_OPTION_DEFAULTS", "build_parser", "main"]
