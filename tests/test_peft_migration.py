"""docs/peft_migration.md: its PEFT script and its diff are examples/peft_migration/*.py, the
diff changes at most 5 lines, and both scripts train a tiny model with the Trainer."""

import difflib
import json
import re
import runpy

import pytest
import torch

from falqon_testing import REPO
from workflow_testing import tiny_causal_lm

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
DOC = REPO / "docs" / "peft_migration.md"
EXAMPLES = REPO / "examples" / "peft_migration"


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_the_doc_shows_the_tested_scripts_and_a_small_diff():
    doc = DOC.read_text()
    peft_script = (EXAMPLES / "peft_lora.py").read_text()
    falqon_script = (EXAMPLES / "falqon_lora.py").read_text()
    assert fenced(doc, "python")[0] == peft_script
    diff = "".join(difflib.unified_diff(peft_script.splitlines(True),
                                        falqon_script.splitlines(True), "peft_lora.py",
                                        "falqon_lora.py", n=1))
    assert fenced(doc, "diff") == [diff]
    removed = [ln for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert len(removed) <= 5 and len(added) <= 5
    assert "docs/peft_migration.md" in (REPO / "README.md").read_text()


@pytest.mark.parametrize("script", ["peft_lora.py", "falqon_lora.py"])
def test_both_scripts_train_a_tiny_model(tmp_path, monkeypatch, capsys, script):
    from falqon.data import byte_tokenizer

    model_dir = tmp_path / "model"
    tiny_causal_lm().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"say {w} {w} {w}"}) + "\n"
                            for w in ("red", "green", "blue", "fast") * 4))
    for key, value in dict(MODEL=model_dir, DATA=data, OUT=tmp_path / "out", STEPS=2).items():
        monkeypatch.setenv(key, str(value))
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: ",
                     capsys.readouterr().out)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    if script == "falqon_lora.py":
        import falqon

        model = falqon.from_pretrained(base, tmp_path / "out" / "adapter")
        assert any(torch.count_nonzero(m.lora_B) for _, m in falqon.melded_layers(model))
        assert (tmp_path / "out" / "checkpoint-2" / "falqon_config.json").is_file()
    else:
        import peft

        peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapter")
