"""`falqon finetune`'s training loop: the Hugging Face Trainer with falqon.FalqonCallback.

The Trainer runs the steps (gradient accumulation, clipping, AdamW, the warm-up and cosine or
constant schedule, logging, evaluation every --eval-every steps, saving every --save-every steps,
DDP under torchrun) and its resume_from_checkpoint restores the optimizer, the scheduler, the RNG
states and the data position. What falqon adds:

  the data order  the training set in a fresh seeded permutation every epoch, read
                  batch_size x grad_accum examples a step (data.BatchOrder), handed to the Trainer
                  as one sequential stream: a step may straddle two epochs, every micro-batch is
                  full, and a step's micro-batches are the same on any number of processes (each
                  takes every world-th one), so a run is the same run on 1 or N processes;
  checkpoints     the Trainer writes checkpoint-N into checkpoints/.partial/, rank 0 then adds
                  falqon_run_checkpoint.json (the step, the run's options and the byte size of
                  every file) and renames it to checkpoints/step-N: a kill at any moment leaves
                  the previous checkpoints whole (the Trainer's own save is not atomic);
  the model       loaded by falqon.from_pretrained before the Trainer starts (its checks: the
                  base weights, the shapes, the file sizes), not by the Trainer;
  the eval loss   the mean over every labelled token of the held-out set, on rank 0 alone, with a
                  progress bar;
  metrics         metrics.jsonl, --report-to and the progress bar from the Trainer's logs.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import time

import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import run_dir as R

CHECKPOINT_FORMAT = "falqon-run-checkpoint"
# TrainingArguments(include_num_input_tokens_seen="non_padding") came with transformers 4.57.
MIN_TRANSFORMERS = (4, 57)


def check_transformers(version: str | None = None) -> None:
    """A one-line error where the installed transformers (or `version`) is older than the loop
    needs."""
    from ..config import FalqonError

    version = transformers.__version__ if version is None else version
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise FalqonError(f"falqon finetune needs transformers >= {need} (its Trainer), found "
                          f"{version}: pip install -U 'transformers>={need}'")


def training_arguments(job) -> TrainingArguments:
    args, world = job.args, job.world
    evals = bool(job.eval_size)
    cosine = args.schedule == "cosine"
    return TrainingArguments(
        output_dir=str(job.out / R.CHECKPOINTS), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum // world.size,
        learning_rate=args.lr, weight_decay=args.weight_decay, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=args.max_grad_norm,
        lr_scheduler_type="cosine_with_min_lr" if cosine else "constant_with_warmup",
        lr_scheduler_kwargs={"min_lr_rate": 0.1} if cosine else {},
        warmup_steps=args.lr_warmup_steps,
        logging_strategy="steps", logging_steps=1, logging_nan_inf_filter=False,
        eval_strategy="steps" if evals and args.eval_every else "no",
        eval_steps=args.eval_every or None, eval_on_start=evals and job.start == 0,
        save_strategy="steps" if args.save_every else "no", save_steps=args.save_every or 500,
        seed=args.seed, data_seed=args.seed,
        report_to="none", disable_tqdm=True, use_cpu=job.device.type == "cpu",
        dataloader_pin_memory=job.device.type == "cuda", remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", ddp_find_unused_parameters=False,
        average_tokens_across_devices=True)


class FalqonTrainer(Trainer):
    """The Trainer with falqon's atomic, size-checked checkpoints, falqon's model loading and the
    per-token eval loss (the module's doc)."""

    def __init__(self, *args, job, **kwargs):
        super().__init__(*args, **kwargs)
        self.job = job

    def _get_train_sampler(self, *args, **kwargs):
        """In sequence: the training set is the run's data order already (the module's doc)."""
        from torch.utils.data import SequentialSampler

        return SequentialSampler(self.train_dataset)

    def _get_output_dir(self, trial=None) -> str:
        return str(self.job.out / R.CHECKPOINTS / R.PARTIAL_CHECKPOINTS)

    def _save_checkpoint(self, model, trial) -> None:
        world, step = self.job.world, self.state.global_step
        staged = pathlib.Path(self._get_output_dir()) / f"checkpoint-{step}"
        world.on_leader(_clear, staged)
        # Every rank writes its share (rank 0 the model, optimizer, scheduler and state; each
        # rank its RNG state); an error on any rank (a full disk) is raised on every rank.
        world.agree(super()._save_checkpoint, model, trial)
        world.on_leader(_publish, self.job, staged, step)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """Nothing: falqon.from_pretrained loaded the checkpoint's model before training."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict:
        """The held-out loss per labelled token, on rank 0 alone (the model, not its DDP wrapper:
        no collective)."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        from ..training import evaluate

        data = eval_dataset or self.eval_dataset
        if not self.job.world.leader or data is None or not len(data):
            return {}
        loader = DataLoader(data, batch_size=self.args.per_device_eval_batch_size,
                            collate_fn=self.data_collator)
        device = self.job.device
        bar = tqdm(loader, desc=f"falqon eval (step {self.state.global_step})", unit="batch",
                   leave=False, disable=self.job.args.no_progress, dynamic_ncols=True)
        loss = evaluate(self.model, ({k: v.to(device) for k, v in b.items()} for b in bar))
        metrics = {f"{metric_key_prefix}_loss": loss}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control,
                                                         metrics)
        return metrics


