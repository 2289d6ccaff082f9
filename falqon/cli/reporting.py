"""What a `falqon finetune` run reports besides metrics.jsonl: the loss plot, TensorBoard or
Weights & Biases (--report-to)."""

from __future__ import annotations

import math
import os
import pathlib

from ..config import FalqonError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


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


def check_reporter(name: str) -> None:
    """Refuse --report-to NAME, before anything is written, where its package is missing."""
    import importlib

    try:
        importlib.import_module(PACKAGES[name])
    except ImportError:
        raise FalqonError(f"--report-to {name} needs the {PACKAGES[name]} package (pip install "
                          f"{PACKAGES[name]})") from None


class Reporter:
    """Sends each metrics row ({"step", "loss", "lr"} or {"step", "eval_loss"}) on."""

    def __init__(self, name: str, out: pathlib.Path, run: dict):
        self.name, self.writer = name, None
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        elif name == "wandb":
            import wandb

            self.writer = wandb.init(project=os.environ.get("WANDB_PROJECT", "falqon"),
                                     name=out.name, id=run["id"], resume="allow",
                                     dir=str(out), config=run["options"])

    def log(self, row: dict) -> None:
        values = {("eval/loss" if k == "eval_loss" else f"train/{k}"): v
                  for k, v in row.items() if k != "step"}
        if self.name == "tensorboard":
            for key, value in values.items():
                self.writer.add_scalar(key, value, row["step"])
        elif self.name == "wandb":
            self.writer.log(values, step=row["step"])

    def close(self) -> None:
        if self.name == "tensorboard":
            self.writer.close()
        elif self.name == "wandb":
            self.writer.finish()
