"""`falqon finetune`: check every option, the data and the model and meld it; only then take the
run directory's lock and write; train with bit-identical resume; finish (final eval, loss plot,
final/ by rename, the export), which a --resume repeats where a kill cut it short. Under torchrun
or accelerate launch every rank trains (DDP) and rank 0 alone writes: see world.py."""

from __future__ import annotations

import json
import pathlib
import platform
import time
import uuid
from types import SimpleNamespace

import torch

from ..config import FalqonError
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
    state = ckpt.read_trainer_state(job.resume_from)
    ckpt.read_checkpoint_meta(job.resume_from)
    if state.get("options") != job.run["options"]:
        raise FalqonError(f"checkpoint {job.resume_from} belongs to another run than {job.out}")


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
    loaded from its checkpoint, with its optimizer."""
    from .. import checkpoint as ckpt
    from ..convert import melded_layers, melded_summary

    args = job.args
    model, job.tokenizer = _load_model(job)

    def make_optimizer(m):
        params = [p for p in m.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999),
                                 weight_decay=args.weight_decay)

    if job.resume_from is not None:
        model, job.optimizer, state = ckpt.load_training_checkpoint(model, make_optimizer,
                                                                    job.resume_from)
        job.start = int(state["step"])
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
        job.optimizer = make_optimizer(model)
    _fuse(model, args.fuse)
    job.model = model


def _fuse(model, backend: str) -> None:
    """--fuse: fused kernels on the model (compiled lazily, at the first step); the line is
    printed unless auto chose nothing (on the CPU)."""
    from ..fusion import fuse

    report = fuse(model, backend)
    if report.backend != "off" or backend != "auto":
        print(report)


def _prepare_data(job) -> None:
    from .. import data as D

    args, tokenizer = job.args, job.tokenizer
    job.template = args.template
    if job.template == "auto":
        job.template = "short" if D.is_byte_tokenizer(tokenizer) else "alpaca"
    examples = D.encode(job.records, tokenizer, args.seq_len, job.template,
                        progress=not args.no_progress)
    job.train, held_out = D.split(examples, args.eval_size, args.seed)
    job.per_step = args.batch_size * args.grad_accum
    job.order = D.BatchOrder(len(job.train), job.per_step, args.seed)
    job.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    job.eval_batches = [_to_device(D.collate(held_out[i:i + args.batch_size], job.pad_id),
                                   job.device)
                        for i in range(0, len(held_out), args.batch_size)]


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


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


def _log(job, row: dict) -> None:
    if not job.world.leader:
        return
    job.rows.append(row)
    job.metrics.write(json.dumps(row) + "\n")
    job.metrics.flush()
    job.reporter.log(row)


def _eval(job, step: int) -> float | None:
    """The held-out loss, on rank 0 alone (the model, not its DDP wrapper: no collective)."""
    from tqdm.auto import tqdm

    from ..training import evaluate

    if not job.eval_batches or not job.world.leader:
        return None
    batches = tqdm(job.eval_batches, desc=f"falqon eval (step {step})", unit="batch",
                   leave=False, disable=job.args.no_progress, dynamic_ncols=True)
    _log(job, {"step": step, "eval_loss": evaluate(job.model, batches)})
    return job.rows[-1]["eval_loss"]


def _step(job, step: int, trainable) -> tuple[float, float, int]:
    """One optimizer step: (loss, lr, tokens seen). Under DDP each rank runs its share of the
    step's micro-batches, its loss scaled by the world size: DDP's mean of the gradients is then
    the one process's sum over all of them."""
    import contextlib

    from .. import data as D
    from ..training import lm_loss_sum, lr_at

    args = job.args
    lr = lr_at(step, args.lr, args.steps, args.lr_warmup_steps, args.schedule)
    for group in job.optimizer.param_groups:
        group["lr"] = lr
    idx = job.order.indices(step)
    micro = [D.collate([job.train[j] for j in idx[i:i + args.batch_size]], job.pad_id)
             for i in range(0, job.per_step, args.batch_size)]
    # Counted on the host before the batches move: no device read-back.
    labelled = max(sum(int((b["labels"][:, 1:] != D.IGNORE_INDEX).sum()) for b in micro), 1)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    world = job.world
    share = len(micro) // world.size
    mine = micro[world.rank * share:(world.rank + 1) * share]
    total = torch.zeros((), device=job.device)
    for i, batch in enumerate(_to_device(b, job.device) for b in mine):
        sync = i == share - 1 or world.size == 1
        with contextlib.nullcontext() if sync else job.net.no_sync():
            loss_sum, _ = lm_loss_sum(job.net, batch)
            # The step's loss is the mean over all its labelled tokens, whichever micro-batch
            # (and rank) holds them.
            (loss_sum * world.size / labelled).backward()
        total += loss_sum.detach()
    world.sum(total)
    if args.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
    job.optimizer.step()  # proxy mode: falqon's hook folds this step's B into the FP8 weights
    job.optimizer.zero_grad(set_to_none=True)
    return float(total) / labelled, lr, tokens


def _save_checkpoint(job, done: int) -> None:
    import shutil

    from .. import checkpoint as ckpt
    from ..training import proxy_state

    epoch, position = job.order.position(done)
    state = {"step": done, "epoch": epoch, "position": position,
             "proxy": proxy_state(job.model).to_dict(), "options": job.run["options"]}
    ckpt.save_training_checkpoint(job.model, job.optimizer,
                                  job.out / R.CHECKPOINTS / f"step-{done:07d}", state)
    for old in R.list_checkpoints(job.out)[:-job.args.keep_checkpoints]:
        shutil.rmtree(old)


def _train(job) -> None:
    from tqdm.auto import tqdm

    from ..training import attach, enable_gradient_checkpointing

    args = job.args
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(job.model)
    handle = attach(job.optimizer, job.model)
    job.net = job.world.wrap(job.model, job.device)
    job.model.train()
    if job.world.leader:
        _open_metrics(job)
    if job.start == 0:
        torch.manual_seed(args.seed)  # dropout, if the model has any; resume restores it
        _eval(job, 0)
    trainable = [p for p in job.model.parameters() if p.requires_grad]
    job.stop = min(args.steps, args.stop_after or args.steps)
    bar = tqdm(total=args.steps, initial=job.start, desc="falqon finetune", unit="step",
               disable=args.no_progress, dynamic_ncols=True)
    began, job.tokens = time.perf_counter(), 0
    for step in range(job.start, job.stop):
        loss, lr, tokens = _step(job, step, trainable)
        job.tokens += tokens
        done = step + 1
        _log(job, {"step": done, "loss": loss, "lr": lr})
        postfix = {"loss": f"{loss:.3f}"}
        if args.eval_every and done % args.eval_every == 0 and done < args.steps and \
                job.eval_batches and job.world.leader:
            postfix["eval"] = f"{_eval(job, done):.3f}"
        bar.set_postfix(postfix)
        bar.update(1)
        if (args.save_every and done % args.save_every == 0) or done == job.stop:
            job.world.on_leader(_save_checkpoint, job, done)
    bar.close()
    handle.remove()
    job.elapsed = time.perf_counter() - began


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
    mode = "adapter mode" if args.update_mode == "adapter" else f"proxy mode, top-k {args.topk}"
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
        _eval(job, args.steps)
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
