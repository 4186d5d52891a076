"""`mmalign vision eval`: QA accuracy of a base and aligned vision-language models on a QA file, with 95% CIs.

Each row holds one image ('images': a list of one path, bytes or image), a 'question' and a one-word 'answer'.
Every model answers every row greedily, as the vision demo measures it (`evaluate.correct`): the argmax next
token after the prompt `--template` ('{question}' filled in; the default is the embedded model's) is compared with
the answer, case aside and without the tokenizer's word-start mark. Reported per model: accuracy with its 95% CI
and the hallucination rate 1 - accuracy (a wrong answer about the image); per aligned model against the base on
the same rows: the paired gain in accuracy with its 95% CI, and the rows it fixed (base wrong, model right) and
broke (base right, model wrong). Writes eval.json, eval.md and answers.jsonl (each model's answer per row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign import run_folder
from mmalign.config import option
from mmalign.data import ALLOW_OUTSIDE_PATHS, Field, Schema, text
from mmalign.errors import ConfigError
from mmalign.files import write_atomically
from mmalign.heldout import Evaluation
from mmalign.stats import mean_ci

from . import models
from .data import data_root, image_entries, load_rows, one_image, open_image
from .evaluate import PROMPT, greedy_answers, same_word

QA_ROW = Schema("vision QA row", (Field("images", image_entries), Field("question", text), Field("answer", text)),
                (one_image,))


@dataclass
class Config:
    """Settings of `mmalign vision eval`."""

    base: str = option(None, "the base model: folder or hub id (AutoModelForImageTextToText)")
    models: list[str] = option([], "aligned models, each [NAME=]PATH: a model folder, or a LoRA run folder "
                                   "(adapter_config.json) on the base")
    data: str = option(None, "QA rows (.parquet/.jsonl file, folder or hub id): images (one), question, answer")
    split: str = option("train", "split to read from a dataset folder or hub id")
    template: str = option(PROMPT, "the prompt, with {question} where the question goes")
    allow_outside_paths: bool = option(False, ALLOW_OUTSIDE_PATHS)
    output: Path = option(None, "folder for eval.json, eval.md and answers.jsonl: a new or empty one")
    batch_size: int = option(64, "rows per forward")

    def __post_init__(self) -> None:
        for name in ("base", "data", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if not self.models:
            raise ValueError("--models: give at least one aligned model to compare with the base")
        if "{question}" not in self.template:
            raise ValueError(f"--template {self.template!r} has no {{question}}")
        names = [model_name(m)[0] for m in self.models]
        if len(names) != len(set(names)) or "base" in names:
            raise ValueError(f"--models: each model needs a name of its own, not 'base': {', '.join(names)}")
        self.output = Path(self.output)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


def model_name(spec: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (named after its folder) as (name, path)."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (Path(spec).name, spec)


def load_aligned(path: str | Path, base: str):
    """An aligned model: a LoRA folder (adapter_config.json) merged into the base, or a whole model folder."""
    if not Path(path).exists():
        raise ConfigError(f"--models {path}: no such folder")
    if not (Path(path) / "adapter_config.json").is_file():
        return models.load_model(path)
    from peft import PeftModel

    return PeftModel.from_pretrained(models.load_model(base), str(path)).merge_and_unload()


def qa_rows(data: str, split: str = "train", allow_outside_paths: bool = False) -> list[dict]:
    """QA rows, checked up front (a missing field or unreadable image names the row), images opened."""
    records = load_rows(data, QA_ROW, split, allow_outside_paths)
    root = data_root(data)
    return [{"image": open_image(r["images"][0], root, allow_outside_paths, f"{data} row {i} images"),
             "question": r["question"], "answer": r["answer"]} for i, r in enumerate(records)]


def held_out_accuracy(processor, rows: list[dict], batch_size: int, template: str = PROMPT) -> Evaluation:
    """The trainer's evaluation of a vision model: eval/accuracy = share of `rows` answered right greedily (as
    `mmalign vision eval` measures it), with its 95% CI (eval/accuracy_ci_low, _high)."""
    def run(model) -> dict[str, float]:
        answers = greedy_answers(model, processor, rows, batch_size, template=template)
        summary = mean_ci([float(same_word(a, r["answer"])) for a, r in zip(answers, rows)])
        return {"accuracy": summary["mean"], "accuracy_ci_low": summary["ci_low"],
                "accuracy_ci_high": summary["ci_high"]}

    return Evaluation(run, "accuracy")


def run(config: Config) -> dict:
    """Answer every row with every model; write the comparison into config.output, a folder of its own."""
    rows = qa_rows(config.data, config.split, config.allow_outside_paths)
    aligned = dict(model_name(m) for m in config.models)
    with run_folder.claim(config.output, resuming=False):
        model, processor = models.load(config.base)
        answers = {"base": greedy_answers(model, processor, rows, config.batch_size, template=config.template)}
        for name, path in aligned.items():
            answers[name] = greedy_answers(load_aligned(path, config.base), processor, rows, config.batch_size,
                                           template=config.template)
        right = {name: [float(same_word(a, r["answer"])) for a, r in zip(given, rows)]
                 for name, given in answers.items()}
        result = {"data": config.data, "rows": len(rows), "template": config.template, "base": config.base,
                  "models": aligned, "summary": summarise(right)}
        per_row = [{"index": i, "question": r["question"], "answer": r["answer"],
                    "answers": {name: given[i] for name, given in answers.items()}} for i, r in enumerate(rows)]
        table = markdown(result)
        write_atomically(config.output / "eval.json", lambda p: p.write_text(json.dumps(result, indent=2)))
        write_atomically(config.output / "eval.md", lambda p: p.write_text(table))
        write_atomically(config.output / "answers.jsonl",
                         lambda p: p.write_text("".join(json.dumps(row) + "\n" for row in per_row)))
        print(table)
    return result


def summarise(right: dict[str, list[float]]) -> dict:
    """Per model accuracy and hallucination rate (1 - accuracy) with 95% CIs; per aligned model the paired gain and
    the rows fixed and broken against the base."""
    base = right["base"]
    summary = {}
    for name, values in right.items():
        accuracy = mean_ci(values)
        hallucination = {"mean": 1 - accuracy["mean"], "ci_low": 1 - accuracy["ci_high"],
                         "ci_high": 1 - accuracy["ci_low"], "n": accuracy["n"]}
        entry: dict[str, Any] = {"accuracy": accuracy, "hallucination_rate": hallucination}
        if name != "base":
            entry["gain"] = mean_ci([a - b for a, b in zip(values, base)])
            entry["fixed"] = sum(1 for a, b in zip(values, base) if a > b)
            entry["broken"] = sum(1 for a, b in zip(values, base) if a < b)
        summary[name] = entry
    return summary


def markdown(result: dict) -> str:
    """One table: accuracy, hallucination rate, gain against the base (95% CIs), rows fixed and broken."""
    lines = [f"# QA accuracy on {result['rows']} rows of {result['data']}", "",
             "| model | accuracy (95% CI) | hallucination rate | gain vs base (95% CI) | fixed | broken |",
             "|---|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        a, h = s["accuracy"], s["hallucination_rate"]
        row = f"| `{name}` | {a['mean']:.3f} ({a['ci_low']:.3f} .. {a['ci_high']:.3f}) | {h['mean']:.3f} |"
        if name == "base":
            lines.append(row + " - | - | - |")
        else:
            g = s["gain"]
            lines.append(row + f" {g['mean']:+.3f} ({g['ci_low']:+.3f} .. {g['ci_high']:+.3f}) | {s['fixed']} | "
                         f"{s['broken']} |")
    return "\n".join(lines) + "\n"
