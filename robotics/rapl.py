"""RAPL (Tian et al. 2024): align a visual encoder with preferences; reward = OT feature matching to a demonstration.

`mmalign robotics rapl --data TRAIN.npz --eval-data HELD_OUT.npz --output RUN` (trajectory files with frames).

Reward. With the embedded frames phi(o_t) of a trajectory and phi(o+_t') of a preferred demonstration,
the cost C[t, t'] = 1 - cos(phi(o_t), phi(o+_t')) and the entropic optimal transport plan P* between
uniform marginals (POT's batched log-domain Sinkhorn, regularisation `ot_reg`) give a reward per
frame r_t = -sum_t' P*[t, t'] C[t, t'] and a trajectory reward r(tau; tau+) = sum_t r_t = -<P*, C>; against
several demonstrations, the best one counts. Gradients flow through C with P* held fixed (the envelope
theorem: the gradient of the regularised OT value with respect to C is P*).

Alignment. Triplets of training trajectories are ranked by their true return (the person a simulation
stands in for): positive > neutral > negative. With the positive as the anchor (the research code,
thomasrantian/mvp), the neutral should look closer to it than the negative:
    p = exp r(neu; pos) / (exp r(neu; pos) + exp r(neg; pos)),  loss = -log p
the core Bradley-Terry loss on (r(neu; pos), r(neg; pos)). The research code minimises 1 - p instead;
both are minimised by p -> 1, the log form is the one every other objective here uses.

Encoder: `--backbone` small-cnn (pretrained here as an autoencoder on the training frames, no reward
or preference involved, unless `--backbone-checkpoint` is given), torchvision:NAME or timm:NAME,
plus a linear head to `--embed-dim` (32 as in the research code, which freezes its ImageNet ResNet18;
`--train-backbone` fine-tunes it too). Reported: Spearman between the OT reward and the true return
of held-out trajectories, for the pretrained backbone's features (before alignment) and the aligned
encoder; demonstrations are the highest-return training trajectories unless `--demos` is given.

Best checkpoint. The alignment's loss is the training triplets', not the held-out ranking, so the held-out
Spearman is scored at step 0 and every `--eval-every` steps (the trainer's held-out evaluation, `mmalign.heldout`,
logged as eval/spearman); the best one's training state is kept as checkpoints/best-<step> (named in
checkpoints/best.json), and its encoder is written to best/rapl_encoder.pt and named in eval.json ("best") and
the output. rapl_encoder.pt is the encoder of the last step.

The run folder gets pretrain/ (the small CNN's autoencoder run), then the alignment's checkpoints,
metrics.jsonl, rapl_encoder.pt and best/, eval.json and the pictures; every input file is read and checked
before the first of them is written. `--resume` continues the alignment from the checkpoint it names
(or the latest); the pretraining stage continues from its own latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ot
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from mmalign import run_folder
from mmalign.config import option
from mmalign.errors import ConfigError, DataError
from mmalign.heldout import Evaluation
from mmalign.objectives import bradley_terry_loss
from mmalign.plots import plot_metrics, plot_scatter
from mmalign.trainer import BEST_FILE, TRAINABLE_FILE, TrainConfig, Trainer

from .reward_models import spearman
from .trajectories import Trajectories
from .visual import SmallCNN, VisualEncoder, make_backbone, pretrain_autoencoder

PRETRAIN_BATCH = 64  # frames per autoencoder pretraining step


def ot_rewards_from_cost(cost: torch.Tensor, reg: float = 0.1) -> torch.Tensor:
    """Per-frame rewards [B, F] r_t = -sum_t' P*[t,t'] C[t,t'] for costs [B, F, F'], P* the entropic plan (fixed)."""
    plan = ot.solve_batch(cost.detach(), reg=reg, method="log_sinkhorn", grad="detach").plan
    return -(plan * cost).sum(-1)


def ot_rewards(embedded: torch.Tensor, demo: torch.Tensor, reg: float = 0.1) -> torch.Tensor:
    """Per-frame rewards [B, F] with C[t,t'] = 1 - cos(e_t, d_t') for embeddings [B, F, E] and demos [B, F', E]."""
    return ot_rewards_from_cost(1.0 - F.normalize(embedded, dim=-1) @ F.normalize(demo, dim=-1).transpose(-1, -2), reg)


def trajectory_rewards(embedded: torch.Tensor, demos: torch.Tensor, reg: float = 0.1) -> torch.Tensor:
    """r(tau) [N] = max over demonstrations [D, F', E] of -<P*, C> for embedded trajectories [N, F, E]."""
    n, d = len(embedded), len(demos)
    pairs = ot_rewards(embedded.repeat_interleave(d, 0), demos.repeat(n, 1, 1), reg).sum(-1)
    return pairs.view(n, d).max(-1).values


def rank_triplets(returns: np.ndarray, num: int, seed: int) -> np.ndarray:
    """`num` triplets [num, 3] of distinct trajectories ordered (positive, neutral, negative) by true return."""
    if len(returns) < 3:
        raise ValueError(f"triplets need at least 3 trajectories, got {len(returns)}")
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(len(returns), 3, replace=False) for _ in range(num)])
    order = np.argsort(-returns[picks], axis=1, kind="stable")
    return np.take_along_axis(picks, order, axis=1)


