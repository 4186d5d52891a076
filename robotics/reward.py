"""Train a reward model on segment preferences: `mmalign robotics reward --data LABELLED_FOLDER --output RUN`.

The model is an MLP r(s, a), an ensemble of them (`--members K`, independent initialisations on the
same batches, prediction = the members' mean), or PEARL's Gaussian reward (`--gaussian`, trained with
RRL, see `rrl.py`). A non-Gaussian model is trained with the core Bradley-Terry objective on the
segment returns R = sum_t r(s_t, a_t): -(p log s(R_w - R_l) + (1-p) log s(R_l - R_w)), p = P(w preferred)
from the pair record (1 for a hard label, 0.5 for "equal", anything between for a soft label).

The held-out evaluation (`--eval-data`, a trajectory file of the same task) fragments those
trajectories into segments of the training length, labels random pairs of them with the oracle
teacher, and reports the pair accuracy and the Spearman correlation of predicted and true return
over segments and over whole trajectories. Every input (the labelled folder, `--eval-data`) is read
and checked before training starts. The run folder gets reward_model.safetensors/.json, eval.json,
metrics.jsonl, curves.png and reward_vs_return.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from mmalign import run_folder
from mmalign.config import option
from mmalign.errors import DataError
from mmalign.objectives import bradley_terry_loss
from mmalign.plots import plot_metrics, plot_scatter
from mmalign.reference import unwrap
from mmalign.trainer import TrainConfig, Trainer

from .pairs import PairDataset, Pairs, SegmentArrays, label_pairs
from .reward_models import RewardArch, RewardModel, pair_accuracy, spearman
from .rrl import rrl_loss
from .teachers import teacher
from .trajectories import Trajectories


@dataclass
class RewardConfig(TrainConfig):
    """Reward-model settings (plus the shared training-loop settings); `pearl` uses them too."""

    hidden: int = option(256, "width of each hidden layer")
    layers: int = option(3, "hidden layers per member")
    members: int = option(1, "ensemble members")
    gaussian: bool = option(False, "Gaussian reward trained with PEARL's RRL instead of plain Bradley-Terry")
    rrl_weight: float = option(0.1, "RRL: weight of the variance regulariser")
    prior_std: float = option(1.0, "RRL: the prior standard deviation sigma0 of each step's reward")
    eval_data: str | None = option(None, "held-out trajectory file (.npz) for pair accuracy and Spearman",
                                     reads="file")
    eval_pairs: int = option(2000, "oracle-labelled held-out segment pairs for the accuracy")
    max_steps: int = option(2000, "optimizer steps")
    batch_size: int = option(64, "pairs per step")
    learning_rate: float = option(3e-4, "Adam learning rate")
    warmup_steps: int = option(0, "linear warm-up steps")
    checkpoint_every: int = option(0, "checkpoint every N steps (0: at the end only)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("members", "hidden", "layers", "eval_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.prior_std <= 0 or self.rrl_weight < 0:
            raise ValueError("prior_std must be positive and rrl_weight not negative")


@dataclass
class Config(RewardConfig):
    """Settings of `mmalign robotics reward`."""

    data: str = option(None, "folder written by `mmalign robotics label` (segments.npz and pairs.jsonl)",
                     reads="folder")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ValueError("--data (a folder with segments.npz and pairs.jsonl) is required")


def reward_step(model: RewardModel, batch: dict[str, torch.Tensor], generator: torch.Generator,
                config: RewardConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Bradley-Terry (or RRL) loss of a batch of pairs, averaged over pairs and ensemble members."""
    mean_w, log_std_w = model(batch["obs_w"], batch["act_w"])
    mean_l, log_std_l = model(batch["obs_l"], batch["act_l"])
    label, inner = batch["label"], unwrap(model)  # the model arrives wrapped for DDP
    assert isinstance(inner, RewardModel)
    if inner.arch.gaussian:
        noise_w = torch.randn(mean_w.shape, generator=generator, device=mean_w.device)
        noise_l = torch.randn(mean_l.shape, generator=generator, device=mean_l.device)
        losses = rrl_loss(mean_w, log_std_w, mean_l, log_std_l, noise_w, noise_l, label,
                          prior_std=config.prior_std, weight=config.rrl_weight)
    else:
        losses = bradley_terry_loss(mean_w.sum(-1), mean_l.sum(-1), label)
    margin = (mean_w.mean(0).sum(-1) - mean_l.mean(0).sum(-1)).detach()
    strict = label != 0.5
    metrics = {"pair_acc": ((margin > 0) == (label > 0.5))[strict].float().mean() if strict.any() else margin * 0}
    if log_std_w is not None:
        metrics["sigma"] = log_std_w.detach().exp().mean()
    return losses.mean(), metrics


