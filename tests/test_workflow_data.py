"""Instruction data: Alpaca JSON/JSONL loading with line-numbered errors, standard-library data,
the byte-level tokenizer, prompt masking and the deterministic batch order."""

import json
import sys

import pytest
import torch

from falqon import FalqonError
from falqon import data as D
from workflow_testing import records, write_json

pytest.importorskip("transformers")


def test_load_json_and_jsonl(tmp_path):
    recs = records(5)
    recs[1]["input"] = None  # tolerated: no input
    del recs[2]["input"]
    a = D.load_records(write_json(tmp_path / "a.json", recs))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    b = D.load_records(tmp_path / "b.jsonl")
    assert a == b and len(a) == 5
    assert a[1]["input"] == "" and a[2]["input"] == ""
    assert a[0] == {"instruction": recs[0]["instruction"], "input": recs[0]["input"],
                    "output": recs[0]["output"]}


@pytest.mark.parametrize("name, text, match", [
    ("bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": 1}\n]',
     r"bad.json:3: invalid JSON: Expecting ','"),
    ("bad.json", '[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c"}\n]',
     r"bad.json:4: record 1 has no 'output' field"),
    ("bad.json", '[\n  {"instruction": "a", "output": "b"},\n  ["x"]\n]',
     r"bad.json:3: record 1 is a JSON list"),
    ("bad.json", '[{"instruction": "a", "output": 3}]', r"bad.json:1: record 0: 'output' must"),
    ("bad.json", '[{"instruction": " ", "output": "x"}]', r"'instruction' is empty"),
    ("bad.json", '[{"instruction": "a", "output": "x", "input": 4}]', r"'input' must be a string"),
    ("bad.json", '[{"instruction": "a", "output": "x"},\n]', r"bad.json:2: invalid JSON"),
    ("bad.json", '[{"instruction": "a", "output": "x"}] x', r"extra data after the closing"),
    ("bad.json", "[]", r"holds no records"),
    ("bad.json", "  \n", r"is empty"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "outp',
     r"bad.jsonl:2: invalid JSON line"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"output": "b"}\n',
     r"bad.jsonl:3: record 1 has no 'instruction' field"),
])
def test_malformed_data_names_the_line(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(FalqonError, match=match):
        D.load_records(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(FalqonError, match="does not exist"):
        D.load_records(tmp_path / "nope.json")
    with pytest.raises(FalqonError, match="is not a file"):
        D.load_records(tmp_path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00[")
    with pytest.raises(FalqonError, match="is not UTF-8"):
        D.load_records(tmp_path / "bin.json")


def test_stdlib_records_are_instructions_from_source():
    recs = D.stdlib_records()
    assert len(recs) > 100 and recs == D.stdlib_records()  # same Python, same data
    for r in recs[:50]:
        assert r["instruction"].startswith("Write the Python function ")
        name = r["instruction"].split()[4].split("(")[0].rsplit(".", 1)[1]
        assert f"def {name}(" in r["output"]


def test_byte_tokenizer_round_trips_any_text(tmp_path):
    tok = D.byte_tokenizer()
    text = "def f(x):\n\treturn x  # ü, 中文, \x00 emoji \U0001F600"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert D.is_byte_tokenizer(tok)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.encode(text, add_special_tokens=False) == ids and D.is_byte_tokenizer(again)


def test_encode_masks_the_prompt():
    tok = D.byte_tokenizer()
    rec = {"instruction": "Say hi.", "input": "", "output": "hi"}
    (ex,) = D.encode([rec], tok, 256, "short")
    prompt = [257] + list(b"### Instruction:\nSay hi.\n\n### Response:\n")
    assert ex.input_ids == prompt + list(b"hi") + [258]
    assert ex.labels == [D.IGNORE_INDEX] * len(prompt) + list(b"hi") + [258]
    (alpaca,) = D.encode([dict(rec, input="ctx")], tok, 512, "alpaca")
    text = tok.decode(alpaca.input_ids[1:])
    assert text.startswith("Below is an instruction") and "### Input:\nctx\n\n### Response:\n" \
        in text


def test_encode_truncates_long_examples():
    tok = D.byte_tokenizer()
    rec = {"instruction": "x" * 500, "input": "", "output": "y" * 500}
    (ex,) = D.encode([rec], tok, 64, "short")
    assert len(ex.input_ids) == 64
    marker = list(b"### Response:\n")
    n_prompt = ex.labels.count(D.IGNORE_INDEX)
    assert n_prompt == 32 and ex.input_ids[n_prompt - len(marker):n_prompt] == marker
    assert ex.labels[-1] == ord("y")  # cut short: no EOS taught
    with pytest.raises(FalqonError, match="seq_len must be at least 8"):
        D.encode([rec], tok, 4)


def test_collate_pads_and_masks():
    batch = D.collate([D.Example([1, 2, 3], [-100, 2, 3]), D.Example([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_split_and_batch_order_are_deterministic():
    items = list(range(50))
    train, held = D.split(items, 5, seed=3)
    assert len(held) == 5 and sorted(train + held) == items and D.split(items, 5, 3) == (train,
                                                                                         held)
    with pytest.raises(FalqonError, match="leaves no training data"):
        D.split(items, 50, 0)
    order = D.BatchOrder(len(train), 4, seed=1)
    seen = [i for step in range(45 // 4 + 1) for i in order.indices(step)]
    assert sorted(seen[:45]) == list(range(45))  # the first epoch is a permutation
    fresh = D.BatchOrder(len(train), 4, seed=1)
    assert fresh.indices(30) == order.indices(30)  # a pure function of the step (resume)
    assert order.position(12) == (1, 3)
    assert D.BatchOrder(len(train), 4, seed=2).indices(0) != order.indices(0)


def test_bom_single_object_and_wrapped_array(tmp_path):
    recs = records(3)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs).encode())
    assert D.load_records(bom) == D.load_records(write_json(tmp_path / "plain.json", recs))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(recs[0]).encode() + b"\n" +
                                         json.dumps(recs[1]).encode())
    assert len(D.load_records(tmp_path / "bom.jsonl")) == 2
    one = tmp_path / "one.json"
    one.write_text(json.dumps(recs[0], indent=2))  # one pretty-printed record
    assert D.load_records(one) == D.load_records(write_json(tmp_path / "p.json", recs[:1]))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": recs}, indent=2))
    assert len(D.load_records(tmp_path / "wrapped.json")) == 3
    one.write_text('{\n  "instruction": "a",\n  "output": \n}')
    with pytest.raises(FalqonError, match=r"one.json:4: invalid JSON"):
        D.load_records(one)


def test_prompt_completion_and_messages_records(tmp_path):
    pc = [{"prompt": "2+2=", "completion": "4"}]
    chat = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}]
    assert D.load_records(write_json(tmp_path / "pc.json", pc)) == pc
    loaded = D.load_records(write_json(tmp_path / "chat.json", chat))
    assert loaded[0]["completion"] == [{"role": "assistant", "content": "Hello"}]
    for bad, match in (([pc[0], records(1)[0]], "is a alpaca record, the file's first is"),
                       ([{"messages": [{"role": "user", "content": "x"}]}], "must end with an "
                                                                            "assistant"),
                       ([{"prompt": "x", "completion": 3}], "must both be strings")):
        with pytest.raises(FalqonError, match=match):
            D.load_records(write_json(tmp_path / "bad.json", bad))


def test_encode_prompt_completion_and_chat():
    tok = D.byte_tokenizer()
    (ex,) = D.encode([{"prompt": "2+2=", "completion": "4"}], tok, 64)
    assert ex.input_ids == [257] + list(b"2+2=4") + [258]
    assert ex.labels == [D.IGNORE_INDEX] * 5 + [ord("4"), 258]
    chat = {"prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Yo"}]}
    with pytest.raises(FalqonError, match="no chat template"):
        D.encode([chat], tok, 64)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    (ex,) = D.encode([chat], tok, 64)
    prompt = [257] + list(b"<user>Hi") + [258] + list(b"<assistant>")
    assert ex.input_ids == prompt + list(b"Yo") + [258]  # the template's own EOS, not a second
    assert ex.labels == [D.IGNORE_INDEX] * len(prompt) + list(b"Yo") + [258]


def test_parquet(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(FalqonError, match="needs pyarrow"):
        D.load_records(path)
    monkeypatch.undo()
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(records(4)), str(path))
    assert D.load_records(path) == D.load_records(write_json(tmp_path / "d.json", records(4)))


def test_encode_dataset_with_and_without_the_datasets_package(monkeypatch):
    pytest.importorskip("datasets")
    tok = D.byte_tokenizer()
    recs = records(12, seed=3)
    table = D.encode_dataset(recs, tok, 64, template="short")
    assert type(table).__name__ == "Dataset"
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    plain = D.encode_dataset(recs, tok, 64, template="short")
    assert isinstance(plain, D.ExampleList)
    assert [e.input_ids for e in plain] == table["input_ids"]
    assert [e.labels for e in plain] == table["labels"]
    # The CLI's uses: split, select in a given order, collate; the same either way.
    (t_train, t_eval), (p_train, p_eval) = D.split(table, 3, 0), D.split(plain, 3, 0)
    order = [4, 0, 8, 4, 2]
    for a, b in ((t_train.select(order), p_train.select(order)), (t_eval, p_eval)):
        ca, cb = D.collate(list(a), 0), D.collate(list(b), 0)
        assert all(torch.equal(ca[k], cb[k]) for k in ca)
