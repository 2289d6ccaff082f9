"""Instruction data for `falqon finetune`: the records of a data file (falqon.records: JSON, JSONL,
Parquet; Alpaca, prompt/completion, chat messages), instruction data derived from the installed
Python standard library, a byte-level tokenizer that needs nothing downloaded, prompt masking
(chat records through the tokenizer's chat template) and a deterministic batch order.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import textwrap
import warnings
from dataclasses import dataclass

import torch

from .config import FalqonError
from .records import load_records, records_kind

IGNORE_INDEX = -100  # label of a token the loss skips (prompt and padding), as in transformers

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n")
SHORT_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
SHORT_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n"
RESPONSE_MARKER = "### Response:\n"
TEMPLATES = {"alpaca": (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT),
             "short": (SHORT_PROMPT, SHORT_PROMPT_NO_INPUT)}


# ---- instruction data from the Python standard library ------------------------------------------

# Pure-Python standard-library modules with many documented public functions. A module missing
# from this Python (some were removed in 3.13) is passed over.
STDLIB_MODULES = (
    "ast", "base64", "bisect", "calendar", "codecs", "colorsys", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "difflib", "email.utils", "enum", "filecmp",
    "fnmatch", "fractions", "functools", "genericpath", "getopt", "glob", "gzip", "heapq", "html",
    "inspect", "ipaddress", "json", "keyword", "linecache", "locale", "mimetypes", "netrc",
    "ntpath",
    "numbers", "operator", "os", "pathlib", "pkgutil", "platform", "plistlib", "posixpath",
    "pprint", "quopri", "random", "secrets", "selectors", "shlex", "shutil", "socket", "stat",
    "statistics", "string", "struct", "sysconfig", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "types", "typing", "unittest.util", "urllib.parse", "uuid",
    "warnings", "wave", "weakref", "webbrowser", "zipfile", "zipimport",
)


def stdlib_records(max_source_chars: int = 1500) -> list[dict]:
    """Instruction data from the installed standard library: for each public, documented function
    defined in pure Python, the instruction is its qualified name, signature and docstring and the
    response its source. Ordered by module and name, so the same Python gives the same data."""
    records = []
    for module_name in STDLIB_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 (absent or broken on this platform: skip it)
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.isfunction(obj) or \
                    obj.__module__ != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            try:
                source = textwrap.dedent(inspect.getsource(obj))
                signature = str(inspect.signature(obj))
            except (OSError, TypeError, ValueError):
                continue
            if len(source) > max_source_chars:
                continue
            records.append({
                "instruction": f"Write the Python function {module_name}.{name}{signature}.\n\n"
                               f"{doc}",
                "input": "",
                "output": source.rstrip() + "\n",
            })
    if not records:
        raise FalqonError("no instruction data could be derived from the standard library (is the "
                          "Python source installed?); pass --data")
    return records


# ---- a byte-level tokenizer ---------------------------------------------------------------------

BYTE_SPECIALS = ("<pad>", "<s>", "</s>")  # ids 256, 257, 258


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_tokenizer():
    """A transformers tokenizer with one token per byte (ids 0-255) and <pad>, <s>, </s>
    (256-258): any text, nothing downloaded, saved and loaded like any HF tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    mapping = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={mapping[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in BYTE_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def is_byte_tokenizer(tokenizer) -> bool:
    return len(tokenizer) == 256 + len(BYTE_SPECIALS) and tokenizer.pad_token == "<pad>" and \
        tokenizer.convert_tokens_to_ids("<s>") == 257


# ---- encoding with prompt masking ---------------------------------------------------------------

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt: only the response is learnt


def _chat_texts(rec: dict, tokenizer) -> tuple[str, str]:
    """(prompt, completion) texts of a chat record: the prompt messages rendered with the
    generation prompt, the completion what the whole conversation's rendering adds to it."""
    try:
        prompt = tokenizer.apply_chat_template(rec["prompt"], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(rec["prompt"] + rec["completion"], tokenize=False)
    except Exception as exc:  # noqa: BLE001 (jinja raises its own types for a template's errors)
        raise FalqonError(f"the tokenizer's chat template cannot render a record: {exc}") from None
    if not full.startswith(prompt):
        raise FalqonError("the tokenizer's chat template renders the conversation without its "
                          "generation prompt as a prefix: the completion cannot be told apart")
    return prompt, full[len(prompt):]


def _parts(rec: dict, kind: str, tokenizer, templates) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one record, the prompt's beginning-of-sequence included."""
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if kind == "alpaca":
        head = (templates[0] if rec["input"].strip() else templates[1]).format(**rec)
        return bos + ids(head), ids(rec["output"])
    if kind == "messages":
        prompt, completion = _chat_texts(rec, tokenizer)
        prompt_ids = ids(prompt)
        return (bos if prompt_ids[:1] != bos else []) + prompt_ids, ids(completion)
    return bos + ids(rec["prompt"]), ids(rec["completion"])


def _encoder(kind: str, tokenizer, seq_len: int, template: str):
    """A function of one record: its Example (prompt masked), or None where no response fits."""
    if seq_len < 8:
        raise FalqonError(f"seq_len must be at least 8, got {seq_len}")
    if kind == "messages" and not getattr(tokenizer, "chat_template", None):
        raise FalqonError("the data holds chat messages but the tokenizer has no chat template: "
                          "use a model whose tokenizer has one, or prompt/completion records")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FalqonError("the tokenizer has no EOS token")
    marker = tokenizer.encode(RESPONSE_MARKER, add_special_tokens=False) if kind == "alpaca" \
        else []
    max_prompt = seq_len // 2

    def one(rec: dict) -> Example | None:
        head, response = _parts(rec, kind, tokenizer, TEMPLATES[template])
        prompt = head[:max(max_prompt - len(marker), 1)] + marker
        if kind == "alpaca" or response[-1:] != [eos]:  # a chat template may end with EOS
            response = response + [eos]
        response = response[:seq_len - len(prompt)]
        if not response:
            return None
        return Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response)
    return one


def encode(records: list[dict], tokenizer, seq_len: int, template: str = "alpaca",
           progress: bool = False) -> list[Example]:
    """Tokenise prompt and response separately (so the mask boundary is exact), mask the prompt.

    Alpaca records are put in `template`, chat records (falqon.records) rendered with the
    tokenizer's chat template, prompt/completion strings used as they are. A prompt longer than
    half of seq_len keeps its beginning (and, for Alpaca, the response marker); the response fills
    what is left and ends with EOS only when it fits whole."""
    from tqdm.auto import tqdm

    one = _encoder(records_kind(records) if records else "alpaca", tokenizer, seq_len, template)
    examples = [e for e in (one(rec) for rec in tqdm(
        records, desc="falqon tokenise", unit="record", disable=not progress, mininterval=1.0,
        dynamic_ncols=True)) if e is not None]
    if not examples:
        raise FalqonError(f"no example has room for a response within seq_len={seq_len}")
    return examples


class ExampleList(list):
    """encode()'s Examples with the one method of datasets.Dataset that the CLI uses."""

    def select(self, indices) -> "ExampleList":
        return ExampleList(self[i] for i in indices)


def encode_dataset(records: list[dict], tokenizer, seq_len: int, template: str = "alpaca",
                   progress: bool = False):
    """encode() as a `datasets.Dataset` of input_ids and labels: the records (checked by
    falqon.records) in a Dataset, tokenised by Dataset.map with its progress bar; in memory, no
    cache file, nothing downloaded. Without `datasets` installed (it comes with falqon[hf]),
    the same examples from encode() in an ExampleList."""
    try:
        import datasets
    except ImportError:
        return ExampleList(encode(records, tokenizer, seq_len, template, progress))

    one = _encoder(records_kind(records) if records else "alpaca", tokenizer, seq_len, template)

    def batch(rows: dict) -> dict:
        found = [one(dict(zip(rows, values))) for values in zip(*rows.values())]
        kept = [e for e in found if e is not None]
        return {"input_ids": [e.input_ids for e in kept], "labels": [e.labels for e in kept]}

    table = datasets.Dataset.from_list(records)
    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
    try:
        # new_fingerprint: datasets would otherwise hash the tokenizer in the closure.
        out = table.map(batch, batched=True, remove_columns=table.column_names,
                        desc="falqon tokenise", keep_in_memory=True, load_from_cache_file=False,
                        new_fingerprint=f"falqon-{len(records)}-{seq_len}-{template}")
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()
    if not len(out):
        raise FalqonError(f"no example has room for a response within seq_len={seq_len}")
    return out


def collate(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (padding labelled IGNORE_INDEX), of
    Examples or of {"input_ids", "labels"} rows (encode_dataset's)."""
    examples = [e if isinstance(e, Example) else Example(e["input_ids"], e["labels"])
                for e in examples]
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split(examples, eval_size: int, seed: int) -> tuple:
    """(train, eval): eval_size examples drawn by a seeded permutation are held out (of a list, or
    of a datasets.Dataset, whose select gives the two)."""
    if eval_size >= len(examples):
        raise FalqonError(f"eval size {eval_size} leaves no training data ({len(examples)} "
                          f"examples)")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:eval_size])
    if hasattr(examples, "select"):
        return (examples.select([i for i in range(len(examples)) if i not in held]),
                examples.select(sorted(held)))
    return ([e for i, e in enumerate(examples) if i not in held],
            [examples[i] for i in sorted(held)])


class BatchOrder:
    """Which examples each optimizer step sees: the training set in a fresh seeded permutation
    every epoch, read `per_step` examples at a time. A pure function of the step, so a resumed
    run sees exactly the batches an uninterrupted one would."""

    def __init__(self, size: int, per_step: int, seed: int):
        if size <= 0:
            raise FalqonError("no training examples")
        self.size, self.per_step, self.seed = size, per_step, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.size, generator=gen).tolist()
            for old in [e for e in self._perms if e < epoch - 1]:
                del self._perms[old]
        return self._perms[epoch]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index within the epoch) where step `step` starts reading."""
        return divmod(step * self.per_step, self.size)

    def stream(self, steps: int) -> list[int]:
        """The examples of steps 0 .. steps-1, in order: a training run's whole data order."""
        return [i for step in range(steps) for i in self.indices(step)]

    def indices(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, i = divmod(pos, self.size)
            out.append(self._perm(epoch)[i])
        return out


__all__ = ["BatchOrder", "Example", "IGNORE_INDEX", "TEMPLATES", "byte_tokenizer", "collate",
           "encode", "encode_dataset", "is_byte_tokenizer", "load_records", "split",
           "stdlib_records"]