def train_reward_model(config: RewardConfig, segments: SegmentArrays, pairs: Pairs, trainer: Trainer | None = None,
                       model: RewardModel | None = None) -> tuple[RewardModel, list[dict[str, float]]]:
    """Fit a reward model to `pairs` over `segments` with the shared trainer (a new one, or `model` trained further,
    its input standardisation kept); saves it into config.output."""
    trainer = trainer or Trainer(config)
    torch.manual_seed(config.seed)
    if model is None:
        arch = RewardArch(segments.observations.shape[-1], segments.actions.shape[-1], config.hidden, config.layers,
                          config.members, config.gaussian)
        model = RewardModel(arch)
        model.normalize.fit(np.concatenate([segments.observations, segments.actions], axis=-1))
    model.to(trainer.device)
    history = trainer.fit(model, PairDataset(segments, pairs), default_collate,
                          lambda m, b, g: reward_step(m, b, g, config), save_model=lambda m, out: m.save(out))
    return model.eval(), history


def evaluate(model: RewardModel, held_out: Trajectories, segment_length: int, num_pairs: int,
             seed: int = 0) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Held-out pair accuracy (oracle labels), Spearman over segments and trajectories; returns (report, R_hat, R)."""
    segments = held_out.fragment(segment_length, max(num_pairs, len(held_out), 2), seed=seed)
    pairs = label_pairs(segments, num_pairs, teacher("oracle"), seed=seed)
    predicted, true = model.returns(segments), segments.returns()
    report = {"pair_accuracy": pair_accuracy(predicted, pairs), "spearman_segments": spearman(predicted, true),
              "spearman_trajectories": spearman(model.returns(held_out), held_out.returns()),
              "held_out_trajectories": len(held_out), "held_out_pairs": len(pairs)}
    return report, predicted, true


def load_labelled(folder: str | Path) -> tuple[Trajectories, Pairs]:
    """The segments and pairs that `mmalign robotics label` wrote into `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"labelled folder {folder} does not exist")
    missing = [name for name in ("segments.npz", "pairs.jsonl") if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder} holds no {' and no '.join(missing)}; give a folder written by "
                        "`mmalign robotics label`")
    segments = Trajectories.load(folder / "segments.npz")
    return segments, Pairs.load(folder / "pairs.jsonl", segments)


def load_held_out(path: str | None, task: str, segment_length: int) -> Trajectories | None:
    """The --eval-data trajectories, checked against the task and segment length the reward model learns (or None)."""
    if not path:
        return None
    held_out = Trajectories.load(path)
    if held_out.task != task:
        raise DataError(f"{path}: held-out trajectories of {held_out.task}; the reward model learns {task}")
    if held_out.horizon < segment_length:
        raise DataError(f"{path}: held-out trajectories of {held_out.horizon} steps are shorter than the "
                        f"{segment_length}-step segments the reward model learns from")
    if len(held_out) < 2:
        raise DataError(f"{path}: 1 held-out trajectory; the rank correlation needs at least 2")
    return held_out


def check_batch(pairs: int, config: RewardConfig, trainer: Trainer, source: str) -> None:
    """DataError unless `pairs` fill one global batch (--batch-size on every process)."""
    batch = config.batch_size * trainer.accelerator.num_processes
    if pairs < batch:
        raise DataError(f"{source}: {pairs} pair(s), fewer than one batch of {batch} (--batch-size "
                        f"{config.batch_size} on {trainer.accelerator.num_processes} process(es)); nothing was trained")


def report_reward_model(config: RewardConfig, trainer: Trainer, model: RewardModel, held_out: Trajectories | None,
                        segment_length: int, history: list[dict[str, float]],
                        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate on the held-out trajectories (when given; every process when the model is sharded), write eval.json
    and the pictures (main process); returns the report."""
    report: dict[str, Any] = dict(extra or {})
    if held_out is not None and trainer.runs_model:
        scores, predicted, true = evaluate(model if trainer.model_sharded else model.cpu(), held_out, segment_length,
                                           config.eval_pairs, seed=config.seed + 1)
        report.update(scores)
        if trainer.is_main:
            plot_scatter(true, predicted, config.output / "reward_vs_return.png", "true return", "predicted return",
                         f"held-out segments, Spearman {scores['spearman_segments']:.2f}")
    if trainer.is_main:
        plot_metrics(history, ["loss", "pair_acc", "sigma"], config.output / "curves.png")
        (config.output / "eval.json").write_text(json.dumps(report, indent=1))
    return report


def run(config: Config) -> dict[str, Any]:
    """Check every input, train on the labelled folder, evaluate on the held-out trajectories, write the run folder."""
    with run_folder.claim(config.output, resuming=config.resume is not None):
        trainer = Trainer(config)  # first: the launch's processes join before the data checks share their work
        segments, pairs = load_labelled(config.data)
        held_out = load_held_out(config.eval_data, segments.task, segments.horizon)
        check_batch(len(pairs), config, trainer, str(Path(config.data) / "pairs.jsonl"))
        trainer.accelerator.print(f"{len(pairs)} pairs over {len(segments)} {segments.task} segments of "
                                  f"{segments.horizon} steps (teacher: {pairs.teacher or 'unknown'})")
        model, history = train_reward_model(config, segments, pairs, trainer)
        report = report_reward_model(config, trainer, model, held_out, segments.horizon, history,
                                     {"train_pairs": len(pairs)})
    trainer.accelerator.print(json.dumps(report, indent=1))
    return report
