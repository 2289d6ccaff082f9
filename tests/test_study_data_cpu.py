"""CPU tests of the accuracy study's data pipeline (studies/data.py): the seeded held-out split,
prompt masking and collation, and the pretraining corpus's held-out slice."""

from __future__ import annotations

import email
import pathlib

from studies import data as D

# ---- data ---------------------------------------------------------------------------------------

def _tokenizer() -> D.TextTokenizer:
    root = pathlib.Path(email.__file__).parent
    texts = [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))]
    return D.TextTokenizer.train(texts, 400)


def test_split_is_seeded_disjoint_and_ten_percent():
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(1000)]
    train, held = D.split_records(records, 0.1, seed=0)
    train2, held2 = D.split_records(records, 0.1, seed=0)
    assert held == held2 and train == train2 and len(held) == 100 and len(train) == 900
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    assert D.split_records(records, 0.1, seed=1)[1] != held


def test_prompt_tokens_are_masked_and_responses_kept():
    tok = _tokenizer()
    rec = {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5"}
    ex = D.encode_example(tok, rec, 512)
    prompt = [tok.bos] + tok.encode(D.PROMPT.format(instruction=rec["instruction"]))
    response = tok.encode(rec["output"]) + [tok.eos]
    assert ex.ids == prompt + response
    assert ex.labels == [D.IGNORE] * len(prompt) + response
    assert D.encode_example(tok, rec, len(prompt)) is None  # truncation left no response
    ids, labels = D.collate([ex, D.encode_example(tok, {**rec, "output": "5"}, 512)], tok.pad)
    assert ids.shape[1] % 16 == 0 and ids.shape == labels.shape
    assert (labels[1, len(prompt) + 2:] == D.IGNORE).all() and (ids[1, -1] == tok.pad)


def test_corpus_holds_out_a_fixed_slice(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i:02d}.py").write_text(f"def f{i}():\n    return {i}\n" * 20)
    (tmp_path / "bin.txt").write_bytes(b"\0\1\2")
    a = D.read_corpus([tmp_path], 10**6, 10**6, eval_permille=250, seed=0)
    b = D.read_corpus([tmp_path], 10**6, 10**6, eval_permille=250, seed=1)
    assert sorted(a.eval) == sorted(b.eval) and a.eval and a.train  # the seed only reorders
    assert not set(a.eval) & set(a.train) and len(a.train) + len(a.eval) == 40
