"""The accuracy study: pretrain a LLaMA-architecture model once, then fine-tune it on GSM8K and
GPTeacher role-play with every method at the same steps, batch and rank and a per-family learning
rate picked by a pilot, and compare held-out losses.

Issue 12's comparison (falqon_adapter vs lora_bf16; `--methods issue12` names its five methods) in
two calls of under 9.5 minutes on one H100/H200 (studies/README.md gives the time estimates):
    python -m studies.accuracy --stages pretrain,pilot --methods issue12 --lr falqon=0.9
    python -m studies.accuracy --stages gsm8k,roleplay,report --methods issue12 --lr falqon=0.9
and anywhere, on a CPU, from the JSONs that came back:
    python -m studies.accuracy --stages report --merge a.json b.json ...

Stages run in the order given, each within its time budget (--budget STAGE=SECONDS); a run that
would not fit in what is left of its stage is recorded as skipped with the reason. State lives in
--run-dir (runs/study, gitignored): the checkpoint, the tokenizer and state.json (every record so
far), so a later call on the same machine continues. Results go to $OUT when set (files that come
back from the GPU machine), else benchmarks/results/. See studies/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import shlex
import sys

import torch

from . import data as D
from . import report as R
from .methods import (DEFAULT_METHODS, FAMILIES, LR_GRIDS, METHOD_SETS, METHODS, RunSettings,
                      lr_neighbour,
                      resolve_methods, skip_reason)
from .train import PRESETS, PretrainSettings, TaskData, finetune, load_pretrained, log, pretrain

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA_DIR = pathlib.Path(os.environ.get("FALQON_DATA_DIR", REPO.parent / "shared" / "data"))
TASK_FILES = {"gsm8k": "gsm8k_train.json", "roleplay": "gpteacher_roleplay.json"}
STAGES = ("pretrain", "pilot", "gsm8k", "roleplay", "report")
# Seconds per stage, whole stage included (corpus, model loading, evals), sized for issue 12's five
# methods (--methods issue12): the lora and falqon_adapter pilots on both tasks (~9 s a run on an
# H200, 4-6 runs per family and task) take ~200 s, so the study needs three calls of under 9.5
# minutes (studies/run_gpu.sh). The whole study (every method, every pilot) needs more still.
DEFAULT_BUDGETS = {"pretrain": 300, "pilot": 300, "gsm8k": 200, "roleplay": 230, "report": 60}
PILOT_EXTENSIONS = 2  # grid points added past an edge that wins


def doc_destination(args) -> pathlib.Path:
    """Where the filled write-up goes: --doc-out, else --doc itself when the results go to the
    repo's benchmarks/results, else accuracy.md beside the results ($OUT on the GPU machine, a
    scratch --out for a smoke run)."""
    if args.doc_out:
        return pathlib.Path(args.doc_out)
    out = pathlib.Path(args.out)
    return pathlib.Path(args.doc) if out.resolve() == RESULTS.resolve() else out / "accuracy.md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    _add_study_args(p)
    _add_pretrain_args(p)
    _add_finetune_args(p)
    args = p.parse_args(argv)
    _resolve_args(p, args, argv)
    return args


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", default="pretrain,pilot,gsm8k,roleplay,report",
                   help=f"comma-separated, from {','.join(STAGES)}")
    p.add_argument("--budget", default="", help="STAGE=SECONDS,... (defaults: " +
                   ",".join(f"{k}={v}" for k, v in DEFAULT_BUDGETS.items()) + ")")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    p.add_argument("--run-dir", default=str(REPO / "runs" / "study"))
    p.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS),
                   help="results, plots and log ($OUT when set)")
    p.add_argument("--doc", default=str(REPO / "docs" / "accuracy.md"),
                   help="write-up template whose marker sections are filled")
    p.add_argument("--doc-out", default=None,
                   help="where the filled write-up goes (default: --doc itself when the results "
                        "go to benchmarks/results, else accuracy.md beside them, so that a run "
                        "elsewhere leaves the committed write-up alone)")
    p.add_argument("--merge", nargs="*", default=[],
                   help="results JSONs of earlier calls to merge before the stages run")
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 avoids spin-waiting on a shared CPU)")


def _add_pretrain_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pretraining")
    g.add_argument("--preset", choices=sorted(PRESETS), default="base")
    g.add_argument("--seq", type=int, default=512)
    g.add_argument("--pretrain-batch", type=int, default=32)
    g.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    g.add_argument("--pretrain-max-steps", type=int, default=None,
                   help="a step count instead of the time budget (tests)")
    g.add_argument("--corpus-mb", type=float, default=160)
    g.add_argument("--eval-mb", type=float, default=2)
    g.add_argument("--eval-permille", type=int, default=10,
                   help="files held out for the pretraining eval, per thousand (by path hash)")
    g.add_argument("--tokenizer-sample-mb", type=float, default=24)
    g.add_argument("--corpus-root", action="append", default=[],
                   help="folder of .py/.md/.rst/.txt files (default: site-packages + stdlib)")
    g.add_argument("--compile", choices=("off", "on", "auto"), default="auto",
                   help="torch.compile for pretraining; auto times both and keeps the faster")


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods, in run order, or a set: " +
                        "; ".join(f"{k} = {','.join(v)}" for k, v in METHOD_SETS.items()
                                  if k != "all") + " (default: all, priority order)")
    g.add_argument("--steps", type=int, default=200)
    g.add_argument("--pilot-steps", type=int, default=None,
                   help="steps of each pilot run (default: --steps; a shorter pilot decays its "
                        "learning rate sooner and picked rates that spiked in the full-length "
                        "run: benchmarks/NOTES.md, run 68)")
    g.add_argument("--pilot-task", choices=["each", *sorted(TASK_FILES)], default="each",
                   help="the task the learning rates are tuned on: each (default) tunes every "
                        "family on each fine-tuning task's own training split, for that task")
    g.add_argument("--batch", type=int, default=16)
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    g.add_argument("--eval-points", type=int, default=4, help="held-out evals per run")
    g.add_argument("--extra-seeds", default="",
                   help="comma-separated fine-tuning seeds run after each task's runs, for "
                        "every method at the same learning rate (data order, initialisation, "
                        "the meld's sketch; the held-out split stays --seed's): records of kind "
                        "accuracy_seed, reported as the seed spread")
    g.add_argument("--mass-every", type=int, default=10,
                   help="measure falqon's update mass every N optimizer steps")
    g.add_argument("--lr", action="append", default=[],
                   help="FAMILY=LR[,FAMILY=LR...], repeatable, overrides the pilot (families: " +
                        ", ".join(FAMILIES) + ")")
    g.add_argument("--skip-done", action="store_true",
                   help="keep runs already recorded with a value at the same lr and steps (e.g. "
                        "to finish a stage that ran out of time, in a later call)")
    g.add_argument("--max-train", type=int, default=None, help="cap training examples (tests)")
    g.add_argument("--max-eval", type=int, default=None, help="cap held-out examples (tests)")
    g.add_argument("--pilot-val", type=int, default=256,
                   help="validation examples of the pilot (from the training split)")


def _resolve_args(p: argparse.ArgumentParser, args, argv) -> None:
    """Check the options and fill in what the stages read: stage list, budgets, seeds, learning
    rate overrides, methods."""
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.stage_list = [s for s in args.stages.split(",") if s]
    args.pilot_steps = args.steps if args.pilot_steps is None else args.pilot_steps
    if args.steps < 1 or args.pilot_steps < 1:
        p.error("--steps and --pilot-steps must be >= 1")
    bad = [s for s in args.stage_list if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
    args.budgets = dict(DEFAULT_BUDGETS)
    for item in filter(None, args.budget.split(",")):
        stage, _, secs = item.partition("=")
        if stage not in STAGES or not secs:
            p.error(f"--budget takes STAGE=SECONDS, got {item!r}")
        args.budgets[stage] = float(secs)
    try:
        args.extra_seed_list = [int(x) for x in args.extra_seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--extra-seeds takes comma-separated integers, got {args.extra_seeds!r}")
    if args.seed in args.extra_seed_list:
        p.error(f"--extra-seeds: {args.seed} is --seed, whose runs are the main ones")
    args.lr_overrides = {}
    for item in (i for arg in args.lr for i in arg.split(",") if i.strip()):
        fam, _, value = item.strip().partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = math.nan
        if fam not in FAMILIES or not (math.isfinite(lr) and lr > 0):
            p.error(f"--lr takes FAMILY=LR with a family of {', '.join(FAMILIES)} and a positive "
                    f"number, got {item!r}")
        args.lr_overrides[fam] = lr
    try:
        args.method_list = resolve_methods([m for m in args.methods.split(",") if m])
    except ValueError as exc:
        p.error(str(exc))


def _run_notes(record: dict) -> str:
    """The log's extras for a run: a proxy run's update mass, an adapter run's merged losses."""
    notes = ""
    if record.get("update_mass_fraction") is not None:
        notes += f", update mass reaching W {100 * record['update_mass_fraction']:.1f}%"
    for precision in ("fp8", "bf16"):
        value = record.get(f"eval_loss_merged_{precision}")
        if value is not None:
            notes += f", merged into {precision} {value:.4f}"
    if record.get("merged_eval_skipped"):
        notes += f", no merged eval: {record['merged_eval_skipped']}"
    return notes


