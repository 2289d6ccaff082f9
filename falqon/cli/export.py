"""`falqon export`: a finetune run (or a checkpoint in one), or a melded model's Hugging Face
Trainer checkpoint, as a Hugging Face checkpoint."""

from __future__ import annotations

import pathlib

import torch

from ..config import FalqonError
from ..fingerprint import weights_fingerprint
from . import run_dir as R
from .finetune import check_export_dir
from .models import load_base_model


def _trainer_checkpoint(source: pathlib.Path) -> pathlib.Path | None:
    """The newest falqon checkpoint among a Hugging Face Trainer output directory's checkpoint-N
    directories (what model.save_pretrained of a melded model writes), or None."""
    from ..checkpoint import CONFIG_FILE

    found = []
    for d in source.glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        if step.isdigit() and (d / CONFIG_FILE).is_file():
            found.append((int(step), d))
    return max(found)[1] if found else None


def _find_run(source: pathlib.Path) -> tuple[pathlib.Path, dict | None, pathlib.Path | None]:
    """(checkpoint directory, run.json or None, run directory or None) for a falqon run, a
    checkpoint directory (falqon's, or a Trainer's checkpoint-N) or a Trainer output directory
    (its newest checkpoint-N)."""
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
    newest = _trainer_checkpoint(source)
    if newest is not None:
        return newest, None, None
    if (source / "trainer_state.json").is_file() or (source / "model.safetensors").is_file():
        raise FalqonError(f"{source} holds no falqon checkpoint ({CONFIG_FILE}): a melded "
                          f"model's save_pretrained writes one (the Trainer's saves call it); "
                          f"this directory was written without one (by transformers' own "
                          f"save_pretrained: a model that was not melded, or an older falqon), "
                          f"so it cannot be exported")
    raise FalqonError(f"{source} is neither a falqon run, a falqon checkpoint nor a Trainer "
                      f"output directory with checkpoint-N directories")


def _base_of(meta: dict, checkpoint: pathlib.Path, given) -> pathlib.Path:
    """The base model of a checkpoint outside a falqon run: --base-model, else the local
    directory its model was loaded from (transformers' name_or_path, recorded at save)."""
    if given:
        return pathlib.Path(given)
    recorded = (meta.get("base_model") or {}).get("name_or_path") or ""
    if recorded and pathlib.Path(recorded).is_dir():
        return pathlib.Path(recorded)
    what = f"records base model {recorded!r}, which is not a local directory" if recorded \
        else "records no base model directory"
    raise FalqonError(f"{checkpoint} is not inside a falqon run and {what}: pass --base-model")


def cmd_export(args) -> int:
    from ..checkpoint import from_pretrained, read_checkpoint_meta
    from ..export import resolve_format

    out = pathlib.Path(args.output)
    check_export_dir(out)
    checkpoint, run, run_dir = _find_run(pathlib.Path(args.source))
    meta = read_checkpoint_meta(checkpoint)
    # A format the run cannot have is refused before the model is loaded.
    fmt = resolve_format(meta.get("config", {}).get("update_mode", "proxy"), args.format)
    if run is not None and not args.base_model:
        base = R.base_path(run, run_dir)
    else:
        base = _base_of(meta, checkpoint, args.base_model)
    # The dtype the base was melded in (its FP8 scale is checked against it, bit for bit).
    dtype_name = (run or {}).get("options", {}).get("dtype") or \
        (meta.get("base_model") or {}).get("dtype") or "float32"
    if not isinstance(getattr(torch, dtype_name, None), torch.dtype):
        raise FalqonError(f"{checkpoint}: unknown base model dtype {dtype_name!r}")
    model, tokenizer = load_base_model(base, torch.device("cpu"), getattr(torch, dtype_name))
    if run is not None:
        R.check_fingerprint(run, weights_fingerprint(model), base)
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
