"""`mmalign reward score`: a reward model's scores of images, or its agreement with labelled Pick-a-Pic pairs.

On pairs, P(jpg_0 preferred) = sigmoid(s_0 - s_1) is compared with label_0: pair accuracy on the non-tie
pairs, the Bradley-Terry loss with ties as soft labels 0.5, and the expected calibration error of P over
both orientations of every pair (P against label_0 and 1 - P against 1 - label_0), so a scorer that is
right 70% of the time when it says 0.7 has ECE 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from mmalign.config import option
from mmalign.data import ALLOW_OUTSIDE_PATHS
from mmalign.errors import ConfigError, DataError, RunFolderError
from mmalign.objectives import bradley_terry_loss
from mmalign.stats import expected_calibration_error, mean_ci

from ..data import PreferencePairs, collate_pairs, decode_image, image_file, read_prompts, write_atomically
from .scorers import RewardModel, ScorerOptions

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@torch.no_grad()
def score_pairs(scorer: RewardModel, pairs: Dataset,
                batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores s_0, s_1 of each pair's two images and label_0, from PreferencePairs(..., as_stored=True) or a subset."""
    first, second, labels = [], [], []
    for batch in DataLoader(pairs, batch_size=batch_size, collate_fn=collate_pairs):
        images = (batch["pixel_values"] + 1) / 2
        scores = scorer.score(torch.cat([images[:, 0], images[:, 1]]), list(batch["caption"]) * 2, batch_size)
        first.append(scores[:len(images)])
        second.append(scores[len(images):])
        labels.append(batch["label_0"])
    return torch.cat(first), torch.cat(second), torch.cat(labels)


def pair_metrics(first: torch.Tensor, second: torch.Tensor, label_0: torch.Tensor) -> dict[str, float]:
    """Accuracy (non-tie pairs), Bradley-Terry loss (ties as 0.5) and ECE of P(jpg_0 preferred) = sigmoid(s_0 - s_1)."""
    p = torch.sigmoid(first.double() - second.double())
    label_0 = label_0.double()
    decided = label_0 != 0.5
    agree = ((p - 0.5) * (label_0 - 0.5) > 0).double() + 0.5 * (p == 0.5).double()
    return {
        "pairs": int(len(p)), "ties": int((~decided).sum()),
        "accuracy": float(agree[decided].mean()) if bool(decided.any()) else float("nan"),
        "bt_loss": float(bradley_terry_loss(first.double(), second.double(), soft_label=label_0).mean()),
        "ece": expected_calibration_error(torch.cat([p, 1 - p]), torch.cat([label_0, 1 - label_0])),
    }


def describe(metrics: dict[str, float]) -> str:
    """One line of pair metrics."""
    return (f"accuracy {metrics['accuracy']:.3f} on {metrics['pairs'] - metrics['ties']} non-tie pairs, "
            f"Bradley-Terry loss {metrics['bt_loss']:.3f}, ECE {metrics['ece']:.3f}")


@dataclass
class Config(ScorerOptions):
    """Settings of `mmalign reward score`."""

    images: str | None = option(None, "an image file, or a folder of images (sorted by name) to score")
    prompts: str | None = option(None, "with --images: text file of one prompt per image, or one prompt for all")
    data: str | None = option(None, "Pick-a-Pic pairs: report the scorer's accuracy and calibration on their labels")
    split: str = option("train", "split to read from a dataset folder or hub id")
    allow_outside_paths: bool = option(False, ALLOW_OUTSIDE_PATHS)
    output: Path | None = option(None, "JSONL file of the scores to write (must not exist)")
    writes_file: ClassVar[bool] = True  # --output is one new file, not a run folder
    batch_size: int = option(64, "images per forward")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "precision of the scorer")
    cpu: bool = option(False, "score on the CPU even when a GPU is present")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.images is None) == (self.data is None):
            raise ValueError("give either --images (with --prompts) or --data (Pick-a-Pic pairs)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


def image_files(path: str | Path) -> list[Path]:
    """One image file, or the image files of a folder sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"--images {path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--images {path}: the folder holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def load_images(files: list[Path]):
    """RGB PIL images; a file that does not decode (or a folder) raises DataError naming it."""
    images = []
    for file in files:
        data = image_file(file)
        try:
            images.append(decode_image(data).convert("RGB"))
        except Exception as err:  # noqa: BLE001 - any decoding failure is reported with its file
            raise DataError(f"image {file} cannot be read ({err})") from None
    return images


def check_new_file(path: Path | None) -> None:
    """Refuse an --output that exists: scores go to a new file, nothing is overwritten."""
    if path is not None and (path.exists() or path.is_symlink()):
        raise RunFolderError(f"--output {path} already exists; choose a new file")


def image_prompts(config: Config, count: int) -> list[str] | None:
    """The --prompts for `count` images: one per image, or one for all (None without --prompts)."""
    if config.prompts is None:
        return None
    prompts = read_prompts(config.prompts)
    if len(prompts) == 1:
        return prompts * count
    if len(prompts) != count:
        raise DataError(f"--prompts {config.prompts} has {len(prompts)} prompts for {count} images in "
                        f"{config.images}; give one per image (in sorted file-name order) or a single one")
    return prompts


def run(config: Config) -> dict:
    """Score images (or pairs), print a summary, and write per-item scores as JSONL to --output."""
    check_new_file(config.output)
    if config.images is not None:  # read and checked before the scorer loads
        files = image_files(config.images)
        prompts = image_prompts(config, len(files))
        images = load_images(files)
    device = "cuda" if torch.cuda.is_available() and not config.cpu else "cpu"
    scorer = config.load_scorer(config.mixed_precision, device)
    rows: list[dict[str, Any]]
    if config.data is not None:
        pairs = PreferencePairs(config.data, scorer.image_size, config.split, as_stored=True,
                                allow_outside_paths=config.allow_outside_paths)
        first, second, labels = score_pairs(scorer, pairs, config.batch_size)
        summary = pair_metrics(first, second, labels)
        print(f"{config.data}: {describe(summary)}")
        rows = [{"index": int(i), "score_0": float(a), "score_1": float(b), "label_0": float(y)}
                for i, a, b, y in zip(pairs.rows, first, second, labels)]
    else:
        if prompts is None and scorer.needs_prompts:
            raise ConfigError("--prompts is required: the CLIP score compares each image with its prompt")
        scores = scorer.score(images, prompts, config.batch_size)
        summary = mean_ci(scores) if len(scores) > 1 else {"mean": float(scores[0]), "n": 1}
        print(f"{len(files)} images, mean score {summary['mean']:.4f}"
              + (f" (95% CI {summary['ci_low']:.4f} .. {summary['ci_high']:.4f})" if len(scores) > 1 else ""))
        rows = [{"image": str(f), "prompt": prompts[i] if prompts else None, "score": float(s)}
                for i, (f, s) in enumerate(zip(files, scores))]
    if config.output is not None:
        text = "".join(json.dumps(row) + "\n" for row in rows)
        write_atomically(config.output, lambda tmp: tmp.write_text(text))
    return summary
