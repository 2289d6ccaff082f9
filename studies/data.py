"""The study's data: the pretraining corpus, its BPE tokenizer and the instruction data sets.

Pretraining corpus: the .py sources and .md/.rst/.txt docs of the Python installation that runs
the study (site-packages and the standard library), so that it exists offline on any machine
with Python. Paths are listed in sorted order and shuffled with a fixed seed (so that a byte cap
samples every package, not the alphabetically first ones); a file is held out for the pretraining
eval loss when the CRC32 of its path inside its root falls in a fixed slice, which does not
depend on the cap or on the shuffle.

Tokenizer: a byte-level BPE (the `tokenizers` library) trained on a sample of that corpus. A raw
byte vocabulary would need no training, but at seq 512 it truncates most fine-tuning examples
(median GSM8K prompt + answer is ~430 bytes plus the template; GPTeacher answers alone ~560
bytes) and spends ~3.7x more compute per byte of text in pretraining; the BPE takes seconds to
train and is saved beside the checkpoint, so every fine-tuning run uses the same one.

Instruction data: Alpaca-format JSON (../shared/data), a fixed seeded 10% held out for the
eval loss, prompts masked with -100 so that the loss is on the responses only.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import site
import sysconfig
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

TEXT_SUFFIXES = (".py", ".md", ".rst", ".txt")
MAX_FILE_BYTES = 512 * 1024  # larger files are mostly generated tables and vendored data
SPECIALS = ("<bos>", "<eos>", "<pad>")
IGNORE = -100
PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# ---- pretraining corpus -------------------------------------------------------------------------

def default_roots() -> list[pathlib.Path]:
    """site-packages and the standard library of this interpreter (existing folders, once each)."""
    paths = list(site.getsitepackages()) + [sysconfig.get_paths()[k]
                                            for k in ("purelib", "platlib", "stdlib")]
    seen, roots = set(), []
    for p in paths:
        path = pathlib.Path(p)
        if path.is_dir() and path.resolve() not in seen:
            seen.add(path.resolve())
            roots.append(path)
    return roots


def list_documents(roots: list[pathlib.Path]) -> list[tuple[str, pathlib.Path]]:
    """(key, path) of every text file under the roots, sorted; key = the path inside its root.
    A folder that is itself another root (site-packages inside the stdlib folder) is left to it;
    os.walk does not follow symlinked folders, so no file is listed twice."""
    root_set = {r.resolve() for r in roots}
    docs = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith(".")
                             and (pathlib.Path(folder, d).resolve() not in root_set))
            for name in sorted(files):
                if name.endswith(TEXT_SUFFIXES):
                    path = pathlib.Path(folder, name)
                    docs.append((path.relative_to(root).as_posix(), path))
    docs.sort(key=lambda d: (d[0], str(d[1])))
    return docs


def is_eval_document(key: str, eval_permille: int) -> bool:
    return zlib.crc32(key.encode()) % 1000 < eval_permille


@dataclass
class Corpus:
    train: list[str]
    eval: list[str]
    train_bytes: int
    eval_bytes: int
    files_listed: int
    roots: list[str]


def read_corpus(roots: list[pathlib.Path], max_bytes: int, eval_max_bytes: int,
                eval_permille: int = 10, seed: int = 0) -> Corpus:
    """Read text files until `max_bytes` of training text and `eval_max_bytes` of held-out text."""
    docs = list_documents(roots)
    if not docs:
        raise RuntimeError(f"no {'/'.join(TEXT_SUFFIXES)} files under {[str(r) for r in roots]}")
    random.Random(seed).shuffle(docs)
    train, evals, n_train, n_eval = [], [], 0, 0
    for key, path in docs:
        if n_train >= max_bytes and n_eval >= eval_max_bytes:
            break
        is_eval = is_eval_document(key, eval_permille)
        if (n_eval if is_eval else n_train) >= (eval_max_bytes if is_eval else max_bytes):
            continue
        try:
            if not 0 < path.stat().st_size <= MAX_FILE_BYTES:
                continue
            raw = path.read_bytes()
        except OSError:
            continue
        if b"\0" in raw:
            continue
        text = raw.decode("utf-8", errors="replace")
        (evals if is_eval else train).append(text)
        if is_eval:
            n_eval += len(raw)
        else:
            n_train += len(raw)
    if not train or not evals:
        raise RuntimeError(f"the corpus under {[str(r) for r in roots]} gave {n_train} training and "
                           f"{n_eval} held-out bytes; both must be non-zero")
    return Corpus(train, evals, n_train, n_eval, len(docs), [str(r) for r in roots])


# ---- tokenizer ----------------------------------------------------------------------------------

class TextTokenizer:
    """A `tokenizers` byte-level BPE with <bos>, <eos>, <pad>."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos, self.eos, self.pad = (tokenizer.token_to_id(s) for s in SPECIALS)
        if None in (self.bos, self.eos, self.pad):
            raise ValueError(f"tokenizer lacks one of the special tokens {SPECIALS}")
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "TextTokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | os.PathLike) -> None:
        self.tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def encode_documents(tok: TextTokenizer, texts: list[str], chunk: int = 1024) -> np.ndarray:
    """All documents as one token stream, each followed by <eos> (uint16: the vocab is < 65536)."""
    if tok.vocab_size > 65536:
        raise ValueError(f"vocab of {tok.vocab_size} tokens does not fit uint16")
    parts = []
    for start in range(0, len(texts), chunk):
        for ids in tok.encode_batch(texts[start:start + chunk]):
            parts.append(np.asarray(ids + [tok.eos], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def sample_windows(tokens: torch.Tensor, batch: int, seq: int, generator: torch.Generator
                   ) -> torch.Tensor:
    """`batch` random windows of seq + 1 tokens (input and shifted target) from a 1-D stream."""
    if tokens.numel() <= seq + 1:
        raise ValueError(f"token stream of {tokens.numel()} tokens is shorter than seq + 1 = "
                         f"{seq + 1}")
    starts = torch.randint(0, tokens.numel() - seq - 1, (batch, 1), generator=generator)
    idx = starts.to(tokens.device) + torch.arange(seq + 1, device=tokens.device)
    return tokens[idx].long()


def eval_windows(tokens: torch.Tensor, seq: int, count: int) -> torch.Tensor:
    """The first `count` non-overlapping windows of seq + 1 tokens (fewer if the stream is short)."""
    n = min(count, (tokens.numel() - 1) // (seq + 1))
    if n < 1:
        raise ValueError(f"held-out stream of {tokens.numel()} tokens holds no window of {seq + 1}")
    return tokens[:n * (seq + 1)].view(n, seq + 1).long()


# ---- instruction data ---------------------------------------------------------------------------

def load_alpaca(path: str | os.PathLike) -> list[dict]:
    """Records with instruction, input, output strings; a clear error for anything else."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data {path} is absent (expected ../shared/data beside "
                                f"the checkout, or FALQON_DATA_DIR)")
    records = json.loads(path.read_text())
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON array of Alpaca records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k, ""), str)
                                                for k in ("instruction", "input", "output")) \
                or not rec.get("instruction") or not rec.get("output"):
            raise ValueError(f"{path}: record {i} is not an Alpaca record with string instruction "
                             f"and output")
    return records


def split_records(records: list, eval_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, held out): a seeded permutation, the first `eval_fraction` of it held out. Each
    part keeps the file's order, so the split depends on the seed and the record count only."""
    n = len(records)
    n_eval = max(1, round(n * eval_fraction))
    held = set(random.Random(seed).sample(range(n), n_eval))
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE on the prompt


def encode_example(tok: TextTokenizer, rec: dict, seq: int) -> Example | None:
    """<bos> prompt response <eos>, truncated to seq tokens; labels only on the response.
    None when truncation leaves no response token."""
    template = PROMPT_WITH_INPUT if rec.get("input") else PROMPT
    prompt = [tok.bos] + tok.encode(template.format(**{k: rec.get(k, "") for k in
                                                        ("instruction", "input")}))
    response = tok.encode(rec["output"]) + [tok.eos]
    ids = (prompt + response)[:seq]
    labels = ([IGNORE] * len(prompt) + response)[:seq]
    if all(label == IGNORE for label in labels[1:]):
        return None
    return Example(ids, labels)


def encode_examples(tok: TextTokenizer, records: list, seq: int) -> list[Example]:
    out = [e for e in (encode_example(tok, r, seq) for r in records) if e is not None]
    if not out:
        raise ValueError(f"no example keeps a response token within seq {seq}")
    return out


def collate(examples: list[Example], pad: int, multiple: int = 16) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """(input_ids, labels), right-padded to the longest example rounded up to `multiple` (token
    counts that FP8 GEMMs take without padding). Right padding needs no attention mask in a
    causal model: no real token attends to a later position."""
    length = max(len(e.ids) for e in examples)
    length = -(-length // multiple) * multiple
    ids = torch.full((len(examples), length), pad, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: epochs of seeded permutations, the same for every method."""
    if n < batch:
        raise ValueError(f"{n} training examples are fewer than one batch of {batch}")
    rng = random.Random(seed)
    order, out = [], []
    while len(out) < steps:
        if len(order) < batch:
            perm = list(range(n))
            rng.shuffle(perm)
            order = perm  # a partial last batch of an epoch is dropped
        out.append(order[:batch])
        order = order[batch:]
    return out


class Stopwatch:
    """Seconds since creation, synchronising the GPU first so that queued kernels count."""

    def __init__(self):
        self._sync()
        self.start = time.perf_counter()

    @staticmethod
    def _sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def __call__(self) -> float:
        self._sync()
        return self.peek()

    def peek(self) -> float:
        """Seconds since creation without a GPU sync: the host runs at most the launch queue
        ahead of the GPU, so this is close enough for budgets and keeps steps asynchronous."""
        return time.perf_counter() - self.start