def bracketed_by(grid: list[float], results: dict, lr: float) -> tuple[float, float] | None:
    """(a, b): the two highest rates of `grid` below `lr` that ran, where b's loss rose over a's
    (a diverged or failed run counts as infinite loss): the best rate is at or below a, so `lr`
    need not run. None where the loss has not risen yet."""
    ran = [x for x in grid if x < lr and x in results and not math.isnan(results[x])]
    if len(ran) >= 2 and results[ran[-1]] > results[ran[-2]]:
        return ran[-2], ran[-1]
    return None


class Budget:
    """Seconds left in a stage, and whether a run of a given method is likely to fit."""

    def __init__(self, seconds: float):
        self.seconds, self.clock = seconds, D.Stopwatch()
        self.walls: dict[str, float] = {}  # method -> wall seconds per step of its last run

    def left(self) -> float:
        return self.seconds - self.clock()

    def note(self, method: str, wall_s: float, steps: int) -> None:
        self.walls[method] = wall_s / steps

    def estimate(self, method: str, steps: int) -> float | None:
        kind = METHODS[method].kind
        same = self.walls.get(method) or next(
            (v for m, v in self.walls.items() if METHODS[m].kind == kind), None)
        per_step = same or (max(self.walls.values()) if self.walls else None)
        return None if per_step is None else per_step * steps

    def fits(self, method: str, steps: int) -> str | None:
        est = self.estimate(method, steps)
        if self.left() <= 0 or (est is not None and est > self.left()):
            return (f"stage time budget: {self.left():.0f} s left of {self.seconds:.0f} s, the run "
                    f"needs ~{est or 0:.0f} s")
        return None


