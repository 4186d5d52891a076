"""Scripted teachers of B-Pref (Lee et al. 2021): preference labels for segment pairs from the true reward.

For segments a and b with true rewards r [L] (B-Pref `reward_model.get_label`, in this order):

    skip     drop the pair when max(R_a, R_b) < skip_threshold          (neither segment shows progress)
    myopic   R = sum_t gamma^(L-1-t) r_t                                 (later steps weigh more)
    label    P(b preferred) = sigmoid(beta * (R_b - R_a)), sampled;     beta = inf: 1[R_b > R_a] (a tie -> a)
    mistake  flip the label with probability eps
    equal    label 0.5 when |R_a - R_b| < equal_threshold (undiscounted returns)

A label is P(b preferred over a), in {0, 0.5, 1}; a skipped pair is NaN. B-Pref sets both thresholds
relative to the segments' average return; so do the presets here (`threshold * mean return`):

    oracle  beta inf          noisy    beta 1            mistake  eps 0.1
    skip    skip 0.1          equal    equal 0.1         myopic   gamma 0.9
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mmalign.errors import ConfigError


@dataclass(frozen=True)
class Teacher:
    """A scripted teacher's rules (see the module docstring); thresholds are fractions of the mean segment return."""

    beta: float = math.inf
    gamma: float = 1.0
    eps_mistake: float = 0.0
    skip: float = 0.0
    equal: float = 0.0

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"teacher beta must be positive (inf: a rational teacher), got {self.beta}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"teacher gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.eps_mistake <= 1:
            raise ConfigError(f"teacher eps_mistake must be in [0, 1], got {self.eps_mistake}")
        if not (0 <= self.skip < math.inf and 0 <= self.equal < math.inf):
            raise ConfigError(f"teacher skip and equal thresholds must be finite and not negative, got {self.skip} "
                              f"and {self.equal}")

    def label(self, rewards_a: np.ndarray, rewards_b: np.ndarray, rng: np.random.Generator,
              scale: float | None = None) -> np.ndarray:
        """P(b preferred) per pair [M] in {0, 0.5, 1}, NaN where skipped; rewards [M, L]; scale: the mean return."""
        rewards_a, rewards_b = np.asarray(rewards_a, dtype=np.float64), np.asarray(rewards_b, dtype=np.float64)
        if rewards_a.shape != rewards_b.shape or rewards_a.ndim != 2:
            raise ValueError(f"segment rewards must both be [M, L]; got {rewards_a.shape} and {rewards_b.shape}")
        if not (np.isfinite(rewards_a).all() and np.isfinite(rewards_b).all()):
            raise ValueError("segment rewards hold NaN or infinite values; a teacher cannot label them")
        sum_a, sum_b = rewards_a.sum(1), rewards_b.sum(1)
        if scale is None:
            scale = float(np.concatenate([sum_a, sum_b]).mean())
        length = rewards_a.shape[1]
        weights = self.gamma ** np.arange(length - 1, -1, -1)
        seen_a, seen_b = rewards_a @ weights, rewards_b @ weights
        if math.isinf(self.beta):
            labels = (seen_b > seen_a).astype(np.float64)
        else:
            p_b = 0.5 * (1 + np.tanh(0.5 * self.beta * (seen_b - seen_a)))  # sigmoid without overflow
            labels = (rng.random(len(seen_a)) < p_b).astype(np.float64)
        flip = rng.random(len(labels)) < self.eps_mistake
        labels[flip] = 1 - labels[flip]
        labels[np.abs(sum_a - sum_b) < self.equal * scale] = 0.5
        if self.skip:  # a skip threshold of 0 skips nothing, whatever the sign of the returns
            labels[np.maximum(sum_a, sum_b) < self.skip * scale] = np.nan
        return labels


TEACHERS = {
    "oracle": Teacher(),
    "noisy": Teacher(beta=1.0),
    "mistake": Teacher(eps_mistake=0.1),
    "skip": Teacher(skip=0.1),
    "equal": Teacher(equal=0.1),
    "myopic": Teacher(gamma=0.9),
}


def teacher(name: str) -> Teacher:
    """The B-Pref preset called `name` (a ConfigError names the presets otherwise)."""
    if name not in TEACHERS:
        raise ConfigError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")
    return TEACHERS[name]
