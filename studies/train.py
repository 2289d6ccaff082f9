"""Pretraining (time-budgeted) and one fine-tuning run (fixed steps) of the accuracy study."""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import math
import pathlib
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from .methods import Method, RunSettings, build

# Model presets. Hidden and intermediate sizes are multiples of 16 (FP8 GEMMs); the vocab is the
# BPE's. "base": 10 layers x (4 x 768^2 + 3 x 768 x 2048) = 70.8M parameters in the decoder
# layers plus 2 x 8192 x 768 in the embeddings and the head: 83.4M.
PRESETS = {
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                 num_attention_heads=12, vocab=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, vocab=512),
}


def log(msg: str, logfile: pathlib.Path | None = None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if logfile is not None:
        with open(logfile, "a") as f:
            f.write(line + "\n")


def lr_at(step: int, lr: float, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of lr at step `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
               ) -> torch.Tensor:
    """Next-token cross entropy in fp32 over the labelled positions (labels[:, 1:] != -100)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=D.IGNORE, reduction=reduction)


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


# ---- pretraining --------------------------------------------------------------------------------

@dataclass
class PretrainSettings:
    preset: str
    seq: int
    batch: int
    lr: float
    budget_s: float            # seconds for the whole of pretrain(), corpus and save included
    max_steps: int | None      # stop earlier (tests)
    corpus_mb: float
    eval_mb: float
    tokenizer_sample_mb: float
    compile: str               # off | on | auto (time eager and compiled steps, keep the faster)
    roots: list = field(default_factory=list)
    eval_permille: int = 10
    warmup: int = 100
    seed: int = 0
    reserve_s: float = 20.0    # kept for the held-out eval and the save


def checkpoint_fingerprint(ckpt: pathlib.Path) -> str:
    h = hashlib.sha256()
    for p in sorted(ckpt.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class PretrainCorpus:
    """The pretraining text, its BPE and its tokens (train and held out)."""
    corpus: D.Corpus
    tokenizer: D.TextTokenizer
    train_tokens: torch.Tensor
    eval_tokens: torch.Tensor
    read_s: float
    tokenizer_s: float


def tokenised_corpus(s: PretrainSettings, logfile=None) -> PretrainCorpus:
    """Read the local corpus, train the BPE on the first documents of its shuffled order and
    encode both splits."""
    clock = D.Stopwatch()
    roots = [pathlib.Path(r) for r in s.roots] or D.default_roots()
    corpus = D.read_corpus(roots, int(s.corpus_mb * 2**20), int(s.eval_mb * 2**20),
                           s.eval_permille, seed=s.seed)
    read_s = clock()
    log(f"pretrain: corpus {corpus.train_bytes / 2**20:.1f} MiB train + "
        f"{corpus.eval_bytes / 2**20:.1f} MiB held out from {corpus.files_listed} files under "
        f"{len(roots)} roots ({read_s:.1f} s)", logfile)
    sample, n = [], 0
    for text in corpus.train:  # the first documents of the shuffled order
        if n >= s.tokenizer_sample_mb * 2**20:
            break
        sample.append(text)
        n += len(text)
    tok = D.TextTokenizer.train(sample, PRESETS[s.preset]["vocab"])
    train_tokens = torch.from_numpy(D.encode_documents(tok, corpus.train).astype(np.int32))
    eval_tokens = torch.from_numpy(D.encode_documents(tok, corpus.eval).astype(np.int32))
    tok_s = clock() - read_s
    log(f"pretrain: BPE vocab {tok.vocab_size} trained on {n / 2**20:.1f} MiB; corpus "
        f"{train_tokens.numel() / 1e6:.1f}M train / {eval_tokens.numel() / 1e6:.2f}M held-out "
        f"tokens ({corpus.train_bytes / max(train_tokens.numel(), 1):.2f} bytes/token, "
        f"{tok_s:.1f} s)", logfile)
    return PretrainCorpus(corpus, tok, train_tokens, eval_tokens, read_s, tok_s)


def new_model(s: PretrainSettings, tok: D.TextTokenizer, device: torch.device):
    """A freshly initialised LLaMA of the preset's shape (fp32 master weights), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    preset = PRESETS[s.preset]
    torch.manual_seed(s.seed)
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=preset["hidden_size"],
        intermediate_size=preset["intermediate_size"],
        num_hidden_layers=preset["num_hidden_layers"],
        num_attention_heads=preset["num_attention_heads"],
        num_key_value_heads=preset["num_attention_heads"], max_position_embeddings=s.seq,
        bos_token_id=tok.bos, eos_token_id=tok.eos, pad_token_id=tok.pad,
        tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(config).to(device)  # bf16 autocast in the steps


@dataclass
class PretrainRun:
    """What the training loop did: per-step losses, steps, measured speeds, eager or compiled."""
    losses: list
    steps: int
    speeds: dict
    chosen: str
    compile_error: str | None
    tokens_per_s: float
    train_s: float


class _PretrainLoop:
    """The optimizer steps of pretraining, sized to the time budget. Steps are timed before the
    schedule's length is fixed: with compile=auto, steps [probe, 2 probe) run eager and are
    timed, then the compiled model runs (its first call compiles) and is timed; the faster one
    trains the rest."""

    def __init__(self, s: PretrainSettings, model, train_tokens: torch.Tensor,
                 device: torch.device, dtype: torch.dtype, logfile=None):
        self.s, self.model, self.tokens = s, model, train_tokens
        self.device, self.dtype, self.logfile = device, dtype, logfile
        self.opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95),
                                     weight_decay=0.1, fused=device.type == "cuda")
        self.gen = torch.Generator().manual_seed(s.seed)
        self.losses, self.step, self.speeds = [], 0, {}
        self.planned = s.max_steps or 10**9

    def one_step(self, fwd) -> None:
        s, opt = self.s, self.opt
        for g in opt.param_groups:
            g["lr"] = lr_at(self.step, s.lr, self.planned, s.warmup)
        batch = D.sample_windows(self.tokens, s.batch, s.seq, self.gen)
        with autocast(self.device, self.dtype):
            logits = forward_logits(fwd, batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                               batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.losses.append(loss.detach())
        self.step += 1

    def timed(self, n: int, fwd, label: str) -> None:
        t = D.Stopwatch()
        for _ in range(n):
            self.one_step(fwd)
        self.speeds[label] = n * self.s.batch * self.s.seq / t()

    def choose_forward(self, probe: int):
        """(the forward to train with, the compile error if compiling failed)."""
        fwd, error = self.model, None
        for _ in range(probe):  # warm-up (cuDNN/cuBLAS choices, allocator)
            self.one_step(fwd)
        self.timed(probe, fwd, "eager")
        if self.s.compile in ("on", "auto"):
            try:
                compiled = torch.compile(self.model)
                t = D.Stopwatch()
                self.one_step(compiled)
                self.speeds["compile_s"] = t()
                self.timed(probe, compiled, "compiled")
                if self.s.compile == "on" or self.speeds["compiled"] > self.speeds["eager"]:
                    fwd = compiled
            except Exception as exc:  # noqa: BLE001 (keep training eager; the record says why)
                self.opt.zero_grad(set_to_none=True)  # a failed step may have left gradients
                error = f"{type(exc).__name__}: {exc}"
                log(f"pretrain: torch.compile failed, training eager: {error}", self.logfile)
        return fwd, error

    def run(self, train_budget: float) -> PretrainRun:
        s = self.s
        clock = D.Stopwatch()
        fwd, compile_error = self.choose_forward(10 if s.max_steps is None else 1)
        chosen = "compiled" if fwd is not self.model else "eager"
        tok_per_s = self.speeds.get(chosen, self.speeds["eager"])
        if s.max_steps is None:
            left = train_budget - clock()
            self.planned = self.step + max(int(left * tok_per_s / (s.batch * s.seq)), 0)
        log(f"pretrain: {self.speeds} -> {chosen}; {self.planned} steps planned", self.logfile)
        while self.step < self.planned and (s.max_steps is not None or
                                            clock.peek() < train_budget):
            self.one_step(fwd)
            if self.step % 200 == 0:
                log(f"pretrain: step {self.step}/{self.planned} loss "
                    f"{self.losses[-1].item():.4f} ({clock.peek():.0f} s)", self.logfile)
        train_s = clock()
        if s.compile != "off":
            torch._dynamo.reset()  # its caches hold the model; later stages run eager models
        return PretrainRun(torch.stack(self.losses).float().cpu().tolist(), self.step,
                           self.speeds, chosen, compile_error, tok_per_s, train_s)


def held_out_loss(model, eval_tokens: torch.Tensor, s: PretrainSettings, device: torch.device,
                  dtype: torch.dtype) -> tuple[float, int]:
    """(mean next-token loss, tokens scored) over the held-out split's first 256 windows of
    seq + 1 tokens."""
    model.eval()
    windows = D.eval_windows(eval_tokens, s.seq, 256)
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), s.batch):
            w = windows[i:i + s.batch]
            with autocast(device, dtype):
                logits = forward_logits(model, w[:, :-1])
            loss_sum += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                        w[:, 1:].reshape(-1), reduction="sum").item()
            n += w[:, 1:].numel()
    return loss_sum / n, n


def pretrain(s: PretrainSettings, ckpt: pathlib.Path, device: torch.device, dtype: torch.dtype,
             logfile=None) -> dict:
    """Train a LLaMA-architecture model from scratch on the local Python corpus for about
    `budget_s` seconds; save it (bf16 safetensors + tokenizer) to `ckpt`. Returns its record."""
    total = D.Stopwatch()
    data = tokenised_corpus(s, logfile)
    model = new_model(s, data.tokenizer, device)
    params = sum(p.numel() for p in model.parameters())
    log(f"pretrain: LLaMA {s.preset} {params / 1e6:.1f}M parameters on {device}", logfile)
    train_tokens, eval_tokens = data.train_tokens.to(device), data.eval_tokens.to(device)
    loop = _PretrainLoop(s, model, train_tokens, device, dtype, logfile)
    run = loop.run(s.budget_s - total() - s.reserve_s)
    eval_loss, eval_n = held_out_loss(model, eval_tokens, s, device, dtype)

    ckpt.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(ckpt)  # every fine-tuning run starts from bf16
    data.tokenizer.save(ckpt / "tokenizer.json")
    record = pretrain_record(s, data, run, params, eval_loss, eval_n, total())
    record["fingerprint"] = checkpoint_fingerprint(ckpt)
    every = max(1, len(run.losses) // 500)  # keep the stored curve small
    (ckpt / "study_pretrain.json").write_text(json.dumps(
        {"record": record, "curve": {"every": every, "train_loss": run.losses[::every]}},
        indent=1))
    log(f"pretrain: {run.steps} steps, {record['tokens_seen'] / 1e6:.1f}M tokens, train loss "
        f"{record['final_train_loss']:.3f}, held-out loss {eval_loss:.3f}, saved {ckpt}", logfile)
    return record


def pretrain_record(s: PretrainSettings, data: PretrainCorpus, run: PretrainRun, params: int,
                    eval_loss: float, eval_n: int, wall_s: float) -> dict:
    """The study's record of a pretraining run (the checkpoint's fingerprint is added after the
    save)."""
    preset, curve, steps = PRESETS[s.preset], run.losses, run.steps
    tail = curve[-max(1, min(50, len(curve))):]
    train_token_count = int(data.train_tokens.numel())
    return {
        "kind": "pretrain", "model": f"llama-{s.preset}", "params": params,
        "hidden": preset["hidden_size"], "layers": preset["num_hidden_layers"],
        "intermediate": preset["intermediate_size"], "heads": preset["num_attention_heads"],
        "vocab": data.tokenizer.vocab_size, "seq": s.seq, "batch": s.batch, "lr": s.lr,
        "steps": steps, "tokens_seen": steps * s.batch * s.seq,
        "final_train_loss": sum(tail) / len(tail),
        "metric": "eval_loss", "value": eval_loss, "eval_tokens": eval_n,
        "tokens_per_s": run.tokens_per_s, "speeds": run.speeds, "compile": run.chosen,
        "compile_error": run.compile_error, "train_s": run.train_s, "wall_s": wall_s,
        "corpus_read_s": data.read_s, "tokenizer_s": data.tokenizer_s,
        "corpus_train_bytes": data.corpus.train_bytes,
        "corpus_eval_bytes": data.corpus.eval_bytes,
        "corpus_train_tokens": train_token_count,
        "epochs": steps * s.batch * s.seq / max(train_token_count, 1),
        "corpus_roots": data.corpus.roots,
    }


def load_pretrained(ckpt: pathlib.Path) -> tuple[dict, dict, D.TextTokenizer]:
    """(record, curve, tokenizer) of a saved pretraining run; a clear error if there is none."""
    meta = ckpt / "study_pretrain.json"
    if not meta.is_file() or not (ckpt / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no pretrained checkpoint at {ckpt} (the GPU machine was recycled, or pretraining has "
            f"not run): run the pretrain stage first, in the same call if need be, e.g. "
            f"`python -m studies.accuracy --stages pretrain,gsm8k ...`")
    saved = json.loads(meta.read_text())
    return saved["record"], saved["curve"], D.TextTokenizer.load(ckpt / "tokenizer.json")


# ---- fine-tuning --------------------------------------------------------------------------------

@dataclass
class TaskData:
    name: str
    train: list            # D.Example
    eval: list
    pad: int


@torch.no_grad()
def evaluate(model, examples: list, pad: int, batch: int, device, dtype) -> float:
    """Mean loss per response token over `examples` (the token-weighted held-out loss)."""
    was = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i in range(0, len(examples), batch):
        ids, labels = D.collate(examples[i:i + batch], pad)
        ids, labels = ids.to(device), labels.to(device)
        with autocast(device, dtype):
            logits = forward_logits(model, ids)
        total += token_loss(logits, labels, reduction="sum").double()
        count += int((labels[:, 1:] != D.IGNORE).sum())
    model.train(was)
    return total.item() / max(count, 1)


MERGE_PRECISIONS = ("fp8", "bf16")


def merged_eval_losses(model, examples: list, pad: int, batch: int, device, dtype) -> dict:
    """The held-out loss of the trained adapter-mode model after falqon.merge (on a copy, so the
    model itself is untouched) into each of MERGE_PRECISIONS: "eval_loss_merged_fp8" (W + scaling
    B A re-quantised to E4M3 at a fresh scale, what an FP8 export holds), "eval_loss_merged_bf16"
    (the merged weight in the model's dtype: bf16 on GPUs, float32 on the CPU), and
    "merged_eval_s" (the seconds both took); "merged_fp8_update_share" is the signed share of the
    adapter's update scaling B A that the FP8 weights keep (falqon.merge's report, where it gives
    one). Without falqon.merge: "merged_eval_skipped"."""
    import falqon

    if not hasattr(falqon, "merge"):
        return {"merged_eval_skipped": "this falqon has no merge()"}
    clock = D.Stopwatch()
    out = {}
    for precision in MERGE_PRECISIONS:
        merged = falqon.merge(copy.deepcopy(model), precision=precision)
        merged.to(dtype)  # a no-op unless the merge chose another dtype than the frozen base's
        value = evaluate(merged, examples, pad, batch, device, dtype)
        out[f"eval_loss_merged_{precision}"] = value if math.isfinite(value) else None
        share = getattr(getattr(merged, "falqon_merge_report", None), "signed_share", None)
        if precision == "fp8" and share is not None and math.isfinite(share):
            out["merged_fp8_update_share"] = share
        del merged
    out["merged_eval_s"] = clock()
    return out


def finetune(method: Method, task: TaskData, ckpt: str, device: torch.device, lr: float,
             steps: int, batch: int, settings: RunSettings, eval_points: int,
             logfile=None, merged_evals: bool = False) -> tuple[dict, dict]:
    """One run: (record, curve). A run that raises is recorded with its error, not re-raised.
    With `merged_evals`, an adapter-mode falqon run also records the held-out loss of its model
    merged into FP8 and into bf16 (merged_eval_losses)."""
    wall = D.Stopwatch()
    record = {"kind": "accuracy", "task": task.name, "method": method.name,
              "metric": "eval_loss", "value": None, "lr": lr, "steps": steps, "batch": batch,
              "rank": settings.rank, "alpha": settings.alpha}
    curve = {"train_loss": [], "eval": []}
    try:
        torch.manual_seed(settings.seed)
        setup = build(method, ckpt, device, lr, settings)
        record["trainable_params"] = setup.trainable
        order = D.batch_order(len(task.train), batch, steps, settings.seed)
        evals_at = {round(steps * (i + 1) / eval_points) for i in range(eval_points)}
        warmup = max(1, steps // 10)
        losses = []
        train_s = 0.0
        clock = D.Stopwatch()
        for step in range(steps):
            for g in setup.optimizer.param_groups:
                g["lr"] = lr_at(step, lr, steps, warmup)
            ids, labels = D.collate([task.train[i] for i in order[step]], task.pad)
            ids, labels = ids.to(device), labels.to(device)
            with autocast(device, settings.dtype):
                loss = token_loss(forward_logits(setup.model, ids), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(setup.params, 1.0)
            if setup.meter is not None:
                setup.meter.begin_step(step)
            setup.optimizer.step()  # falqon.attach's hook folds B into the weights here
            setup.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if step + 1 in evals_at:
                train_s += clock()
                curve["eval"].append([step + 1, evaluate(setup.model, task.eval, task.pad,
                                                         2 * batch, device, settings.dtype)])
                clock = D.Stopwatch()
        train_s += clock()
        curve["train_loss"] = torch.stack(losses).float().cpu().tolist()
        value = curve["eval"][-1][1]
        if not math.isfinite(value):
            record["diverged"] = True
        else:
            record["value"] = value
        record["train_s"] = train_s
        record["s_per_step"] = train_s / steps
        if setup.meter is not None:
            record.update(setup.meter.summary())
        if merged_evals and method.adapter:
            record.update(merged_eval_losses(setup.model, task.eval, task.pad, 2 * batch, device,
                                             settings.dtype))
        del setup
    except Exception as exc:  # noqa: BLE001 (one broken method must not end the stage)
        record["error"] = f"{type(exc).__name__}: {exc}"
        log(f"{task.name}/{method.name}: FAILED\n{traceback.format_exc()}", logfile)
    record["wall_s"] = wall()
    gc.collect()  # the optimizer hook and PEFT wrappers hold reference cycles to the model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record, curve
