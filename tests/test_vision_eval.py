"""`mmalign vision eval`: accuracies equal the demo's measure by hand, a LoRA run folder is merged onto the base (its
answers equal the unmerged adapter's), the paired comparison, and bad rows refused naming row and field."""

import json

import pytest
import torch

from mmalign.cli import main
from mmalign.vision import models
from mmalign.vision.data import write_rows
from mmalign.vision.evaluate import correct, greedy_answers
from mmalign.vision.world import qa_rows


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """12 world questions as QA rows (one embedded image each) and as the demo's rows."""
    rows = qa_rows(12, seed=3)
    path = write_rows([{"images": [r["image"]], "question": r["question"], "answer": r["answer"]} for r in rows],
                      tmp_path_factory.mktemp("qa") / "qa.parquet")
    return path, rows


@pytest.fixture(scope="module")
def lora(tiny_dir, tmp_path_factory):
    """A random LoRA on the tiny LLaVA's language model, saved as a LoRA run writes it (peft's adapter files)."""
    model = models.add_lora(models.load_model(tiny_dir), rank=4, alpha=None, targets=("q_proj", "v_proj"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=1.0)
    folder = tmp_path_factory.mktemp("lora")
    model.save_pretrained(folder)
    return folder


def test_vision_eval_end_to_end(tiny_dir, qa, lora, tmp_path):
    from peft import PeftModel

    path, rows = qa
    out = tmp_path / "eval"
    assert main(["vision", "eval", "--base", str(tiny_dir), "--models", f"same={tiny_dir}", f"lora={lora}",
                 "--data", str(path), "--output", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    model, processor = models.load(tiny_dir)
    base = correct(model, processor, rows)  # the demo's measure, on the same rows
    s = result["summary"]
    assert s["base"]["accuracy"]["mean"] == pytest.approx(sum(base) / len(base))
    assert s["base"]["hallucination_rate"]["mean"] == pytest.approx(1 - sum(base) / len(base))
    assert s["same"]["gain"]["mean"] == 0 and s["same"]["fixed"] == s["same"]["broken"] == 0
    adapter = PeftModel.from_pretrained(models.load_model(tiny_dir), str(lora))  # unmerged: another path
    expected = greedy_answers(adapter, processor, rows)
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["answers"]["lora"] for a in answers] == expected
    assert expected != [a["answers"]["base"] for a in answers]  # the LoRA changed some answers
    right = [float(e == r["answer"]) for e, r in zip(expected, rows)]
    assert s["lora"]["fixed"] == sum(1 for a, b in zip(right, base) if a > b)
    assert s["lora"]["broken"] == sum(1 for a, b in zip(right, base) if a < b)
    assert "| `lora` |" in (out / "eval.md").read_text()


def test_vision_eval_refuses_bad_rows_naming_row_and_field(tiny_dir, qa, refused, tmp_path):
    path, rows = qa
    bad = write_rows([{"images": [r["image"]], "question": r["question"], "answer": r["answer"] if i != 2 else ""}
                      for i, r in enumerate(rows)], tmp_path / "bad.parquet")
    out = tmp_path / "out"
    message = refused("vision", "eval", "--base", tiny_dir, "--models", tiny_dir, "--data", bad, "--output", out,
                      output=out)
    assert f"{bad}: 1 problem(s) in vision QA row records" in message
    assert "record 2, field 'answer': is empty" in message
    assert "has no {question}" in refused("vision", "eval", "--base", tiny_dir, "--models", tiny_dir, "--data", path,
                                          "--output", out, "--template", "Q: A:", output=out)
