"""Behaviour cloning of a Gaussian policy: maximise log pi(a|s) over the (s, a) steps of demonstrations.

loss = -mean over steps of log pi(a_t | s_t), trained through the shared trainer. GRAPE starts from
such a policy (the paper's VLAs are behaviour-cloned too).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from mmalign.trainer import TrainConfig, Trainer

from .policies import GaussianPolicy, PolicyArch
from .trajectories import Trajectories


def bc_step(policy: GaussianPolicy, batch: list[torch.Tensor],
            generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
    """Negative log-likelihood of a batch of (observation, action) steps."""
    obs, act = batch
    return -policy.log_prob(obs, act).mean(), {"sigma": policy.log_std.detach().exp().mean()}


def behaviour_clone(config: TrainConfig, demos: Trajectories, arch: PolicyArch,
                    trainer: Trainer | None = None) -> tuple[GaussianPolicy, list[dict[str, float]]]:
    """A Gaussian policy fit to every step of `demos` (observations standardised with their statistics)."""
    trainer = trainer or Trainer(config)
    torch.manual_seed(config.seed)
    policy = GaussianPolicy(arch)
    policy.normalize.fit(demos.observations)
    steps = TensorDataset(torch.from_numpy(demos.observations.reshape(-1, arch.obs_dim)),
                          torch.from_numpy(np.ascontiguousarray(demos.actions.reshape(-1, arch.act_dim))))
    history = trainer.fit(policy.to(trainer.device), steps, torch.utils.data.default_collate, bc_step,
                          save_model=lambda m, out: m.save(out))
    return policy.eval(), history
