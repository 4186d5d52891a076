"""InPO (Lu et al. 2025, JaydenLyh/InPO): Diffusion-DPO on latents found by DDIM inversion with the current model.

Instead of noising x0 with fresh noise, each step draws ONE timestep t for the batch and inverts the
winner and loser latents x0 with the *current* policy (no gradients) on a coarse DDIM grid and adds
eta * sqrt(sigma^2) fresh noise after each inversion step (eta = 0.1; sigma^2 the DDIM posterior variance
of the interval just crossed). The inverted latent x is taken as x_t, the noise it implies is the target

    eps_hat = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t)

and the Diffusion-DPO loss follows with that x_t, t and target. Its claim is efficiency: the
inverted noise is the one the model itself associates with each image, so fewer steps reach the
same alignment. beta defaults to 2000 (the paper's SD 1.5 value; 5000 for SDXL). For v-prediction
models the target is the v implied by eps_hat.

The inversion is the one the published code runs with the diffusers it pins (0.20.0), written out here
because later diffusers changed `DDIMInverseScheduler` (its grid and which level `step` starts from):
with the DDIM grid g (10 points; 1, 101, ..., 901 for SD's "leading" spacing, offset 1) the inversion grid is
[g_0 - stride, g_0, ..., g_(n-2)] (-99, 1, ..., 801), and at each grid point s below t the model is called at
(x, s) and x moves by a DDIM step from level s (abar of the scheduler's initial value where s < 0) up to
level s + stride. So x ends at the first grid level at or above t (1, 101, ..., 901; 901 for t > 901), not
exactly at t, and the first call sees timestep -99 on x0; both as published. Run with later diffusers, the
published code instead stops at the level below t and fails for t > 901 (BENCHMARKS.md,
"InPO against the published code"). As published, one t serves the whole batch; the published runs use one
pair per micro-batch (with 128 accumulation steps), which `--batch-size 1 --gradient-accumulation-steps N`
reproduces.
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
    unsharded_because: ClassVar[str | None] = ("each process inverts to its own timestep, so the processes run "
                                               "different numbers of UNet forwards, and a sharded forward needs them "
                                               "all")

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


def inversion_grid(inverse) -> list[int]:
    """The published inversion grid (diffusers 0.20's): [g_0 - stride, g_0, ..., g_(n-2)] from the DDIM grid g."""
    grid = inverse.timesteps.tolist()
    return [grid[0] - inversion_stride(inverse)] + grid[:-1]


def inversion_stride(inverse) -> int:
    """Timesteps between neighbouring grid points: num_train_timesteps // num_inference_steps."""
    return inverse.config.num_train_timesteps // inverse.num_inference_steps


def noise_level(inverse, s: int) -> torch.Tensor:
    """abar at timestep s: alphas_cumprod[s], or the scheduler's initial value (abar_0 or 1) for s < 0."""
    return inverse.alphas_cumprod[s] if s >= 0 else inverse.initial_alpha_cumprod


def ddim_move(inverse, x: torch.Tensor, prediction: torch.Tensor, a: torch.Tensor, a_next: torch.Tensor
              ) -> torch.Tensor:
    """A DDIM step from level abar=a to a_next: sqrt(a_next) x0_hat + sqrt(1 - a_next) eps_hat (eps or v predicted)."""
    kind = inverse.config.prediction_type
    if kind == "epsilon":
        x0_hat, eps_hat = (x - (1 - a).sqrt() * prediction) / a.sqrt(), prediction
    elif kind == "v_prediction":
        x0_hat, eps_hat = a.sqrt() * x - (1 - a).sqrt() * prediction, a.sqrt() * prediction + (1 - a).sqrt() * x
    else:
        raise ValueError(f"InPO inverts epsilon or v_prediction models, not prediction_type {kind!r}")
    if inverse.config.clip_sample:
        x0_hat = x0_hat.clamp(-inverse.config.clip_sample_range, inverse.config.clip_sample_range)
    return a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps_hat


def ddim_variance(a: torch.Tensor, a_next: torch.Tensor) -> torch.Tensor:
    """DDIM posterior variance of the interval from level abar=a to a_next: (1 - a)/(1 - a_next) (1 - a_next/a)."""
    return (1 - a) / (1 - a_next) * (1 - a_next / a)


@torch.no_grad()
def ddim_invert(unet, x0: torch.Tensor, t: int, condition, inverse, generator: torch.Generator,
                eta: float) -> torch.Tensor:
    """x0 carried up from each grid point s < t to s + stride by `unet`'s DDIM step, plus eta*sqrt(variance) noise."""
    stride = inversion_stride(inverse)
    x = x0
    for s in (s for s in inversion_grid(inverse) if s < t):
        a, a_next = (noise_level(inverse, level).to(x0.device) for level in (s, s + stride))
        prediction = predict(unet, x, torch.full((x.shape[0],), s, device=x.device), condition)
        x = ddim_move(inverse, x, prediction.to(x.dtype), a, a_next).to(x.dtype)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + eta * ddim_variance(a, a_next).sqrt() * noise
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