def _clear(path: pathlib.Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def _publish(job, staged: pathlib.Path, step: int) -> None:
    """checkpoints/.partial/checkpoint-N, complete: its manifest written last, renamed to
    checkpoints/step-N (an older one of that step replaced by rename too), the oldest beyond
    --keep-checkpoints removed."""
    from ..checkpoint import CONFIG_FILE, MODEL_FILE, atomic_write_text
    from ..training import proxy_state

    own = {CONFIG_FILE, MODEL_FILE}  # falqon_config.json records and checks the model file
    files = {str(p.relative_to(staged)): p.stat().st_size for p in sorted(staged.rglob("*"))
             if p.is_file() and p.name not in own}
    manifest = {"format": CHECKPOINT_FORMAT, "step": step, "options": job.run["options"],
                "proxy": proxy_state(job.model).to_dict(), "files": files}
    atomic_write_text(staged / R.CHECKPOINT_FILE, json.dumps(manifest, indent=1))
    R.replace_dir(staged, job.out / R.CHECKPOINTS / f"step-{step:07d}")
    try:
        staged.parent.rmdir()  # checkpoints/.partial, empty again
    except OSError:
        pass
    for stale in R.list_checkpoints(job.out)[:-job.args.keep_checkpoints]:
        shutil.rmtree(stale)


class RunCallback(TrainerCallback):
    """metrics.jsonl and --report-to (rank 0), the progress bar, and the stop at --stop-after
    with a checkpoint there."""

    def __init__(self, job):
        self.job, self.bar = job, None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        from ..training import proxy_state

        job = self.job
        if getattr(job, "counters", None):
            # The checkpoint's proxy-update counters (a skipped step is not counted), which
            # FalqonCallback, called just before, set to global_step.
            counters = proxy_state(job.model)
            counters.step, counters.skipped_steps = (job.counters["step"],
                                                     job.counters["skipped_steps"])
        self.bar = tqdm(total=job.args.steps, initial=state.global_step, desc="falqon finetune",
                        unit="step", disable=job.args.no_progress, dynamic_ncols=True)
        job.tokens_before, job.began = state.num_input_tokens_seen, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)
        if state.global_step >= self.job.stop:
            control.should_save = control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            row = {"step": state.global_step, "loss": logs["loss"], "lr": logs["learning_rate"]}
        elif "eval_loss" in logs:
            row = {"step": state.global_step, "eval_loss": logs["eval_loss"]}
        else:
            return
        if self.bar is not None:
            self.bar.set_postfix({k.replace("eval_loss", "eval"): f"{v:.3f}"
                                  for k, v in row.items() if k in ("loss", "eval_loss")})
        log_row(self.job, row)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()
        self.job.elapsed = time.perf_counter() - self.job.began
        self.job.tokens = state.num_input_tokens_seen - self.job.tokens_before


def log_row(job, row: dict) -> None:
    if not job.world.leader:
        return
    job.rows.append(row)
    job.metrics.write(json.dumps(row) + "\n")
    job.metrics.flush()
    job.reporter.log(row)


def build_trainer(job) -> FalqonTrainer:
    """The Trainer of the job's melded model and data (under torchrun: rank 0's melded state on
    every rank first, its FP8 tensors kept out of DDP's broadcasts)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .. import data as D
    from ..training import FalqonCallback

    if job.world.size > 1:
        from ..distributed import broadcast_melded, mark_ddp_ignored

        mark_ddp_ignored(job.model)
        broadcast_melded(job.model, src=0)
    transformers.utils.logging.set_verbosity_error()  # the Trainer's notices: falqon prints its own
    trainer = FalqonTrainer(
        model=job.model, args=training_arguments(job), train_dataset=job.train,
        eval_dataset=job.held_out if job.eval_size else None, processing_class=job.tokenizer,
        data_collator=lambda rows: D.collate(rows, job.pad_id),
        callbacks=[FalqonCallback(), RunCallback(job)], job=job)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    return trainer


__all__ = ["CHECKPOINT_FORMAT", "MIN_TRANSFORMERS", "check_transformers", "FalqonTrainer", "RunCallback", "build_trainer", "log_row",
           "training_arguments"]
