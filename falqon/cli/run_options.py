"""Which options define a `falqon finetune` run, which others it keeps, and how a re-run or a
--resume gets them back."""

from __future__ import annotations

import json
import pathlib

from ..config import FalqonError, default_adapter_gain

# The options that define a run: resuming with any of them changed is refused, because the
# result would no longer be the run that was started.
FINGERPRINT = ("model", "data", "rank", "alpha", "topk", "warmup_topk", "warmup_steps",
               "keep_residual", "target_modules", "exclude_modules", "lr", "lr_warmup_steps",
               "schedule", "weight_decay", "steps", "batch_size", "grad_accum", "seq_len",
               "template", "eval_size", "max_grad_norm", "seed", "dtype", "amax_history_len",
               "transposed_copy", "update_mode", "adapter_gain", "adapter_init", "train_a")
# Fingerprint options added after the first release: a run.json without them was made with
# these values (every run before --update-mode existed used the proxy update; every run before
# --adapter-gain trained the adapter with gain 1; every run before --adapter-init melded the
# error_svd A; every run before --train-a kept A frozen).
LATER_OPTION_DEFAULTS = {"amax_history_len": 0, "transposed_copy": False, "update_mode": "proxy",
                         "adapter_gain": 1.0, "adapter_init": "error_svd", "train_a": False}
# The other options a run was started with (they change no weight): restored on --resume unless
# given again, and then kept for the next one. --resume, --stop-after, --no-progress and
# --config belong to one invocation.
SETTINGS = ("eval_every", "save_every", "keep_checkpoints", "gradient_checkpointing", "device",
            "no_plot", "export", "export_format", "report_to", "fuse")
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


def jsonable(value):
    return json.loads(json.dumps(value))


def run_options(args, model_id: str, data_id: str) -> dict:
    opts = {k: getattr(args, k) for k in FINGERPRINT if hasattr(args, k)}
    opts.update(model=model_id, data=data_id)
    return jsonable(opts)


def run_settings(args) -> dict:
    settings = {k: getattr(args, k) for k in SETTINGS}
    if settings["export"]:
        settings["export"] = str(pathlib.Path(settings["export"]).resolve())
    return jsonable(settings)


def compare_run(run: dict, opts: dict, out: pathlib.Path, resume: bool = True,
                skip: tuple = ()) -> None:
    """Refuse options that differ from the run's (those in `skip` are compared later)."""
    before = run.get("options", {})

    def was(k):
        return before.get(k, LATER_OPTION_DEFAULTS.get(k))

    differ = [k for k in FINGERPRINT if k not in skip and was(k) != jsonable(opts.get(k))]
    if differ:
        detail = ", ".join(f"{k}: {was(k)!r} -> {jsonable(opts.get(k))!r}"
                           for k in differ[:4])
        if not resume:
            raise FalqonError(f"output directory {out} already holds a run ({detail}): pass "
                              f"--resume to continue it with its own options, or choose another "
                              f"--output-dir")
        raise FalqonError(f"output directory {out} holds a different run ({detail}); resume it "
                          f"with its own options or choose another --output-dir")


def inherit(args, run: dict, explicit: set[str]) -> bool:
    """On --resume, options not given now are the run's own (for an option its run.json
    predates, the value every run had then: LATER_OPTION_DEFAULTS); True if the model is."""
    saved = {**run.get("settings", {}), **run["options"]}
    for key in FINGERPRINT + SETTINGS:
        if key in ("model", "data") or key in explicit:
            continue
        if key in saved:
            setattr(args, key, saved[key])
        elif key in LATER_OPTION_DEFAULTS:
            setattr(args, key, LATER_OPTION_DEFAULTS[key])
    if "data" not in explicit:
        args.data = run.get("data_path")
    return "model" not in explicit and "model_config" not in explicit


def check_update_mode(args, explicit: set[str]) -> None:
    """Refuse the proxy update's options when the run is in the adapter mode (they would be
    silently meaningless there), and the adapter's gain and init in the proxy mode."""
    if args.update_mode == "proxy" and "adapter_gain" in explicit:
        raise FalqonError("--adapter-gain only applies to the adapter mode: leave it out with "
                          "--update-mode proxy (the proxy update folds B A unscaled by it)")
    if args.update_mode == "proxy" and args.train_a:
        raise FalqonError("--train-a only applies to the adapter mode: leave it out with "
                          "--update-mode proxy (the proxy update keeps the melded A)")
    if args.adapter_gain is None:  # the adapter's default gain depends on whether A trains
        args.adapter_gain = default_adapter_gain(args.train_a)
    if args.update_mode == "proxy" and args.adapter_init != "error_svd":
        raise FalqonError(f"--adapter-init {args.adapter_init} only applies to the adapter mode: "
                          f"leave it out with --update-mode proxy (the proxy update keeps the "
                          f"paper's error_svd A)")
    given = [k for k in PROXY_ONLY if k in explicit]
    if args.update_mode == "adapter" and given:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        verb, pronoun = ("apply", "them") if len(given) > 1 else ("applies", "it")
        raise FalqonError(f"{names} only {verb} to the proxy update: pass --update-mode proxy, or "
                          f"leave {pronoun} out (the adapter mode never folds B into the FP8 "
                          f"weights during training)")


def check_plain(args) -> None:
    """Options whose values cannot work whatever the run."""
    if args.stop_after is not None and args.stop_after > args.steps:
        raise FalqonError(f"--stop-after {args.stop_after} is beyond --steps {args.steps}")
    if args.export_format and not args.export:
        raise FalqonError("--export-format needs --export DIR")
    if args.report_to != "none":
        from .reporting import check_reporter

        check_reporter(args.report_to)
