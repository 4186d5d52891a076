"""Diffusion-DPO (Wallace et al. 2023): preference fine-tuning of a Stable Diffusion (1.x, 2.x, XL, 3) denoiser.

Winner w and loser l share ONE noise eps and ONE timestep t. With per-sample denoising errors
e = mean_(C,H,W) (model(x_t, t, c) - target)^2 of the policy (e_w, e_l) and the reference (e'_w, e'_l):

    loss = -log sigmoid(-0.5 * beta * ((e_w - e_l) - (e'_w - e'_l)))

This is the core DPO objective with the score s(x) = -0.5 * e(x) (the constant T of the paper's
bound is absorbed into beta), so any `mmalign.objectives` kind applies (`--loss`). beta = 5000 is
the paper's value for SD 1.5 and SDXL in this -0.5*beta form; diffusers' example script writes
-beta * (...) with beta = 2500, the same objective. One concatenated policy forward over [w; l] with
gradients, one no-grad reference forward per step: the denoiser with its LoRA disabled (no second
copy) or, with --full, a frozen copy. The target follows the scheduler (eps, v, or the flow velocity
eps - x0 for SD3-style flow models, see `flow`). 20% of prompts are replaced by "" (the paper's default), which
keeps the unconditional branch used by classifier-free guidance aligned too.

The step is `pairwise`'s with fresh noise; what every pairwise method logs is listed there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.config import option

from .pairwise import PairParts, PairwiseConfig, pair_condition, pair_latents, pair_loss, pair_noising, train


@dataclass
class Config(PairwiseConfig):
    """Diffusion-DPO settings (plus the pairs', the denoiser's and the training loop's)."""

    cache_latents: bool = option(False, "encode every image once before training and reuse its VAE posterior "
                                        "(saves the VAE each step; costs RAM: small datasets, many epochs)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache_latents and self.random_flip:
            raise ValueError("cache_latents and random_flip exclude each other: a flip must happen before encoding")


def dpo_step(model, batch: dict[str, Any], generator: torch.Generator, parts: PairParts) -> tuple[torch.Tensor, dict]:
    """One Diffusion-DPO micro-step: winner and loser share one noise and one timestep per pair."""
    latents = pair_latents(batch, generator, parts)
    noisy, timesteps, target = pair_noising(parts.noise_scheduler, latents, generator, parts.config.timestep_sampling)
    condition = pair_condition(batch, generator, parts, latents.device)
    return pair_loss(model, batch, noisy, timesteps, condition, target, parts)


def run(config: Config) -> list[dict[str, float]]:
    """`mmalign diffusion dpo`: Diffusion-DPO training into config.output."""
    return train(config, lambda parts: functools.partial(dpo_step, parts=parts), "Diffusion-DPO",
                 cache_latents=config.cache_latents)
