"""Reward models r(s, a): an ensemble of K MLPs, optionally Gaussian (PEARL's RRL), and their evaluation.

A segment's predicted return is R = sum_t r(s_t, a_t); an ensemble predicts the mean over members.
`gaussian=True` makes each member output the mean mu and log standard deviation of a Gaussian reward
(see `rrl.py`); its prediction is mu. Evaluation (B-Pref): held-out pair accuracy, the share of pairs
whose chosen segment gets the higher predicted return, and the Spearman rank correlation between
predicted and true returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from .nets import Standardize, load_module, mlp, save_module
from .pairs import Pairs
from .trajectories import Trajectories

NAME = "reward_model"


@dataclass
class RewardArch:
    """The shape of a reward model."""

    obs_dim: int
    act_dim: int
    hidden: int = 256
    layers: int = 3
    members: int = 1
    gaussian: bool = False


class RewardModel(nn.Module):
    """K member MLPs on standardised [s, a]: forward -> mean [K, ...] and log_std [K, ...] (None unless gaussian)."""

    def __init__(self, arch: RewardArch):
        super().__init__()
        if arch.members < 1:
            raise ValueError(f"a reward ensemble needs at least one member, got {arch.members}")
        self.arch = arch
        self.normalize = Standardize(arch.obs_dim + arch.act_dim)
        outputs = 2 if arch.gaussian else 1
        self.members = nn.ModuleList(mlp(arch.obs_dim + arch.act_dim, arch.hidden, arch.layers, outputs)
                                     for _ in range(arch.members))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.normalize(torch.cat([obs, act], dim=-1))
        out = torch.stack([member(x) for member in self.members])
        if self.arch.gaussian:
            return out[..., 0], out[..., 1].clamp(-10.0, 5.0)
        return out[..., 0], None

    @torch.no_grad()
    def returns(self, segments: Trajectories, batch_size: int = 512) -> np.ndarray:
        """Predicted return of each segment [N]: sum over steps of the members' mean reward."""
        device = next(self.parameters()).device
        out = []
        for begin in range(0, len(segments), batch_size):
            obs = torch.from_numpy(segments.observations[begin:begin + batch_size]).to(device)
            act = torch.from_numpy(segments.actions[begin:begin + batch_size]).to(device)
            out.append(self(obs, act)[0].mean(0).sum(-1).float().cpu())
        return torch.cat(out).numpy()

    def save(self, folder: str | Path) -> None:
        """reward_model.safetensors and reward_model.json in `folder`."""
        save_module(self, self.arch, folder, NAME)


def load_reward_model(folder: str | Path) -> RewardModel:
    """A reward model saved by `RewardModel.save`."""
    return load_module(RewardModel, RewardArch, folder, NAME)


def pair_accuracy(predicted_returns: np.ndarray, pairs: Pairs) -> float:
    """Share of pairs with a strict preference (label != 0.5) whose chosen segment is predicted higher."""
    strict = pairs.label != 0.5
    if not strict.any():
        raise ValueError("no pair with a strict preference to measure accuracy on")
    chosen = predicted_returns[pairs.chosen[strict]]
    rejected = predicted_returns[pairs.rejected[strict]]
    prefers_chosen = pairs.label[strict] > 0.5
    return float(np.mean((chosen > rejected) == prefers_chosen))


def spearman(predicted: np.ndarray, true: np.ndarray) -> float:
    """Spearman rank correlation between predicted and true returns."""
    return float(spearmanr(predicted, true).statistic)