class Triplets(Dataset):
    """Item i: the frames [3, F, H, W, 3] of triplet i, positive first."""

    def __init__(self, frames: np.ndarray, triplets: np.ndarray):
        self.frames, self.triplets = torch.from_numpy(frames), triplets

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.frames[self.triplets[i]]


def triplet_step(encoder: VisualEncoder, frames: torch.Tensor, generator: torch.Generator,
                 reg: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """-log p with p = e^r(neu; pos) / (e^r(neu; pos) + e^r(neg; pos)) on a batch of triplets [B, 3, F, H, W, 3]."""
    embedded = encoder(frames)
    positive, neutral, negative = embedded.unbind(1)
    r_neutral = ot_rewards(neutral, positive, reg).sum(-1)
    r_negative = ot_rewards(negative, positive, reg).sum(-1)
    losses = bradley_terry_loss(r_neutral, r_negative)
    return losses.mean(), {"triplet_acc": (r_neutral > r_negative).float().mean(),
                           "reward_gap": (r_neutral - r_negative).detach().mean()}


@dataclass
class Config(TrainConfig):
    """Settings of `mmalign robotics rapl` (plus the training-loop settings of the alignment)."""

    data: str = option(None, "training trajectory file with frames (.npz, from `collect --frames`)", reads="file")
    eval_data: str = option(None, "held-out trajectory file with frames, for the Spearman correlations",
                            reads="file")
    demos: str | None = option(None, "preferred demonstrations with frames (default: the best training trajectories)",
                               reads="file")
    num_demos: int = option(3, "demonstrations taken from the training data when --demos is not given")
    backbone: str = option("small-cnn", "small-cnn, torchvision:NAME or timm:NAME")
    backbone_checkpoint: str | None = option(None, "state dict for the backbone (small-cnn: skips the pretraining)",
                                             reads="file")
    pretrain_steps: int = option(1500, "small-cnn autoencoder pretraining steps (without a checkpoint)")
    embed_dim: int = option(32, "embedding size of the linear head")
    train_backbone: bool = option(False, "fine-tune the backbone with the head (else the backbone is frozen)")
    triplets: int = option(150, "preference triplets (the research code's number)")
    ot_reg: float = option(0.1, "entropic regularisation of the Sinkhorn plan (cosine costs lie in [0, 2])")
    max_steps: int = option(300, "alignment optimizer steps")
    batch_size: int = option(8, "triplets per step")
    learning_rate: float = option(1e-3, "Adam learning rate (the research code's)")
    checkpoint_every: int = option(0, "checkpoint every N steps (0: at the end only)")
    eval_every: int = option(50, "score the held-out Spearman every N steps and at step 0; the best is kept as best/ "
                                 "(0: only after training)")
    mode: Literal["align", "evaluate"] = option("align", "evaluate: only report the pretrained encoder")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data or not self.eval_data:
            raise ValueError("--data and --eval-data (trajectory files with frames) are required")
        if not self.ot_reg > 0:
            raise ValueError(f"ot_reg must be positive, got {self.ot_reg}")
        for name in ("triplets", "num_demos", "embed_dim", "pretrain_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def frames_of(trajs: Trajectories) -> np.ndarray:
    """The frames of `trajs`; DataError naming their file when they have none."""
    if trajs.frames is None:
        raise DataError(f"{trajs.source}: no frames; collect it with `mmalign robotics collect --frames`")
    return trajs.frames


def load_frames(path: str) -> Trajectories:
    """A trajectory file that must hold frames."""
    trajs = Trajectories.load(path)
    frames_of(trajs)
    return trajs


def pretraining(config: Config) -> bool:
    """Whether the run pretrains its backbone (small-cnn without --backbone-checkpoint)."""
    return config.backbone == "small-cnn" and not config.backbone_checkpoint


def load_inputs(config: Config) -> tuple[Trajectories, Trajectories, Trajectories]:
    """The training, held-out and demonstration trajectories, checked against each other and the settings."""
    train, held_out = load_frames(config.data), load_frames(config.eval_data)
    demos = load_frames(config.demos) if config.demos else train.select(np.argsort(-train.returns())[:config.num_demos])
    shape = frames_of(train).shape
    for path, other in ((config.eval_data, held_out), (config.demos, demos)):
        if other.task != train.task:
            raise DataError(f"{path}: trajectories of {other.task}; --data {config.data} holds {train.task}")
        if frames_of(other).shape[2:] != shape[2:]:
            raise DataError(f"{path}: frames of shape {frames_of(other).shape[2:]}; the frames of --data {config.data} "
                            f"are {shape[2:]}")
    if len(held_out) < 2:
        raise DataError(f"{config.eval_data}: 1 held-out trajectory; the rank correlation needs at least 2")
    if config.mode == "align" and len(train) < 3:
        raise DataError(f"{config.data}: {len(train)} trajectories; ranked triplets need at least 3")
    height, width = shape[2:4]
    if pretraining(config) and (height % 16 or width % 16):
        raise DataError(f"{config.data}: frames of {height}x{width} pixels; pretraining the small CNN needs sides "
                        "divisible by 16 (collect with --size 64, or pass --backbone-checkpoint)")
    if pretraining(config) and shape[0] * shape[1] < PRETRAIN_BATCH:
        raise DataError(f"{config.data}: {shape[0] * shape[1]} frames, fewer than one "
                        f"pretraining batch of {PRETRAIN_BATCH}")
    return train, held_out, demos


def spearman_of(encoder: VisualEncoder, held_out: Trajectories, demos: Trajectories,
                reg: float) -> tuple[float, np.ndarray]:
    """Spearman between the OT reward (best demonstration) and the true return of held-out trajectories."""
    rewards = trajectory_rewards(encoder.embed(frames_of(held_out)), encoder.embed(frames_of(demos)), reg).numpy()
    return spearman(rewards, held_out.returns()), rewards


def pretrained_backbone(config: Config, train: Trajectories) -> tuple[torch.nn.Module, int]:
    """The backbone RAPL starts from: loaded, or for small-cnn without a checkpoint, pretrained as an autoencoder
    into <output>/pretrain (on --resume, from that stage's own last checkpoint)."""
    if not pretraining(config):
        return make_backbone(config.backbone, config.backbone_checkpoint)
    pretrain = dataclasses.replace(config, output=config.output / "pretrain", max_steps=config.pretrain_steps,
                                   batch_size=PRETRAIN_BATCH, learning_rate=1e-3, warmup_steps=0,
                                   resume="latest" if config.resume else None, eval_every=0,
                                   early_stop_patience=0)  # nothing held out scores an autoencoder
    return pretrain_autoencoder(pretrain, frames_of(train)), SmallCNN.features


def align(config: Config, encoder: VisualEncoder, train: Trajectories,
          evaluation: Evaluation | None = None) -> list[dict]:
    """Fit the encoder (head, and the backbone with --train-backbone) to -log p over triplets ranked by true return;
    `evaluation` (held-out Spearman) is scored every eval_every steps and its best checkpoint kept."""
    trainer = Trainer(config)
    encoder.backbone.requires_grad_(config.train_backbone)
    triplets = rank_triplets(train.returns(), config.triplets, config.seed)
    history = trainer.fit(encoder.to(trainer.device), Triplets(frames_of(train), triplets), default_collate,
                          lambda m, b, g: triplet_step(m, b, g, config.ot_reg),
                          save_model=lambda m, out: torch.save(m.state_dict(), Path(out) / "rapl_encoder.pt"),
                          evaluation=evaluation)
    encoder.eval()
    return history


def keep_best(config: Config, encoder: VisualEncoder) -> dict[str, Any]:
    """Write the encoder of the best held-out checkpoint (checkpoints/best.json) to best/rapl_encoder.pt; name it."""
    from safetensors.torch import load_file

    record = json.loads((config.output / "checkpoints" / BEST_FILE).read_text())
    checkpoint = config.output / "checkpoints" / record["folder"]
    state = {name: value.cpu() for name, value in encoder.state_dict().items()}
    state.update(load_file(str(checkpoint / TRAINABLE_FILE)))  # what trained, as it was at the best step
    (config.output / "best").mkdir(exist_ok=True)
    torch.save(state, config.output / "best" / "rapl_encoder.pt")
    return {"step": record["step"], "spearman": record["value"], "checkpoint": str(checkpoint),
            "encoder": str(config.output / "best" / "rapl_encoder.pt")}


def run(config: Config) -> dict[str, Any]:
    """Check every input, pretrain or load the backbone, align the encoder on triplets, report Spearman before/after."""
    with run_folder.claim(config.output, resuming=config.resume is not None):
        if config.mode == "align" and config.triplets < config.batch_size:
            raise ConfigError(f"--triplets {config.triplets} is fewer than one batch (--batch-size "
                              f"{config.batch_size})")
        train, held_out, demos = load_inputs(config)
        backbone, features = pretrained_backbone(config, train)
        before, _ = spearman_of(VisualEncoder(backbone, features, embed_dim=None).eval(), held_out, demos,
                                config.ot_reg)
        report: dict[str, Any] = {"task": train.task, "held_out_trajectories": len(held_out), "demos": len(demos),
                                  "spearman_before": before}
        if config.mode == "align":
            torch.manual_seed(config.seed)
            encoder = VisualEncoder(backbone, features, config.embed_dim)
            def held_out_spearman(model: torch.nn.Module) -> dict[str, float]:
                assert isinstance(model, VisualEncoder)  # the encoder being aligned
                return {"spearman": spearman_of(model, held_out, demos, config.ot_reg)[0]}

            evaluation = Evaluation(held_out_spearman, "spearman") if config.eval_every else None
            history = align(config, encoder, train, evaluation)
            after, after_rewards = spearman_of(encoder, held_out, demos, config.ot_reg)
            report.update(spearman_after=after, triplets=config.triplets)
            if config.eval_every:
                report["best"] = keep_best(config, encoder)
                print(f"best held-out Spearman {report['best']['spearman']:.3f} at step {report['best']['step']}: "
                      f"{report['best']['encoder']}")
            plot_metrics(history, ["loss", "triplet_acc"], config.output / "curves.png")
            plot_scatter(held_out.returns(), after_rewards, config.output / "reward_vs_return.png", "true return",
                         "OT reward (aligned)", f"RAPL on {train.task}: Spearman {before:.2f} -> {after:.2f}")
        (config.output / "eval.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report