class Study:
    def __init__(self, args):
        self.args = args
        self.run_dir = pathlib.Path(args.run_dir)
        self.ckpt = self.run_dir / "pretrained"
        self.out = pathlib.Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logfile = self.out / "study.log"
        if args.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.state_path = self.run_dir / "state.json"
        self.state = {"records": [], "curves": {}}
        if args.merge:
            # The given results are the whole story (a local report, or a recycled GPU machine
            # resuming from the files that came back): this run dir's state is not mixed in.
            docs = [json.loads(pathlib.Path(p).read_text()) for p in args.merge]
            doc = R.merge(docs)
            self.state = {"records": doc["records"], "curves": doc["curves"],
                          "env": {k: doc.get(k) for k in ("device", "torch", "date")},
                          "settings": doc.get("settings"),
                          "commands": [c for d in docs for c in
                                       filter(None, d.get("command", "").split(" && "))]}
            if doc.get("warning"):
                log(f"merge: {doc['warning']}")
        elif self.state_path.is_file():
            self.state = json.loads(self.state_path.read_text())
        self.doc_out = doc_destination(args)

    # ---- bookkeeping ----------------------------------------------------------------------------

    def log(self, msg):
        log(msg, self.logfile)

    def add(self, record: dict, curve: dict | None = None, curve_key: str | None = None):
        R.upsert(self.state["records"], record)
        if curve is not None:
            self.state["curves"][curve_key] = curve
        self.save(plots=False)

    def environment(self) -> dict:
        return {"device": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                           else "cpu"), "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")}

    def run_settings(self) -> dict:
        a = self.args
        return {"preset": a.preset, "seq": a.seq, "steps": a.steps, "pilot_steps": a.pilot_steps,
                "pilot_task": a.pilot_task, "batch": a.batch, "rank": a.rank,
                "alpha": self.alpha, "eval_fraction": 0.1, "seed": a.seed,
                "mass_every": a.mass_every, "lr_grids": LR_GRIDS, "budgets": a.budgets}

    def document(self) -> dict:
        """The results document. Device, torch, date and settings are those of the runs (a
        report-only invocation keeps the ones recorded with the results)."""
        return {**(self.state.get("env") or self.environment()),
                "command": " && ".join(dict.fromkeys(self.state.get("commands", []))),
                "settings": self.state.get("settings") or self.run_settings(),
                "records": self.state["records"], "curves": self.state["curves"]}

    def save(self, plots: bool = True) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps(self.state))
        written = R.write_outputs(self.document(), self.out, pathlib.Path(self.args.doc),
                                  self.doc_out, plots=plots)
        if plots:
            self.log("wrote " + ", ".join(str(p) for p in written))

    @property
    def alpha(self) -> float:
        return float(self.args.alpha if self.args.alpha is not None else self.args.rank)

    def settings(self, steps: int, seed: int | None = None) -> RunSettings:
        return RunSettings(rank=self.args.rank, alpha=self.alpha, dtype=self.dtype,
                           falqon_warmup_steps=max(1, steps // 10),
                           mass_every=self.args.mass_every,
                           seed=self.args.seed if seed is None else seed)

    # ---- stages ---------------------------------------------------------------------------------

    def stage_pretrain(self, budget: Budget):
        a = self.args
        # pretrain() trains for what is left of the stage once its corpus and tokenizer are
        # ready, less a reserve for the held-out eval and the save.
        s = PretrainSettings(preset=a.preset, seq=a.seq, batch=a.pretrain_batch,
                             lr=a.pretrain_lr, budget_s=budget.left(),
                             max_steps=a.pretrain_max_steps, corpus_mb=a.corpus_mb, eval_mb=a.eval_mb,
                             tokenizer_sample_mb=a.tokenizer_sample_mb,
                             compile=a.compile if self.device.type == "cuda" else "off",
                             roots=a.corpus_root, eval_permille=a.eval_permille,
                             seed=a.seed)
        record = pretrain(s, self.ckpt, self.device, self.dtype, self.logfile)
        _, curve, _ = load_pretrained(self.ckpt)
        self.add(record, curve, "pretrain")

    def task_data(self, task: str, tok, pilot: bool) -> TaskData:
        a = self.args
        records = D.load_alpaca(pathlib.Path(a.data_dir) / TASK_FILES[task])
        train, held = D.split_records(records, 0.1, a.seed)
        if pilot:  # the pilot never sees the held-out 10%: it validates on part of train
            train, held = D.split_records(train, 0.1, a.seed + 1)
            held = held[:a.pilot_val]
        if a.max_train:
            train = train[:a.max_train]
        if a.max_eval:
            held = held[:a.max_eval]
        return TaskData(task, D.encode_examples(tok, train, a.seq),
                        D.encode_examples(tok, held, a.seq), tok.pad)

    def skip(self, method, task: TaskData, lr: float, steps: int, reason: str,
             kind: str = "accuracy", extra: dict | None = None) -> dict:
        """Record a run that was not made, with the reason."""
        record = {"kind": kind, "task": task.name, "method": method.name,
                  "metric": "val_loss" if kind == "pilot" else "eval_loss",
                  "value": None, "lr": lr, "steps": steps, "skipped": reason, **(extra or {})}
        self.log(f"{kind} {task.name}/{method.name} lr {lr:g}: skipped: {reason}")
        self.add(record)
        return record

    def run(self, method, task: TaskData, lr: float, steps: int, budget: Budget,
            kind: str = "accuracy", extra: dict | None = None) -> dict:
        if self.args.skip_done:
            done = [r for r in self.state["records"] if r.get("kind") == kind
                    and r.get("task") == task.name and r.get("method") == method.name
                    and r.get("lr") == lr and r.get("steps") == steps
                    and r.get("finetune_seed") == (extra or {}).get("finetune_seed")
                    and r.get("value") is not None]
            if done:
                self.log(f"{kind} {task.name}/{method.name} lr {lr:g}: already done "
                         f"({done[0]['value']:.4f})")
                return done[0]
        reason = skip_reason(method, self.device) or budget.fits(method.name, steps)
        if reason:
            return self.skip(method, task, lr, steps, reason, kind, extra)
        self.log(f"{kind} {task.name}/{method.name} lr {lr:g}: {steps} steps ...")
        record, curve = finetune(method, task, str(self.ckpt), self.device, lr, steps,
                                 self.args.batch,
                                 self.settings(steps, (extra or {}).get("finetune_seed")),
                                 1 if kind == "pilot" else self.args.eval_points, self.logfile,
                                 merged_evals=kind == "accuracy")
        record.update({"kind": kind, "fingerprint": self.fingerprint,
                       "eval_examples": len(task.eval), **(extra or {})})
        if kind == "pilot":
            record["metric"] = "val_loss"
        budget.note(method.name, record["wall_s"], steps)
        self.log(f"{kind} {task.name}/{method.name} lr {lr:g}: "
                 f"{record.get('value') if record.get('value') is not None else record.get('error', 'diverged')}"
                 f" ({record['wall_s']:.1f} s{_run_notes(record)})")
        self.add(record, curve if kind == "accuracy" else None, f"{task.name}/{method.name}")
        return record

    def pilot_tasks(self) -> list[str]:
        a = self.args
        return sorted(TASK_FILES) if a.pilot_task == "each" else [a.pilot_task]

    def stage_pilot(self, budget: Budget):
        a = self.args
        record, _, tok = load_pretrained(self.ckpt)
        self.fingerprint = record["fingerprint"]
        families = [f for f in dict.fromkeys(m.family for m in a.method_list)
                    if f not in a.lr_overrides]
        for task_name in self.pilot_tasks():
            task = self.task_data(task_name, tok, pilot=True)
            for fam in families:
                results, grid, cut = self.pilot_grid(fam, task, budget)
                self.choose_lr(fam, task_name, results, grid, cut)

    def pilot_grid(self, fam: str, task: TaskData, budget: Budget):
        """Run the family's pilot over its grid on `task`, from the lowest rate up, extending it by
        a 1-2-5 neighbour while an edge wins (PILOT_EXTENSIONS at most), and skipping the rates
        above one whose loss rose over the rate below it (the best is bracketed; recorded as
        skipped): ({lr: validation loss, NaN where bracketed}, the grid, whether the stage's budget
        cut it)."""
        method = METHODS[FAMILIES[fam]]
        grid = list(LR_GRIDS[fam])
        results: dict[float, float] = {}
        for _ in range(PILOT_EXTENSIONS + 1):
            for lr in grid:
                if lr in results:
                    continue
                rose = bracketed_by(grid, results, lr)
                if rose:
                    self.skip(method, task, lr, self.args.pilot_steps,
                              f"bracketed: {rose[1]:g} did worse than {rose[0]:g}", kind="pilot",
                              extra={"family": fam})
                    results[lr] = float("nan")
                    continue
                r = self.run(method, task, lr, self.args.pilot_steps, budget, kind="pilot",
                             extra={"family": fam})
                results[lr] = r["value"] if r.get("value") is not None else float("inf")
                if r.get("skipped") and "budget" in r["skipped"]:
                    return results, grid, True
            best = min((lr for lr in grid if not math.isnan(results[lr])),
                       key=lambda lr: results[lr])
            if results[best] == float("inf") or best not in (grid[0], grid[-1]):
                break
            if best == grid[-1]:
                grid.append(lr_neighbour(best, up=True))
            else:
                grid.insert(0, lr_neighbour(best, up=False))
        return results, grid, False

    def choose_lr(self, fam: str, task_name: str, results: dict, grid: list, cut: bool) -> None:
        finite = {lr: v for lr, v in results.items() if v < float("inf")}  # (NaN: bracketed)
        bracketed = sum(math.isnan(v) for v in results.values())
        if finite:
            best = min(finite, key=finite.get)
            source = (f"pilot on {task_name}, {self.args.pilot_steps} steps, {len(finite)} lrs"
                      + (f" of {len(grid)} (budget)" if cut else "")
                      + (f", {bracketed} above the best skipped (bracketed)" if bracketed else ""))
        else:
            best = LR_GRIDS[fam][len(LR_GRIDS[fam]) // 2]
            source = "grid middle: no pilot run finished"
        self.add({"kind": "lr_choice", "family": fam, "task": task_name,
                  "method": METHODS[FAMILIES[fam]].name, "lr": best, "source": source})
        self.log(f"pilot: {task_name}/{fam} -> lr {best:g} ({source})")

    def learning_rates(self, task_name: str) -> dict:
        """Each family's learning rate for `task_name`: --lr, else the pilot's on that task,
        else (a pilot of one task, --pilot-task TASK) the pilot's on its task."""
        choices = [r for r in self.state["records"] if r.get("kind") == "lr_choice"]
        lrs = {r["family"]: r["lr"] for r in choices if r.get("task", "gsm8k") != task_name}
        lrs.update({r["family"]: r["lr"] for r in choices if r.get("task", "gsm8k") == task_name})
        lrs.update(self.args.lr_overrides)
        missing = sorted({m.family for m in self.args.method_list} - set(lrs))
        if missing:
            raise SystemExit(f"no learning rate for the method families {missing}: run the pilot "
                             f"stage first (--stages pilot,...) on this machine, or pass "
                             f"--lr FAMILY=LR for each")
        return lrs

    def stage_task(self, task_name: str, budget: Budget):
        record, _, tok = load_pretrained(self.ckpt)
        self.fingerprint = record["fingerprint"]
        lrs = self.learning_rates(task_name)
        task = self.task_data(task_name, tok, pilot=False)
        self.log(f"{task_name}: {len(task.train)} training / {len(task.eval)} held-out examples")
        for method in self.args.method_list:
            self.run(method, task, lrs[method.family], self.args.steps, budget)
        for seed in self.args.extra_seed_list:  # the seed spread, after every main run
            for method in self.args.method_list:
                self.run(method, task, lrs[method.family], self.args.steps, budget,
                         kind="accuracy_seed", extra={"finetune_seed": seed})

    def main(self):
        self.fingerprint = None
        if any(s != "report" for s in self.args.stage_list):
            self.state["env"] = self.environment()
            self.state["settings"] = self.run_settings()
            self.state.setdefault("commands", []).append(" ".join(
                shlex.quote(x) for x in ["python", "-m", "studies.accuracy", *self.args.argv]))
        for stage in self.args.stage_list:
            budget = Budget(self.args.budgets[stage])
            self.log(f"== stage {stage} (budget {budget.seconds:.0f} s) on {self.device}")
            if stage == "pretrain":
                self.stage_pretrain(budget)
            elif stage == "pilot":
                self.stage_pilot(budget)
            elif stage in TASK_FILES:
                self.stage_task(stage, budget)
            self.save(plots=True)
            self.log(f"== stage {stage} done in {budget.clock():.0f} s")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would fill the log
    Study(args).main()


if __name__ == "__main__":
    main()
