"""InPO (Lu et al. 2025, JaydenLyh/InPO): Diffusion-DPO on latents found by DDIM inversion with the current model.

Instead of noising x0 with fresh noise, each step draws ONE timestep t for the batch and inverts the
winner and loser latents x0 with the *current* policy on a coarse DDIM grid (10 steps,
`DDIMInverseScheduler`) through every grid point below t, adding eta * sqrt(sigma^2) fresh noise
after each inversion step (eta = 0.1; sigma^2 the DDIM posterior variance between neighbouring grid
points). The inverted latent x is taken as x_t, the noise it implies is the target

    eps_hat = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t)

and the Diffusion-DPO loss follows with that x_t, t and target. Its claim is efficiency: the
inverted noise is the one the model itself associates with each image, so fewer steps reach the
same alignment. beta defaults to 2000 (the paper's SD 1.5 value; 5000 for SDXL). As in the reference
code, x is the latent at the last grid point below t, not exactly at t. For v-prediction models the
target is the v implied by eps_hat.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from mmalign.config import option

from . import dpo
from .base import Parts
from .pairwise import pair_condition, pair_latents, pair_loss, train
from .scoring import predict, training_target


@dataclass
class Config(dpo.Config):
    """InPO settings (plus Diffusion-DPO's and the training loop's); DDPM-style diffusion models only."""

    schedule: ClassVar[Literal["flow", "diffusion"] | None] = "diffusion"

    beta: float = option(2000.0, "KL strength in the -0.5*beta form (paper: 2000 for SD 1.5, 5000 for SDXL)")
    inversion_steps: int = option(10, "DDIM inversion grid size over the training timesteps")
    inversion_eta: float = option(0.1, "scale of the fresh noise added after each inversion step")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inversion_steps < 1:
            raise ValueError(f"inversion_steps must be at least 1, got {self.inversion_steps}")
        if self.inversion_eta < 0:
            raise ValueError(f"inversion_eta must not be negative, got {self.inversion_eta}")


InpoParts = Parts[Config]


@torch.no_grad()
def ddim_invert(unet, x0: torch.Tensor, t: int, condition, inverse, generator: torch.Generator,
                eta: float) -> torch.Tensor:
    """x0 carried up the inverse DDIM grid through every point below t by `unet`, with eta-scaled noise per step."""
    abar = inverse.alphas_cumprod.to(x0.device)
    stride = inverse.config.num_train_timesteps // inverse.num_inference_steps
    x = x0
    for s in inverse.timesteps[inverse.timesteps < t].tolist():
        prediction = predict(unet, x, torch.full((x.shape[0],), s, device=x.device), condition)
        x = inverse.step(prediction.to(x.dtype), s, x).prev_sample
        upper = min(s + stride, len(abar) - 1)
        variance = (1 - abar[s]) / (1 - abar[upper]) * (1 - abar[upper] / abar[s])
        x = x + eta * variance.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def inpo_step(unet, batch: dict[str, Any], generator: torch.Generator, parts: InpoParts,
              inverse) -> tuple[torch.Tensor, dict]:
    """One InPO micro-step: one t for the batch, x_t by DDIM inversion of [w; l], target eps_hat, DPO loss."""
    scheduler, c = parts.noise_scheduler, parts.config
    x0 = pair_latents(batch, generator, parts)
    device = x0.device
    t = int(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator, device=device))
    timesteps = torch.full((x0.shape[0],), t, device=device)
    condition = pair_condition(batch, generator, parts, device)
    noisy = ddim_invert(unet, x0, t, condition, inverse, generator, c.inversion_eta)
    abar_t = scheduler.alphas_cumprod[t].to(device)
    eps_hat = (noisy - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
    target = training_target(scheduler, x0, eps_hat, timesteps)
    return pair_loss(unet, batch, noisy, timesteps, condition, target, parts)


def make_step(parts: InpoParts):
    """The InPO step bound to its inverse DDIM scheduler (built from the pipeline's scheduler config)."""
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(parts.pipe.scheduler.config)
    inverse.set_timesteps(parts.config.inversion_steps)
    return functools.partial(inpo_step, parts=parts, inverse=inverse)


def run(config: Config) -> list[dict[str, float]]:
    """`mmalign diffusion inpo`: InPO training into config.output (same outputs as Diffusion-DPO)."""
    return train(config, make_step, "InPO", cache_latents=config.cache_latents)
