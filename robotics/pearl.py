"""PEARL (Liu et al., ICML 2024): Cross-task Preference Alignment, then Robust Reward Learning on the target task.

`mmalign robotics pearl --source LABELLED_FOLDER --target TARGET.npz --output RUN` transfers the source
task's segment preferences to unlabelled target-task segments and trains a Gaussian reward on them.

CPA. Within each task, C[i, j] is the Euclidean distance between the feature sequences of segments
i and j (divided by its maximum). The Gromov-Wasserstein coupling T [n_s, n_t] (POT, uniform
marginals; exact, or entropic with `epsilon`) matches source to target segments that sit alike among
their own task's segments. With Z_s[i, j] = P(source i preferred to j) where labelled and M the mask
of labelled entries, every target pair gets the coupling-weighted average of source labels:

    Z_t[k, l] = sum_ij T[i,k] T[j,l] M[i,j] Z_s[i,j] / sum_ij T[i,k] T[j,l] M[i,j] = (T^T (M*Z_s) T) / (T^T M T)

two matrix products, not a loop over pairs. The denominator is the normalisation the paper's first version
lacked (its unnormalised labels came out at 1/n^2 of the source's scale).

Choices the paper leaves open, made here: segment features are the end-effector position, the
gripper opening and the action at every step ("hand"), standardised per task: what every Meta-World
task shares (the object and goal parts of the observation mean different things in different tasks);
"full" uses the whole observation. Entropic GW with epsilon 5e-3 on max-normalised distances is the
default (it was more accurate than exact GW on every task pair measured, BENCHMARKS.md). GW is not
convex: when segment quality is the main axis of both sets, a coupling that matches the best source
segments to the worst target ones is a local optimum too, and solving from the product coupling alone
found it on some task pairs (transferred accuracy below 0.5). `restarts` solves again from random
starting couplings and keeps the lowest GW objective, which was the right orientation in every case
measured. RRL (rrl.py) then trains on `target_pairs` random target pairs with their soft labels Z_t.

Baselines (baselines.py). The transferred-label accuracy is reported beside label-free rules on the same target
pairs (those the transfer decides): prefer the later segment, prefer smoother actions, nearest neighbour on the
same features, and the transfer through a random plan; and again on the pairs whose segments start at most
`--same-window` steps apart, where progress in time gives little away (eval.json: "baselines", "same_window").

The run folder gets target_segments.npz and target_pairs.jsonl (written once every input has been
read and checked and the transfer is done), then the reward model (reward.py). `--resume latest`
computes the same transfer again (same seed) and continues the reward model's training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import ot

from mmalign import run_folder
from mmalign.config import option
from mmalign.errors import ConfigError, DataError
from mmalign.trainer import Trainer

from . import baselines
from .pairs import Pairs
from .reward import RewardConfig, check_batch, load_held_out, load_labelled, report_reward_model, train_reward_model
from .trajectories import Trajectories

HAND = slice(0, 4)  # end-effector xyz and gripper opening in every Meta-World observation


def segment_features(segments: Trajectories, kind: str = "hand") -> np.ndarray:
    """Per-segment feature vectors [N, L*F]: 'hand' (end effector, gripper, action) or 'full' (observation, action)."""
    if kind not in ("hand", "full"):
        raise ValueError(f"unknown segment features {kind!r}; choose hand or full")
    obs = segments.observations[..., HAND] if kind == "hand" else segments.observations
    features = np.concatenate([obs, segments.actions], axis=-1).astype(np.float64)
    features = (features - features.mean((0, 1))) / (features.std((0, 1)) + 1e-6)
    return features.reshape(len(segments), -1)


def distance_matrix(features: np.ndarray) -> np.ndarray:
    """Euclidean distances between feature vectors, divided by the largest one."""
    distances = ot.dist(features, features, metric="euclidean")
    return distances / max(distances.max(), 1e-12)


def gw_coupling(c_source: np.ndarray, c_target: np.ndarray, entropic: bool = True, epsilon: float = 5e-3,
                restarts: int = 1, seed: int = 0) -> np.ndarray:
    """Gromov-Wasserstein coupling [n_s, n_t] of two distance matrices (POT, uniform marginals), best of `restarts`.

    The first solve starts from the product coupling p q^T (POT's default), every other one from a random
    vertex of the transport polytope; the coupling with the lowest GW objective is kept.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be at least 1, got {restarts}")
    p, q = ot.unif(len(c_source)), ot.unif(len(c_target))
    rng = np.random.default_rng(seed)
    best, best_loss = None, np.inf
    for attempt in range(restarts):
        start = None if attempt == 0 else ot.emd(p, q, rng.random((len(p), len(q))))
        if entropic:
            coupling, log = ot.gromov.entropic_gromov_wasserstein(c_source, c_target, p, q, "square_loss",
                                                                  epsilon=epsilon, G0=start, log=True)
        else:
            coupling, log = ot.gromov.gromov_wasserstein(c_source, c_target, p, q, "square_loss", G0=start, log=True)
        if log["gw_dist"] < best_loss:
            best, best_loss = coupling, log["gw_dist"]
    if best is None:
        raise ConfigError(f"the Gromov-Wasserstein objective was not finite in any of {restarts} solve(s) "
                          f"({'entropic, epsilon ' + str(epsilon) if entropic else 'exact'}); try a larger --epsilon")
    return best


def label_matrix(pairs: Pairs, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Z [n, n] with Z[i, j] = P(i preferred to j) averaged over its records (Z[j, i] = 1 - Z[i, j]), and the mask M."""
    totals, counts = np.zeros((n, n)), np.zeros((n, n))
    np.add.at(totals, (pairs.chosen, pairs.rejected), pairs.label)
    np.add.at(totals, (pairs.rejected, pairs.chosen), 1 - pairs.label)
    np.add.at(counts, (pairs.chosen, pairs.rejected), 1)
    np.add.at(counts, (pairs.rejected, pairs.chosen), 1)
    mask = (counts > 0).astype(np.float64)
    return np.divide(totals, counts, out=np.full((n, n), 0.5), where=counts > 0), mask


def transfer_labels(coupling: np.ndarray, z_source: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Z_t = (T^T (M*Z_s) T) / (T^T M T) [n_t, n_t]; 0.5 where no labelled source pair carries weight."""
    mask = np.ones_like(z_source) if mask is None else mask
    numerator = coupling.T @ (mask * z_source) @ coupling
    denominator = coupling.T @ mask @ coupling
    return np.divide(numerator, denominator, out=np.full_like(numerator, 0.5), where=denominator > 1e-300)


def label_accuracy(z_target: np.ndarray, true_returns: np.ndarray, pairs: np.ndarray | None = None) -> float:
    """Share of target pairs k < l (those in `pairs` [n, n] bool; default: Z_t[k, l] != 0.5) whose label matches the
    true returns (k preferred when R_k > R_l); a label of 0.5 counts half."""
    upper = np.triu_indices(len(true_returns), 1)
    z = z_target[upper]
    truth = (true_returns[:, None] > true_returns[None, :])[upper]
    scored = z != 0.5 if pairs is None else pairs[upper]
    if not scored.any():
        raise ValueError("no target pair to score")
    right = np.where(z == 0.5, 0.5, (z > 0.5) == truth)
    return float(right[scored].mean())


def target_pairs(z_target: np.ndarray, num: int, seed: int, task: str) -> Pairs:
    """`num` random target pairs labelled with Z_t (chosen: the side with Z >= 0.5), skipping pairs without weight."""
    rng = np.random.default_rng(seed)
    n = len(z_target)
    a = rng.integers(n, size=num)
    b = (a + rng.integers(1, n, size=num)) % n
    p = z_target[a, b]
    keep = p != 0.5
    a, b, p = a[keep], b[keep], p[keep]
    a_wins = p >= 0.5
    return Pairs(task, np.where(a_wins, a, b), np.where(a_wins, b, a), np.maximum(p, 1 - p).astype(np.float32), "pearl")


@dataclass
class Config(RewardConfig):
    """Settings of `mmalign robotics pearl` (plus the reward-model and training-loop settings)."""

    source: str = option(None, "labelled source folder from `mmalign robotics label` (segments.npz, pairs.jsonl)",
                         reads="folder")
    target: str = option(None, "unlabelled target-task trajectory file (.npz); its rewards only score the transfer",
                         reads="file")
    target_segments: int = option(500, "target segments to cut (of the source segments' length)")
    target_pairs: int = option(4000, "random target pairs labelled by the transfer for reward learning")
    features: Literal["hand", "full"] = option("hand", "segment features the intra-task distances use")
    entropic: bool = option(True, "entropic Gromov-Wasserstein (else exact)")
    epsilon: float = option(5e-3, "entropic regularisation of GW (distances are scaled to a maximum of 1)")
    restarts: int = option(5, "GW solves from different starting couplings; the lowest GW objective wins")
    same_window: int = option(5, "the accuracies are reported again on the target pairs that start at most this "
                                 "many steps apart (where progress in time gives little away)")
    gaussian: bool = option(True, "Gaussian reward with RRL (PEARL); --no-gaussian trains plain Bradley-Terry")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.source or not self.target:
            raise ValueError("--source (a labelled folder) and --target (a trajectory file) are required")
        if not self.epsilon > 0 or self.restarts < 1:
            raise ValueError(f"epsilon must be positive and restarts at least 1, got {self.epsilon} and "
                             f"{self.restarts}")
        if self.same_window < 0:
            raise ValueError(f"same_window must not be negative, got {self.same_window}")
        if self.target_segments < 2 or self.target_pairs < 1:
            raise ValueError(f"target_segments must be at least 2 and target_pairs at least 1, got "
                             f"{self.target_segments} and {self.target_pairs}")


def align(source: Trajectories, source_pairs: Pairs, target: Trajectories, features: str = "hand",
          entropic: bool = True, epsilon: float = 5e-3, restarts: int = 5,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CPA: the GW coupling of source and target segments and the transferred label matrix Z_t."""
    coupling = gw_coupling(distance_matrix(segment_features(source, features)),
                           distance_matrix(segment_features(target, features)), entropic, epsilon, restarts, seed)
    z_source, mask = label_matrix(source_pairs, len(source))
    return coupling, transfer_labels(coupling, z_source, mask)


def baseline_report(source: Trajectories, source_pairs: Pairs, target: Trajectories, z_target: np.ndarray,
                    features: str = "hand", window: int = 5, seed: int = 0) -> dict[str, Any]:
    """Transferred-label accuracy beside the label-free rules (baselines.py) on the pairs the transfer decides, and
    on those of them that start at most `window` steps apart (with their number)."""
    z_source, mask = label_matrix(source_pairs, len(source))
    rules = {"pearl": z_target, "later_segment": baselines.later_segment(target.info["start"]),
             "smoother_actions": baselines.smoother_actions(target.actions),
             "nearest_neighbour": baselines.nearest_neighbour(segment_features(source, features),
                                                              segment_features(target, features), z_source, mask),
             "random_plan": transfer_labels(baselines.random_plan(len(source), len(target), seed), z_source, mask)}
    returns, decided = target.returns(), z_target != 0.5
    close = decided & baselines.same_window(target.info["start"], window)
    report: dict[str, Any] = {"baselines": {name: label_accuracy(z, returns, decided) for name, z in rules.items()}}
    if np.triu(close, 1).any():
        report["same_window"] = {"window": window, "pairs": int(np.triu(close, 1).sum()),
                                 **{name: label_accuracy(z, returns, close) for name, z in rules.items()}}
    return report


def load_target(config: Config, segment_length: int) -> Trajectories:
    """The --target trajectories, long enough to cut segments of the source's length."""
    target = Trajectories.load(config.target)
    if target.horizon < segment_length:
        raise DataError(f"{config.target}: target trajectories of {target.horizon} steps are shorter than the "
                        f"{segment_length}-step source segments of {config.source}")
    return target


def run(config: Config) -> dict[str, Any]:
    """Check every input, transfer labels to target segments, write them, train the reward on them, report."""
    with run_folder.claim(config.output, resuming=config.resume is not None):
        trainer = Trainer(config)  # first: the launch's processes join before the data checks share their work
        source, source_pairs = load_labelled(config.source)
        target_trajs = load_target(config, source.horizon)
        held_out = load_held_out(config.eval_data, target_trajs.task, source.horizon)
        target = target_trajs.fragment(source.horizon, config.target_segments, seed=config.seed)
        _, z_target = align(source, source_pairs, target, config.features, config.entropic, config.epsilon,
                            config.restarts, config.seed)
        pairs = target_pairs(z_target, config.target_pairs, config.seed, target.task)
        check_batch(len(pairs), config, trainer, f"the transfer to {config.target}")
        trainer.begin()
        target.save(config.output / "target_segments.npz")
        pairs.save(config.output / "target_pairs.jsonl")
        returns = target.returns()
        transfer = {"source_task": source.task, "target_task": target.task, "source_segments": len(source),
                    "source_pairs": len(source_pairs), "target_segments": len(target),
                    "transferred_label_accuracy": label_accuracy(z_target, returns),
                    "train_pair_accuracy": float(np.mean(returns[pairs.chosen] > returns[pairs.rejected])),
                    **baseline_report(source, source_pairs, target, z_target, config.features, config.same_window,
                                      config.seed)}
        trainer.accelerator.print(json.dumps(transfer, indent=1))
        model, history = train_reward_model(config, target, pairs, trainer)
        report = report_reward_model(config, trainer, model, held_out, target.horizon, history, transfer)
    trainer.accelerator.print(json.dumps(report, indent=1))
    return report
