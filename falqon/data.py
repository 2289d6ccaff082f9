"""Instruction data for `falqon finetune`: Alpaca-format JSON/JSONL files (checked, with the line
of any bad record), instruction data derived from the installed Python standard library, a
byte-level tokenizer that needs nothing downloaded, prompt masking and a deterministic batch order.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pathlib
import textwrap
import warnings
from dataclasses import dataclass

import torch

from .config import FalqonError

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


# ---- Alpaca-format files ------------------------------------------------------------------------

def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _check_record(record, where: str, index: int) -> dict:
    if not isinstance(record, dict):
        raise FalqonError(f"{where}: record {index} is a JSON {type(record).__name__}, expected an "
                          f"object with instruction/input/output")
    for key in ("instruction", "output"):
        if key not in record:
            raise FalqonError(f"{where}: record {index} has no {key!r} field (Alpaca format: "
                              f"instruction, optional input, output)")
        if not isinstance(record[key], str):
            raise FalqonError(f"{where}: record {index}: {key!r} must be a string, got "
                              f"{type(record[key]).__name__}")
    if not record["instruction"].strip():
        raise FalqonError(f"{where}: record {index}: 'instruction' is empty")
    extra = record.get("input", "")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise FalqonError(f"{where}: record {index}: 'input' must be a string, got "
                          f"{type(extra).__name__}")
    return {"instruction": record["instruction"], "input": extra, "output": record["output"]}


def load_records(path) -> list[dict]:
    """Alpaca-format records from a JSON file (an array of objects) or a JSONL file (one object a
    line). Any problem raises FalqonError naming the file and line."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FalqonError(f"data file {path} does not exist")
    if not path.is_file():
        raise FalqonError(f"data path {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FalqonError(f"data file {path} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise FalqonError(f"data file {path} is empty")
    records = []
    if stripped[0] == "[":
        decoder = json.JSONDecoder()
        pos = len(text) - len(stripped) + 1
        index = 0
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text) and text[pos] == "]" and index == 0:
                pos += 1
                break
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise FalqonError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
            records.append(_check_record(record, f"{path}:{_line_of(text, pos)}", index))
            index += 1
            pos = end
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text) and text[pos] == ",":
                pos += 1
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise FalqonError(f"{path}:{_line_of(text, pos)}: invalid JSON: expected ',' or ']' "
                              f"after record {index - 1}")
        if text[pos:].strip():
            raise FalqonError(f"{path}:{_line_of(text, pos)}: invalid JSON: extra data after the "
                              f"closing ']'")
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FalqonError(f"{path}:{lineno}: invalid JSON line: {exc.msg} (column "
                                  f"{exc.colno})") from None
            records.append(_check_record(record, f"{path}:{lineno}", len(records)))
    if not records:
        raise FalqonError(f"data file {path} holds no records")
    return records


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


def encode(records: list[dict], tokenizer, seq_len: int, template: str = "alpaca") -> list[Example]:
    """Tokenise prompt and response separately (so the mask boundary is exact), mask the prompt.

    A prompt longer than half of seq_len keeps its beginning and the response marker; the response
    fills what is left and ends with EOS only when it fits whole."""
    if seq_len < 8:
        raise FalqonError(f"seq_len must be at least 8, got {seq_len}")
    with_input, no_input = TEMPLATES[template]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FalqonError("the tokenizer has no EOS token")
    marker = tokenizer.encode(RESPONSE_MARKER, add_special_tokens=False)
    max_prompt = seq_len // 2
    examples = []
    for rec in records:
        head_text = (with_input if rec["input"].strip() else no_input).format(**rec)
        head = bos + tokenizer.encode(head_text, add_special_tokens=False)
        prompt = head[:max(max_prompt - len(marker), 1)] + marker
        response = tokenizer.encode(rec["output"], add_special_tokens=False) + [eos]
        response = response[:seq_len - len(prompt)]
        if not response:
            continue
        examples.append(Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    if not examples:
        raise FalqonError(f"no example has room for a response within seq_len={seq_len}")
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (padding labelled IGNORE_INDEX)."""
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


def split(examples: list, eval_size: int, seed: int) -> tuple[list, list]:
    """(train, eval): eval_size examples drawn by a seeded permutation are held out."""
    if eval_size >= len(examples):
        raise FalqonError(f"eval size {eval_size} leaves no training data ({len(examples)} "
                          f"examples)")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:eval_size])
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

    def indices(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, i = divmod(pos, self.size)
            out.append(self._perm(epoch)[i])
        return out


__all__ = ["BatchOrder", "Example", "IGNORE_INDEX", "TEMPLATES", "byte_tokenizer", "collate",
           "encode", "is_byte_tokenizer", "load_records", "split", "stdlib_records"]
