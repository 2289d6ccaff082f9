"""`falqon finetune`: check every option, the data and the model and meld it; only then take the
run directory's lock and write; train on the Hugging Face Trainer (trainer_loop.py) with
bit-identical resume; finish (final eval, loss plot, final/ by rename, the export), which a
--resume repeats where a kill cut it short. Under torchrun or accelerate launch every rank trains
(DDP) and rank 0 alone writes: see world.py."""

from __future__ import annotations

import json
import pathlib
import platform
import time
import uuid
from types import SimpleNamespace


from ..config import FalqonError
from ..convert import mode_label
from ..fingerprint import weights_fingerprint
from . import run_dir as R
from .models import (DEFAULT_PRESET, PRESETS, build_random_model, check_model_dir,
                     load_melded_model, load_model_config, meld_for_run, resolve_device,
                     resolve_dtype)
from .parser import explicit_options
from .run_options import (DEFAULT_LR, check_plain, check_update_mode, compare_run, inherit,
                          run_options, run_settings)
from .world import World, check_grad_accum, world_from_env


def _sha256(path: pathlib.Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_export_dir(path: pathlib.Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FalqonError(f"export directory {path} exists and is not empty")


def cmd_finetune(args) -> int:
    # The Trainer (transformers, accelerate, datasets) imported before the process group starts:
    # imported after it, a gloo rank aborted at exit in 5 of 30 runs of tests/test_cli_torchrun.py's
    # error case. The abort's cause, found later in a core dump, is a gloo thread finishing a
    # collective during interpreter shutdown; World.stop() now waits for it (0 aborts in 100
    # torchrun runs, against 3 in 40 before).
    from . import trainer_loop  # noqa: F401

    world = world_from_env()
    if not world.leader:
        args.no_progress = True
    if args.no_progress:  # transformers' own bars too (loading and saving weights)
        from transformers.utils import logging

        logging.disable_progress_bar()
    if world.size > 1:
        world.start(args.device)
    try:
        with world.quiet():
            return _run(args, world)
    finally:
        world.stop()


def _checked_job(args, world: World) -> SimpleNamespace:
    from .trainer_loop import check_transformers

    check_transformers()
    job = _resolve_options(args, world)
    _resolve_inputs(job)
    _prepare_model(job)
    _prepare_data(job)
    return job


def _run(args, world: World) -> int:
    job = world.agree(_checked_job, args, world)
    lock = R.RunLock(job.out)

    def take_lock():
        job.out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        if R.check_output_dir(job.out, args.resume) != job.run:
            raise FalqonError(f"output directory {job.out} changed while this run was starting "
                              f"(another falqon run?)")

    try:
        world.on_leader(take_lock)
        job.run = world.on_leader(_write_start, job)
        _train(job)
        return world.on_leader(_finish, job)
    except OSError as exc:  # a full disk, a read-only file system, ...
        raise FalqonError(f"writing the run in {job.out} failed: {exc.strerror or exc} "
                          f"({exc.filename or 'a file'}); once that is fixed, continue with: "
                          f"falqon finetune --output-dir {job.out} --resume") from None
    finally:
        lock.release()


# ---- options ------------------------------------------------------------------------------------

def _resolve_options(args, world: World = World()) -> SimpleNamespace:
    """The run's options, checked: a --resume's or re-run's from its run.json."""
    if args.resume and not args.output_dir:
        raise FalqonError("--resume needs the run's --output-dir")
    out = pathlib.Path(args.output_dir or time.strftime("runs/finetune-%Y%m%d-%H%M%S"))
    R.check_unlocked(out)
    run = R.check_output_dir(out, args.resume)
    explicit = explicit_options(args.argv)
    inherit_model = False
    if run is not None and args.resume:
        inherit_model = inherit(args, run, explicit)
        if args.data and not pathlib.Path(args.data).is_absolute() and "data" not in explicit:
            args.data = str(out / args.data)
    check_update_mode(args, explicit)
    check_plain(args)
    check_grad_accum(args, world, explicit, new_run=not (run is not None and args.resume))
    device = world.device(resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    args.dtype = str(dtype).removeprefix("torch.")
    own_export = run is not None and args.export and \
        run.get("settings", {}).get("export") == str(pathlib.Path(args.export).resolve())
    if args.export and not own_export:
        check_export_dir(pathlib.Path(args.export))
    return SimpleNamespace(args=args, out=out, run=run, explicit=explicit, device=device,
                           dtype=dtype, inherit_model=inherit_model, start=0, resume_from=None,
                           world=world)


def _data_source(args) -> tuple[list, str]:
    from .. import data as D

    if args.data:
        records = D.load_records(args.data)
        return records, f"file:{pathlib.Path(args.data).name}:sha256:" \
                        f"{_sha256(pathlib.Path(args.data))}"
    records = D.stdlib_records()
    return records, f"stdlib:python-{platform.python_version()}:{len(records)}-functions"


def _model_source(job) -> tuple:
    """(model config or None, base model path or None, model id or None: known once loaded)."""
    args, run = job.args, job.run
    if job.inherit_model:
        path = R.base_path(run, job.out)
        if not path.exists():
            raise FalqonError(f"the run's base model {path} does not exist: pass --model with "
                              f"its new location")
        check_model_dir(path)
        return None, path, run["options"]["model"]
    if args.model:
        path = pathlib.Path(args.model)
        check_model_dir(path)
        return None, path, None
    config = load_model_config(args.model_config)
    spec = args.model_config or DEFAULT_PRESET
    model_id = f"config:{spec}" if spec in PRESETS else \
        f"config:{pathlib.Path(spec).name}:sha256:{_sha256(pathlib.Path(spec))}"
    if run is not None and run["options"]["model"] == model_id:  # its weights were saved
        return None, R.base_path(run, job.out), model_id
    return config, None, model_id


def _resolve_inputs(job) -> None:
    """The data, the model's source, the defaults that depend on them; a run's options
    compared (the model's, for a model directory, once its weights are read)."""
    args = job.args
    job.records, data_id = _data_source(args)
    job.config, job.model_path, job.model_id = _model_source(job)
    if args.lr is None:  # see --lr's help
        source = "config" if (job.model_id or "").startswith("config:") else "model"
        args.lr = DEFAULT_LR[(args.update_mode, source)]
    if args.lr_warmup_steps is None:
        args.lr_warmup_steps = args.steps // 20
    if args.eval_size is None:
        args.eval_size = min(64, len(job.records) // 20)
    job.data_id = data_id
    if job.run is not None:
        opts = run_options(args, job.model_id, data_id)
        compare_run(job.run, opts, job.out, bool(args.resume),
                    skip=() if job.model_id else ("model",))
        _find_checkpoint(job)


def _find_checkpoint(job) -> None:
    """The checkpoint a run continues from (none: its start stopped before the first one, and
    it starts again), size-checked before anything is loaded."""
    from .. import checkpoint as ckpt

    checkpoints = R.list_checkpoints(job.out)
    if job.args.resume not in (None, "latest"):
        job.resume_from = pathlib.Path(job.args.resume)
    elif checkpoints:
        job.resume_from = checkpoints[-1]
    else:
        return
    where = job.resume_from
    if not (where / R.CHECKPOINT_FILE).is_file() and (where / ckpt.TRAINING_FILE).is_file():
        raise FalqonError(f"checkpoint {where} was written by falqon's own training loop, before "
                          f"falqon finetune trained on the Hugging Face Trainer: this falqon "
                          f"cannot resume it (its final/ and checkpoints still export); start the "
                          f"run again in another --output-dir")
    state = ckpt.read_json(where / R.CHECKPOINT_FILE, "falqon finetune checkpoint")
    ckpt.check_files(where, state.get("files", {}))
    ckpt.read_checkpoint_meta(where)
    if state.get("options") != job.run["options"]:
        raise FalqonError(f"checkpoint {where} belongs to another run than {job.out}")
    job.start = int(state["step"])


# ---- the model and the data, before anything is written -----------------------------------------

def _load_model(job):
    args = job.args
    if job.config is not None:
        model, tokenizer = build_random_model(job.config, job.device, job.dtype, args.seed)
        job.fingerprint = weights_fingerprint(model)
    else:  # melded while it loads
        model, tokenizer, job.fingerprint = load_melded_model(
            job.model_path, job.device, job.dtype, args, progress=not args.no_progress)
    if job.model_id is None:  # a model directory: its weights are its identity
        job.model_id = f"weights:{job.fingerprint}"
        if job.run is not None:
            compare_run(job.run, run_options(args, job.model_id, job.data_id), job.out,
                        bool(args.resume))
    if job.run is not None:
        R.check_fingerprint(job.run, job.fingerprint, job.model_path)
    return model, tokenizer


def _prepare_model(job) -> None:
    """The base model loaded and melded (a new run, or one whose start stopped early) or
    loaded from its checkpoint."""
    from .. import checkpoint as ckpt
    from ..convert import melded_layers, melded_summary
    from ..training import proxy_state

    args = job.args
    model, job.tokenizer = _load_model(job)
    if job.resume_from is not None:  # the Trainer restores the rest (optimizer, RNG, data)
        model = ckpt.from_pretrained(model, job.resume_from)
        job.counters = proxy_state(model).to_dict()  # FalqonCallback would take global_step
        if args.stop_after is not None and job.start >= args.stop_after and \
                job.start < args.steps:
            raise FalqonError(f"--stop-after {args.stop_after}: the run is at step {job.start} "
                              f"already")
        print(f"falqon: resuming {job.out} at step {job.start} from {job.resume_from}")
        print(melded_summary(model))
    else:
        where = job.model_path or f"the model built from {job.model_id.split(':')[1]}"
        if not melded_layers(model):
            meld_for_run(model, args, where, progress=not args.no_progress)
    _fuse(model, args.fuse)
    job.model = model


def _fuse(model, backend: str) -> None:
    """--fuse: fused kernels on the model (compiled lazily, at the first step); the line is
    printed unless auto chose nothing on the CPU (on a GPU its reasons are worth reading)."""
    from ..fusion import fuse, model_device

    report = fuse(model, backend)
    if report.backend != "off" or backend != "auto" or model_device(model).type == "cuda":
        print(report)
    if report.backend == "compile":  # a long first step otherwise looks like a hang
        print("  (the decoder layers compile at the first step: ~30 s for a 7B model on an H200 "
              "machine)")


def _prepare_data(job) -> None:
    from .. import data as D

    args, tokenizer = job.args, job.tokenizer
    job.template = args.template
    if job.template == "auto":
        job.template = "short" if D.is_byte_tokenizer(tokenizer) else "alpaca"
    examples = D.encode_dataset(job.records, tokenizer, args.seq_len, job.template,
                                progress=not args.no_progress)
    train, job.held_out = D.split(examples, args.eval_size, args.seed)
    job.eval_size = len(job.held_out)
    # The whole run's data order as one stream, which the Trainer reads in sequence (see
    # trainer_loop.py).
    order = D.BatchOrder(len(train), args.batch_size * args.grad_accum, args.seed)
    job.train = train.select(order.stream(args.steps))
    job.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id


# ---- the start: base-model/ and run.json --------------------------------------------------------

def _save_random_base(job) -> str:
    """The random base weights in base-model/ (built again from --seed: the melded model no
    longer holds them), by rename."""
    tmp = R.fresh_partial(job.out / R.BASE_DIR)
    model, tokenizer = build_random_model(job.config, job.device, job.dtype, job.args.seed)
    if weights_fingerprint(model) != job.fingerprint:
        raise FalqonError("building the random weights again from --seed gave other weights on "
                          "this device: pass --model with a saved model instead")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    R.replace_dir(tmp, job.out / R.BASE_DIR)
    return R.BASE_DIR


def _write_start(job) -> None:
    args, out, run = job.args, job.out, job.run
    if run is None:
        R.clear_start_leftovers(out)
        base = _save_random_base(job) if job.config is not None else \
            R.base_entry(job.model_path, out)
        run = {"format": R.RUN_FORMAT, "version": R.RUN_VERSION, "id": uuid.uuid4().hex[:12],
               "options": run_options(args, job.model_id, job.data_id), "base_model": base,
               "base_fingerprint": job.fingerprint,
               "model_path": args.model and str(pathlib.Path(args.model).resolve()),
               "model_config": args.model_config,
               "data_path": args.data and R.base_entry(pathlib.Path(args.data), out),
               "template": job.template, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    elif not job.inherit_model and job.config is None and "version" in run:
        run["base_model"] = R.base_entry(job.model_path, out)  # a moved model, found again
    run.setdefault("id", uuid.uuid4().hex[:12])
    run["settings"] = run_settings(args)
    R.write_run(out, run)
    return run


# ---- training -----------------------------------------------------------------------------------

def _open_metrics(job) -> None:
    from .reporting import Reporter

    # A run that starts (again) at step 0 logs from scratch; a resumed one drops what a stopped
    # run logged after its checkpoint.
    job.rows = R.read_metrics(job.out, job.start if job.start else -1)
    job.metrics = open(job.out / R.METRICS_FILE, "w")
    job.metrics.writelines(json.dumps(r) + "\n" for r in job.rows)
    job.metrics.flush()
    job.reporter = Reporter(job.args.report_to, job.out, job.run)


def _train(job) -> None:
    """The Trainer's steps from job.start to job.stop (a --resume: from its checkpoint)."""
    from ..training import enable_gradient_checkpointing
    from .trainer_loop import build_trainer

    args = job.args
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(job.model)
    job.model.train()
    if job.world.leader:
        _open_metrics(job)
    job.stop = min(args.steps, args.stop_after or args.steps)
    job.trainer = build_trainer(job)
    job.elapsed, job.tokens = 0.0, 0
    if job.start < job.stop:
        import gc

        # The Trainer starts with gc.collect() (accelerate's free_memory); what exists now lives
        # as long as the run: kept out of that collection (seconds in a large process).
        gc.freeze()
        try:
            job.trainer.train(resume_from_checkpoint=job.resume_from and str(job.resume_from))
        finally:
            gc.unfreeze()
    job.trainer.state.global_step = job.stop


# ---- the end: final eval, plot, final/, export --------------------------------------------------

def _summary(job) -> str:
    losses = [r["loss"] for r in job.rows if "loss" in r]
    evals = [r["eval_loss"] for r in job.rows if "eval_loss" in r]
    report = [f"falqon: steps {job.start}->{job.stop} in {job.elapsed:.1f}s "
              f"({job.tokens / max(job.elapsed, 1e-9):,.0f} tokens/s on {job.device.type})",
              f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}"]
    if len(evals) >= 2:
        report.append(f"eval loss {evals[0]:.3f} -> {evals[-1]:.3f}")
    return "; ".join(report)


def _plot(job) -> bool:
    from .reporting import plot_losses

    args = job.args
    mode = mode_label(args.update_mode, args.train_a, args.topk)
    return not args.no_plot and plot_losses(
        job.rows, job.out / R.PLOT_FILE,
        f"FALQON {job.model_id.split(':')[1]}: rank {args.rank}, {mode}, lr {args.lr:g}")


def _save_final(job) -> None:
    from .. import checkpoint as ckpt

    tmp = R.fresh_partial(job.out / R.FINAL_DIR)
    ckpt.save_pretrained(job.model, tmp)
    job.tokenizer.save_pretrained(tmp)
    R.replace_dir(tmp, job.out / R.FINAL_DIR)


def _export(job) -> None:
    from .export import export_and_report

    path = pathlib.Path(job.args.export)
    tmp = R.fresh_partial(path)
    export_and_report(job.model, tmp, job.tokenizer, "tensor", job.args.export_format, shown=path)
    R.replace_dir(tmp, path)


def _finish(job) -> int:
    args, out = job.args, job.out
    ran = job.start < job.stop
    if job.stop == args.steps and not any(r.get("step") == args.steps and "eval_loss" in r
                                          for r in job.rows):
        job.trainer.evaluate()
    job.metrics.close()
    job.reporter.close()
    todo_final = ran or not R.final_is_complete(out)
    todo_export = args.export and job.stop == args.steps and \
        (ran or not pathlib.Path(args.export).exists())
    if not (todo_final or todo_export):
        print(f"falqon: the run in {out} is already complete ({args.steps} steps)")
        return 0
    plotted = _plot(job)
    if ran:
        print(_summary(job))
    if job.stop < args.steps:
        print(f"falqon: stopped after step {job.stop}; continue with: falqon finetune "
              f"--output-dir {out} --resume")
        return 0
    if todo_final:
        _save_final(job)
        print(f"falqon: {'' if ran else 'the run had finished training; its '}model saved to "
              f"{out / R.FINAL_DIR}" + (f", loss plot {out / R.PLOT_FILE}" if plotted else ""))
    if todo_export:
        _export(job)
    return 0
