"""Training records from a data file, for `falqon finetune --data`.

Files: JSON (an array of records, one record, or one object holding the array under a key),
JSONL (one record a line) and Parquet (one record a row; needs pyarrow, which `datasets` brings).
A UTF-8 byte-order mark is skipped. Records, one kind per file, as TRL's SFT datasets have them:
  Alpaca              instruction, optional input, output
  prompt/completion   prompt and completion, both strings (the prompt is masked out of the loss),
                      or both lists of chat messages (rendered with the chat template)
  messages            a list of {"role", "content"} ending with an assistant message, rendered
                      with the tokenizer's chat template (the loss is on that last message)
Any problem raises FalqonError naming the file and the line (JSON, JSONL) or row (Parquet).
"""

from __future__ import annotations

import json
import pathlib

from .config import FalqonError

KINDS = ("alpaca", "prompt-completion", "messages")
ACCEPTED = ("Alpaca (instruction, optional input, output), prompt/completion, or messages "
            "(a chat: a list of role/content objects)")


def kind_of(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def _alpaca(record: dict, where: str, index: int) -> dict:
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


def _messages(value, where: str, index: int, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise FalqonError(f"{where}: record {index}: {field!r} must be a non-empty list of "
                          f"messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content"), str):
            raise FalqonError(f"{where}: record {index}: each message of {field!r} must be an "
                              f"object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _chat(record: dict, where: str, index: int) -> dict:
    messages = _messages(record["messages"], where, index, "messages")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise FalqonError(f"{where}: record {index}: 'messages' must end with an assistant "
                          f"message after at least one other (the loss is on that message)")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def _prompt_completion(record: dict, where: str, index: int) -> dict:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise FalqonError(f"{where}: record {index}: 'completion' is empty")
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        return {"prompt": _messages(prompt, where, index, "prompt"),
                "completion": _messages(completion, where, index, "completion")}
    raise FalqonError(f"{where}: record {index}: 'prompt' and 'completion' must both be strings "
                      f"or both lists of messages")


def check_record(record, where: str, index: int, kind: str | None) -> tuple[dict, str]:
    """(the record normalised, its kind); `kind`: the file's kind so far (None: the first)."""
    if not isinstance(record, dict):
        raise FalqonError(f"{where}: record {index} is a JSON {type(record).__name__}, expected an "
                          f"object: {ACCEPTED}")
    found = kind_of(record) or kind or "alpaca"
    if kind is not None and found != kind:
        raise FalqonError(f"{where}: record {index} is a {found} record, the file's first is "
                          f"{kind}: one kind a file")
    check = {"alpaca": _alpaca, "messages": _chat, "prompt-completion": _prompt_completion}
    return check[found](record, where, index), found


# ---- files --------------------------------------------------------------------------------------

def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_array(text: str, start: int, path, add) -> None:
    """The records of a JSON array that opens at `start`, one at a time (for line numbers)."""
    decoder = json.JSONDecoder()
    pos, index = _skip_space(text, start + 1), 0
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise FalqonError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
            add(record, f"{path}:{_line_of(text, pos)}")
            index += 1
            pos = _skip_space(text, end)
            if pos < len(text) and text[pos] in ",]":
                pos += 1
                if text[pos - 1] == "]":
                    break
                pos = _skip_space(text, pos)
                continue
            raise FalqonError(f"{path}:{_line_of(text, pos)}: invalid JSON: expected ',' or ']' "
                              f"after record {index - 1}")
    if text[pos:].strip():
        raise FalqonError(f"{path}:{_line_of(text, pos)}: invalid JSON: extra data after the "
                          f"closing ']'")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _single_object(text: str, path, add) -> bool:
    """A file that is one JSON object (pretty-printed or not): one record, or the array of
    records it holds under its only list-valued key ({"data": [...]}). False if it is not one
    JSON value (JSONL)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Extra data") or _is_json(text.lstrip().split("\n", 1)[0]):
            return False  # JSONL: its own reading names the bad line
        raise FalqonError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    lists = [k for k, v in value.items() if isinstance(v, list) and v and
             all(isinstance(r, dict) for r in v)] if kind_of(value) is None else []
    if len(lists) == 1:
        for record in value[lists[0]]:
            add(record, f"{path}: {lists[0]!r}")
    else:
        add(value, f"{path}:1")
    return True


def _jsonl(text: str, path, add) -> None:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FalqonError(f"{path}:{lineno}: invalid JSON line: {exc.msg} (column "
                              f"{exc.colno})") from None
        add(record, f"{path}:{lineno}")


def _parquet(path: pathlib.Path, add) -> None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FalqonError(f"reading {path} needs pyarrow (pip install pyarrow, or datasets, which "
                          f"brings it)") from None
    try:
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as exc:  # noqa: BLE001 (pyarrow raises its own types for damaged files)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FalqonError(f"{path} is not a readable Parquet file: {first}") from None
    for i, row in enumerate(rows):
        add(row, f"{path}: row {i}")


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is skipped
    except UnicodeDecodeError as exc:
        raise FalqonError(f"data file {path} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None


def load_records(path) -> list[dict]:
    """The records of a JSON, JSONL or Parquet file, checked and normalised (module docstring);
    their kind is `records_kind(records)`."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FalqonError(f"data file {path} does not exist")
    if not path.is_file():
        raise FalqonError(f"data path {path} is not a file")
    records: list[dict] = []
    kind = [None]

    def add(record, where):
        checked, kind[0] = check_record(record, where, len(records), kind[0])
        records.append(checked)

    if path.suffix.lower() in (".parquet", ".pq"):
        _parquet(path, add)
    else:
        text = _read_text(path)
        stripped = text.lstrip()
        if not stripped:
            raise FalqonError(f"data file {path} is empty")
        if stripped[0] == "[":
            _json_array(text, len(text) - len(stripped), path, add)
        elif not (stripped[0] == "{" and _single_object(text, path, add)):
            _jsonl(text, path, add)
    if not records:
        raise FalqonError(f"data file {path} holds no records")
    return records


def records_kind(records: list[dict]) -> str:
    if "instruction" in records[0]:
        return "alpaca"
    return "messages" if isinstance(records[0]["prompt"], list) else "prompt-completion"
