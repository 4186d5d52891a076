"""`mmalign reward relabel`: rewrite a Pick-a-Pic dataset's labels with a reward model (AI feedback).

    label_0 = 1 if s_0 >= s_1 else 0,   or 0.5 (a tie) when |s_0 - s_1| < tie_margin

With tie_margin 0 this is the official Diffusion-DPO AI-feedback rule (`--choice_model`: the pair is flipped
only when the scorer rates jpg_1 strictly higher). The new dataset keeps every row and column, with images
embedded as bytes (so it does not depend on the source folder), adds label_0_original, score_0 and score_1,
and goes to a new or empty folder: the source is never touched. report.json holds the agreement of the scorer
with the original labels (accuracy on non-tie pairs, Bradley-Terry loss, ECE) and how many labels changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mmalign import run_folder
from mmalign.config import option
from mmalign.data import ALLOW_OUTSIDE_PATHS

from ..data import PreferencePairs, image_bytes, write_atomically
from .score import describe, pair_metrics, score_pairs
from .scorers import ScorerOptions

OUTPUT_FILE = "pairs.parquet"


def ai_feedback_labels(first: torch.Tensor, second: torch.Tensor, tie_margin: float = 0.0) -> torch.Tensor:
    """label_0 from scores: 1 when s_0 >= s_1, else 0; 0.5 when |s_0 - s_1| < tie_margin."""
    labels = (first >= second).double()
    return torch.where((first - second).abs() < tie_margin, torch.full_like(labels, 0.5), labels)


@dataclass
class Config(ScorerOptions):
    """Settings of `mmalign reward relabel`."""

    data: str = option(None, "Pick-a-Pic style pairs to relabel: .parquet/.jsonl file, folder, or hub id")
    split: str = option("train", "split to read from a dataset folder or hub id")
    allow_outside_paths: bool = option(False, ALLOW_OUTSIDE_PATHS)
    output: Path = option(None, f"folder for {OUTPUT_FILE} and report.json: a new or empty one")
    tie_margin: float = option(0.0, "score gap below which a pair becomes a tie (0: the official rule, no ties)")
    batch_size: int = option(64, "images per scorer forward")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "precision of the scorer")
    cpu: bool = option(False, "score on the CPU even when a GPU is present")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data or self.output is None:
            raise ValueError("--data and --output are required")
        self.output = Path(self.output)
        if self.tie_margin < 0:
            raise ValueError(f"tie_margin must not be negative, got {self.tie_margin}")


def run(config: Config) -> dict:
    """Score every pair, write the relabelled dataset and report.json into config.output, a folder of its own (new or
    empty, `mmalign.run_folder`); returns the report."""
    with run_folder.claim(config.output, resuming=False):
        return relabel(config)


def relabel(config: Config) -> dict:
    """The body of `run`, in the claimed output folder."""
    device = "cuda" if torch.cuda.is_available() and not config.cpu else "cpu"
    scorer = config.load_scorer(config.mixed_precision, device)
    pairs = PreferencePairs(config.data, scorer.image_size, config.split, as_stored=True,
                            allow_outside_paths=config.allow_outside_paths)
    first, second, original = score_pairs(scorer, pairs, config.batch_size)
    labels = ai_feedback_labels(first, second, config.tie_margin)
    decided = original != 0.5
    report: dict[str, Any] = {
        "source": config.data, "pairs": len(pairs),
        "agreement_with_original": pair_metrics(first, second, original),
        "changed": int((labels != original.double()).sum()),
        "flipped": int((decided & (labels != 0.5) & (labels != original.double())).sum()),
        "ties": {"original": int((~decided).sum()), "new": int((labels == 0.5).sum())},
    }

    def embed(record: dict, index: int) -> dict:
        return {"jpg_0": image_bytes(record["jpg_0"], pairs.root, config.allow_outside_paths),
                "jpg_1": image_bytes(record["jpg_1"], pairs.root, config.allow_outside_paths),
                "label_0": float(labels[index]), "label_0_original": float(original[index]),
                "score_0": float(first[index]), "score_1": float(second[index])}

    relabelled = pairs.records.map(embed, with_indices=True, desc="relabel")
    write_atomically(config.output / OUTPUT_FILE, lambda tmp: relabelled.to_parquet(str(tmp)))
    (config.output / "report.json").write_text(json.dumps(report, indent=2))
    print(f"relabelled {len(pairs)} pairs from {config.data}: {report['changed']} labels changed "
          f"({report['flipped']} flipped), {report['ties']['new']} ties; wrote {config.output / OUTPUT_FILE}")
    print(f"agreement with the original labels: {describe(report['agreement_with_original'])}")
    return report
