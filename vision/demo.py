"""The embedded vision demo: pairs built by the tiny LLaVA itself, mDPO, held-out QA accuracy before and after.

`assets/tiny-llava` learned the world with a colour prior (`scripts/build_tiny_llava.py`) and hallucinates the
usual colour or shape where a scene breaks it. The demo asks it `questions` of the world (unbiased scenes), builds
BDHS pairs (chosen = the true answer, rejected = the model's own answer with ~1% of its image tokens visible, which
is its language prior speaking), fine-tunes it with mDPO (the DPO loss, the chosen answer under the real vs a
corrupted image, and the anchor -log sigmoid(beta r_w); full fine-tune against a frozen copy), and reports greedy QA
accuracy on 500 held-out questions (1 - accuracy = hallucination rate) before and after with 95% CIs, the paired
gain, and accuracy per question kind. `--builder rdpo|mia-dpo` builds the pairs with another builder instead.

    mmalign vision demo [--output runs/vision-demo] [--visual-term none --anchor-weight 0 ...]
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmalign import run_folder
from mmalign.config import option
from mmalign.stats import comparison_lines, mean_ci

from . import dpo, models
from .builders import bdhs, mia_dpo, rdpo
from .data import write_rows
from .evaluate import correct
from .world import COLOURS, COUNTS, SHAPES, prompt_text, qa_rows

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclass
class Config(dpo.Config):
    """Demo settings: mDPO defaults for the tiny model, the pair building and the evaluation."""

    model: str = option(str(ASSETS / "tiny-llava"), "the embedded tiny LLaVA")
    data: str = option(None, "pairs to train on (default: built into OUTPUT/<builder>/train.parquet, reused there on "
                             "--resume)")
    output: Path = option(None, "run directory (default: runs/vision-demo-<date-time>)")
    builder: Literal["bdhs", "rdpo", "mia-dpo"] = option(
        "bdhs", "how the pairs are built: BDHS (image-blind answers), rDPO (answers given the most similar other "
                "image, kept as v' for --visual-term retrieved) or MIA-DPO (two-image sequence prompts, wrong answers "
                "that looked at the other image)")
    questions: int = option(2048, "world questions (seed 1) the pairs are built from")
    eval_questions: int = option(500, "held-out world questions (seed 10000)")
    full: bool = option(True, "full fine-tune against a frozen copy")
    beta: float = option(0.5, "KL strength beta")
    learning_rate: float = option(3e-4, "peak learning rate")
    max_steps: int = option(512, "optimizer steps")
    batch_size: int = option(16, "pairs per step")
    visual_term: Literal["none", "retrieved", "corrupted"] = option("corrupted", "mDPO's conditional term (corrupted "
                                                                               "image); none to drop it")
    anchor_weight: float = option(1.0, "weight of mDPO's anchor")
    checkpoint_every: int = option(0, "checkpoint every N steps (0: only the final model)")

    def __post_init__(self) -> None:
        if self.output is None:
            self.output = Path("runs") / time.strftime("vision-demo-%Y%m%d-%H%M%S")
        self.data = self.data or str(built_pairs(self))
        super().__post_init__()


def built_pairs(config: Config) -> Path:
    """Where the demo builds its pairs when no --data is given: OUTPUT/<builder>/train.parquet."""
    return Path(config.output) / config.builder / "train.parquet"


def build_pairs(model, processor, config: Config) -> dict:
    """Pairs from `questions` world rows (one-word answers) by `config.builder`, written to config.data; the report."""
    qa = qa_rows(config.questions, seed=1)
    sources = [{"prompt": prompt_text(r["question"]), "chosen": f" {r['answer']} </s>", "images": [r["image"]]}
               for r in qa]
    if config.builder == "bdhs":
        settings = bdhs.Config(model=config.model, data="-", output=Path(config.data).parent, max_new_tokens=2,
                               seed=config.seed)
        rows, report = bdhs.build_rows(model.eval(), processor, sources, settings)
    elif config.builder == "rdpo":
        rows, report = rdpo.build_rows(model.eval(), processor, sources, {*COLOURS, *SHAPES, *COUNTS, "nothing"})
    else:
        rows, report = mia_dpo.build_rows(model.eval(), processor, qa, "sequence", 2, seed=config.seed)
    write_rows(rows, Path(config.data))
    return {k: v for k, v in report.items() if k != "examples"}


def by_kind(rows: list[dict], right: list[float]) -> dict[str, float]:
    """Accuracy per question kind ('what colour is', 'what shape is', 'how many', 'what is in')."""
    kinds: dict[str, list[float]] = {}
    for row, r in zip(rows, right):
        kinds.setdefault(" ".join(row["question"].split()[:3]), []).append(r)
    return {kind: sum(v) / len(v) for kind, v in sorted(kinds.items())}


def load_aligned(config: Config):
    """The trained model: the saved full model, or the base with the run's LoRA merged."""
    if config.full:
        return models.load(config.output)[0]
    from peft import PeftModel

    return PeftModel.from_pretrained(models.load(config.model)[0], str(config.output)).merge_and_unload()


def run(config: Config) -> dict:
    """Evaluate the base model, build pairs (unless given), train, evaluate the aligned model; print and save.

    The output folder is this run's for all of it (the pairs go into OUTPUT/<builder>/, the training into OUTPUT);
    the model, and pairs given with --data, are checked before anything is evaluated or written."""
    with run_folder.claim(config.output, resuming=config.resume is not None):
        start = time.time()
        model, processor = models.load(config.model)
        build = Path(config.data) == built_pairs(config) and not Path(config.data).is_file()
        if not build:
            dpo.load_pairs(config, processor)
        held_out = qa_rows(config.eval_questions, seed=10_000)
        base = correct(model, processor, held_out)
        pairs = build_pairs(model, processor, config) if build else None
        history = dpo.run(config)
        aligned = correct(load_aligned(config), processor, held_out)
        result = {"metric": "greedy QA accuracy on held-out world questions", "pairs": pairs,
                  "base": mean_ci(base), "aligned": mean_ci(aligned),
                  "gain": mean_ci([a - b for a, b in zip(aligned, base)]),
                  "by_kind": {"base": by_kind(held_out, base), "aligned": by_kind(held_out, aligned)},
                  "late_implicit_acc": sum(h["implicit_acc"] for h in history[-32:]) / len(history[-32:]),
                  "seconds": round(time.time() - start, 1)}
        (Path(config.output) / "demo_result.json").write_text(json.dumps(result, indent=2))
        print(report(result, Path(config.output)))
    return result


def report(result: dict, output: Path) -> str:
    """Both accuracies with their CIs, the paired gain, accuracy per question kind, where the files are."""
    kinds = [f"  {kind:<15} {base:.2f} -> {result['by_kind']['aligned'][kind]:.2f}"
             for kind, base in result["by_kind"]["base"].items()]
    return "\n".join([
        f"held-out QA accuracy over {result['base']['n']} world questions (1 - hallucination rate):",
        *comparison_lines(result["base"], result["aligned"], result["gain"]), *kinds,
        f"  {result['seconds']:.0f}s; results, pairs and curves in {output}",
    ])
