"""`falqon export`: a finetune run (or a checkpoint in one) as a Hugging Face checkpoint."""

from __future__ import annotations

import pathlib

import torch

from ..config import FalqonError
from . import run_dir as R
from .finetune import check_export_dir
from .models import load_base_model


def _find_run(source: pathlib.Path) -> tuple[pathlib.Path, dict | None, pathlib.Path | None]:
    """(checkpoint directory, run.json or None, run directory or None) for a run or checkpoint
    directory."""
    from ..checkpoint import CONFIG_FILE

    if not source.is_dir():
        raise FalqonError(f"{source} is not a directory")
    if (source / R.RUN_FILE).is_file():
        run = R.check_output_dir(source, "latest")
        final = source / R.FINAL_DIR
        if (final / CONFIG_FILE).is_file():
            return final, run, source
        checkpoints = R.list_checkpoints(source)
        if not checkpoints:
            raise FalqonError(f"run {source} has no checkpoint yet")
        return checkpoints[-1], run, source
    if (source / CONFIG_FILE).is_file():
        for parent in (source.parent, source.parent.parent):
            if (parent / R.RUN_FILE).is_file():
                return source, R.check_output_dir(parent, "latest"), parent
        return source, None, None
    raise FalqonError(f"{source} is neither a falqon run nor a falqon checkpoint")


def cmd_export(args) -> int:
    from ..checkpoint import from_pretrained, read_checkpoint_meta
    from ..export import resolve_format

    out = pathlib.Path(args.output)
    check_export_dir(out)
    checkpoint, run, run_dir = _find_run(pathlib.Path(args.source))
    meta = read_checkpoint_meta(checkpoint)
    # A format the run cannot have is refused before the model is loaded.
    fmt = resolve_format(meta.get("config", {}).get("update_mode", "proxy"), args.format)
    if args.base_model:
        base = pathlib.Path(args.base_model)
    elif run is not None:
        base = R.base_path(run, run_dir)
    else:
        raise FalqonError(f"{checkpoint} is not inside a falqon run: pass --base-model")
    dtype_name = (run or {}).get("options", {}).get("dtype", "float32")
    model, tokenizer = load_base_model(base, torch.device("cpu"), getattr(torch, dtype_name))
    if run is not None:
        R.check_fingerprint(run, R.weights_fingerprint(model), base)
    model = from_pretrained(model, checkpoint)
    tmp = R.fresh_partial(out)
    export_and_report(model, tmp, tokenizer, args.activations, fmt, shown=out)
    R.replace_dir(tmp, out)
    return 0


def _point_adapter_at(path: pathlib.Path, shown: pathlib.Path) -> None:
    """The PEFT adapter's base_model_name_or_path names the export directory: where it will be
    renamed to, not the temporary directory it was written in."""
    import json

    config_file = path / "adapter" / "adapter_config.json"
    if path != shown and config_file.is_file():
        config = json.loads(config_file.read_text())
        if config.get("base_model_name_or_path") == str(path.resolve()):
            config["base_model_name_or_path"] = str(shown.resolve())
            config_file.write_text(json.dumps(config, indent=2))


def export_and_report(model, path: pathlib.Path, tokenizer, activations: str, fmt,
                      shown: pathlib.Path) -> None:
    """falqon.export into `path` in `fmt` (None: the model's default), then a line saying what
    was written and how to load it from `shown` (where `path` is renamed to)."""
    from ..convert import melded_layers
    from ..export import export, resolve_format, update_mode_of

    fmt = resolve_format(update_mode_of(model, melded_layers(model)), fmt)
    export(model, path, tokenizer=tokenizer,
           activations=None if activations == "none" else activations, format=fmt)
    _point_adapter_at(path, shown)
    out = shown
    what = {"fp8+lora": f"the FP8 base (compressed-tensors float-quantized) and a PEFT LoRA "
                        f"adapter in {out / 'adapter'}: PeftModel.from_pretrained("
                        f"AutoModelForCausalLM.from_pretrained('{out}'), '{out / 'adapter'}'), "
                        f"or vllm serve {out} --enable-lora --lora-modules NAME={out / 'adapter'}",
            "fp8": "FP8 weights with per-tensor scales, compressed-tensors float-quantized",
            "bf16": "the merged weights in the model's dtype (a plain checkpoint)"}[fmt]
    print(f"falqon: exported to {out} ({fmt}: {what})")
