"""`mmalign reward train`: fine-tune a reward model on Pick-a-Pic pairs with the Bradley-Terry objective.

    loss = -(p log sigmoid(s_0 - s_1) + (1 - p) log sigmoid(s_1 - s_0)),   p = label_0 (a tie is p = 0.5)

with s the scorer's output (`rewards.Scorer`): PickScore's objective (cross-entropy of the softmax over the two
images' `exp(t) * cos` scores against the label, ties split evenly) for the CLIP kind, and the same loss
through an aesthetic head. Before and after training the held-out pairs (--eval-data, or a seeded
--eval-fraction of --data) are scored: pair accuracy, Bradley-Terry loss and expected calibration error
go into eval.json. The run directory is itself a scorer folder: `--scorer RUN_DIR` loads the result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import Subset

from mmalign.config import option
from mmalign.data import ALLOW_OUTSIDE_PATHS
from mmalign.errors import ConfigError, DataError
from mmalign.objectives import bradley_terry_loss
from mmalign.plots import plot_metrics
from mmalign.trainer import TrainConfig, Trainer

from ..data import PreferencePairs, collate_pairs
from .score import describe, pair_metrics, score_pairs
from .scorers import Scorer, ScorerOptions, save_scorer


@dataclass
class Config(ScorerOptions, TrainConfig):
    """Reward-model training settings (plus the scorer and the shared training-loop settings)."""

    data: str = option(None, "Pick-a-Pic style preference pairs: .parquet/.jsonl file, folder, or hub id")
    split: str = option("train", "split to read from a dataset folder or hub id")
    allow_outside_paths: bool = option(False, ALLOW_OUTSIDE_PATHS)
    eval_data: str | None = option(None, "held-out Pick-a-Pic pairs (default: --eval-fraction of --data)")
    eval_split: str = option("test", "split of --eval-data to read from a dataset folder or hub id")
    eval_fraction: float = option(0.1, "without --eval-data: the share of --data held out (seeded by --seed)")
    tune: Literal["all", "visual", "head"] = option("all", "what learns: all (both towers and the logit scale, or "
                                                    "image tower and head), visual (image tower, logit scale, head), "
                                                    "head (an aesthetic head on frozen embeddings)")
    eval_batch_size: int = option(64, "pairs per forward when scoring the held-out pairs")
    learning_rate: float = option(3e-6, "peak learning rate (PickScore fine-tuned CLIP-H at 3e-6)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ValueError("--data (Pick-a-Pic style preference pairs) is required")
        if self.eval_data is None and not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")


def bradley_terry_step(scorer: Scorer, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """One micro-step on pairs [B,2,3,R,R] in [-1, 1] stored as (jpg_0, jpg_1) with soft labels label_0."""
    images = (batch["pixel_values"] + 1) / 2
    n = images.shape[0]
    scores = scorer(torch.cat([images[:, 0], images[:, 1]]), list(batch["caption"]) * 2)
    first, second, label = scores[:n], scores[n:], batch["label_0"].to(scores.dtype)
    loss = bradley_terry_loss(first, second, soft_label=label).mean()
    decided = (label != 0.5).to(scores.dtype)
    correct = ((first - second).detach() * (label - 0.5) > 0).to(scores.dtype)
    metrics = {"pair_acc": (correct * decided).sum() / decided.sum().clamp_min(1),
               "reward_margin": ((first - second).detach() * torch.sign(label - 0.5)).mean()}
    return loss, metrics


def select_trainable(scorer: Scorer, tune: str) -> None:
    """requires_grad for --tune. CLIP score: all = both towers and the logit scale, visual = image tower and logit
    scale. Aesthetic score: all and visual = image tower and head, head = the head alone."""
    if tune == "head" and scorer.head is None:
        raise ConfigError("--tune head trains an aesthetic head; this scorer is of the clip kind "
                          "(pass --kind aesthetic)")
    scorer.requires_grad_(False)
    if scorer.head is not None:
        scorer.head.requires_grad_(True)
        scorer.clip.visual.requires_grad_(tune != "head")
    else:
        (scorer.clip if tune == "all" else scorer.clip.visual).requires_grad_(True)
        scorer.clip.logit_scale.requires_grad_(True)


def split_pairs(config: Config, resolution: int) -> tuple[Any, Any]:
    """Training and held-out pairs (stored order, ties kept): --eval-data, or a seeded share of --data."""
    pairs = PreferencePairs(config.data, resolution, config.split, as_stored=True,
                            allow_outside_paths=config.allow_outside_paths)
    if config.eval_data is not None:
        return pairs, PreferencePairs(config.eval_data, resolution, config.eval_split, as_stored=True,
                                      allow_outside_paths=config.allow_outside_paths)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed)).tolist()
    held = max(1, round(config.eval_fraction * len(pairs)))
    if held >= len(pairs):
        raise DataError(f"{config.data}: {len(pairs)} pairs leave none to train on after holding out {held}")
    return Subset(pairs, order[held:]), Subset(pairs, order[:held])


def run(config: Config) -> dict[str, Any]:
    """Evaluate, train, evaluate again; writes the scorer, eval.json and curves.png into config.output."""
    trainer = Trainer(config)
    torch.manual_seed(config.seed)  # new parameters (a model from scratch, a fresh head) start the same every run
    scorer = config.load_scorer(device=trainer.device)
    if not isinstance(scorer, Scorer):
        raise ConfigError(f"--scorer {config.scorer}: `reward train` fine-tunes one open_clip scorer, not a spec")
    select_trainable(scorer, config.tune)
    train_pairs, held_pairs = split_pairs(config, scorer.image_size)
    print_ = trainer.accelerator.print
    print_(f"{len(train_pairs)} training pairs, {len(held_pairs)} held-out pairs")

    def evaluate(model: Scorer) -> dict[str, float]:
        return pair_metrics(*score_pairs(model, held_pairs, config.eval_batch_size))

    result: dict[str, Any] = {}
    if trainer.resume_from is None and trainer.is_main:
        result["before"] = evaluate(scorer)
        print_(f"held-out before: {describe(result['before'])}")
    history = trainer.fit(scorer, train_pairs, collate_pairs, bradley_terry_step, save_model=save_scorer)
    if trainer.runs_model:
        result["after"] = evaluate(scorer)
    if trainer.is_main:
        print_(f"held-out after:  {describe(result['after'])}")
        (config.output / "eval.json").write_text(json.dumps(result, indent=2))
        plot_metrics(history, ["loss", "pair_acc", "reward_margin", "lr"], config.output / "curves.png",
                     title="reward model (Bradley-Terry)")
    result["history"] = history
    return result

