"""A Gaussian policy pi(a|s) = N(mu(s), diag(sigma^2)): behaviour cloning target, GRAPE's policy, a rollout policy.

mu is an MLP on standardised observations; log sigma is one learned vector (state-independent, as
in most BC baselines). log pi(a|s) sums over action dimensions. Acting samples (or takes mu) and
clips to the action box [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmalign.errors import DataError

from .envs import ACTION_SIZE, OBSERVATION_SIZE
from .nets import Standardize, load_module, mlp, save_module

NAME = "policy"
LOG_2PI = float(np.log(2 * np.pi))


@dataclass
class PolicyArch:
    """The shape of a Gaussian policy."""

    obs_dim: int
    act_dim: int
    hidden: int = 256
    layers: int = 2
    init_log_std: float = -1.0


class GaussianPolicy(nn.Module):
    """mu(s) from an MLP, sigma a free vector; `log_prob(obs, act)` [...], `act(obs)` for rollouts."""

    def __init__(self, arch: PolicyArch):
        super().__init__()
        self.arch = arch
        self.normalize = Standardize(arch.obs_dim)
        self.mean = mlp(arch.obs_dim, arch.hidden, arch.layers, arch.act_dim)
        self.log_std = nn.Parameter(torch.full((arch.act_dim,), float(arch.init_log_std)))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(self.normalize(obs)), self.log_std.clamp(-5.0, 1.0).expand(*obs.shape[:-1], -1)

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) = sum_i -((a_i - mu_i)^2 / (2 sigma_i^2) + log sigma_i + log(2 pi)/2), shape obs.shape[:-1]."""
        mean, log_std = self(obs)
        z = (act - mean) * torch.exp(-log_std)
        return -(0.5 * z**2 + log_std + 0.5 * LOG_2PI).sum(-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False, generator: torch.Generator | None = None) -> np.ndarray:
        """Actions [n, A] for observations [n, D]: mu, or a sample; clipped to [-1, 1]."""
        device = self.log_std.device
        mean, log_std = self(torch.as_tensor(obs, dtype=torch.float32, device=device))
        if not deterministic:
            mean = mean + log_std.exp() * torch.randn(mean.shape, generator=generator, device=device)
        return mean.clamp(-1.0, 1.0).cpu().numpy()

    def save(self, folder: str | Path) -> None:
        """policy.safetensors and policy.json in `folder`."""
        save_module(self, self.arch, folder, NAME)


def load_policy(folder: str | Path) -> GaussianPolicy:
    """A policy saved by `GaussianPolicy.save`, checked to fit Meta-World's observations and actions."""
    policy = load_module(GaussianPolicy, PolicyArch, folder, NAME)
    sizes = (policy.arch.obs_dim, policy.arch.act_dim)
    if sizes != (OBSERVATION_SIZE, ACTION_SIZE):
        raise DataError(f"{Path(folder) / NAME}.json: a policy of {sizes[0]} observation and {sizes[1]} action "
                        f"features; Meta-World's have {OBSERVATION_SIZE} and {ACTION_SIZE}")
    return policy


class PolicyActor:
    """A rollout policy from a GaussianPolicy: batches of observations in, (sampled or mean) actions out."""

    def __init__(self, policy: GaussianPolicy, deterministic: bool = False, seed: int = 0):
        self.policy, self.deterministic = policy.eval(), deterministic
        self.generator = torch.Generator(device=policy.log_std.device).manual_seed(seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.policy.act(obs, self.deterministic, self.generator)
