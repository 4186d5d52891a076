"""Denoising steps as Gaussian policies pi(x_{i+1} | x_i, c) = N(mean, std^2), their log-probabilities, the KL between
two of them and PPO's clipped objective: what online RL of a generator (`mmalign.diffusion.grpo`) optimises.

    flow models (Flow-GRPO, arXiv 2505.05470)   the Euler ODE step turned into the SDE with the same marginals
    diffusion models (DDPO, arXiv 2305.13301)   the DDIM step with eta > 0

A `Schedule` (`FlowSchedule` or `DDIMSchedule`, chosen by the model's scheduler in `policy_schedule`) holds the T
sampler steps; `step(x, output, index, eta)` gives (mean, std) of step `index` (per sample), and eta = 0 is the
deterministic sampler (Euler, DDIM) with std 0. Log-probabilities and KLs are averaged over the latent's elements, as
both reference implementations do, so PPO's clip range (1e-4 there) has the same meaning at every resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def flow_sde_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                  sigma_max: float, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step: dt = sigma_next - sigma, std_t = eta sqrt(sigma / (1 - sigma)) (sigma = 1: sigma_max in the
    denominator), mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt,
    std = std_t sqrt(-dt)."""
    dt = sigma_next - sigma
    std_t = eta * torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)))
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + velocity * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_t * torch.sqrt(-dt)


def ddim_step(x: torch.Tensor, output: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor, eta: float,
              prediction_type: str, clip_sample: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM's step (its eqs. 12, 16): x0 = (x - sqrt(1 - a) eps) / sqrt(a),
    std = eta sqrt((1 - a') / (1 - a) (1 - a / a')), mean = sqrt(a') x0 + sqrt(1 - a' - std^2) eps (a = alpha-bar at t,
    a' at the next step; v-prediction converted)."""
    if prediction_type == "epsilon":
        x0, eps = (x - (1 - alpha).sqrt() * output) / alpha.sqrt(), output
    else:  # v_prediction
        x0, eps = alpha.sqrt() * x - (1 - alpha).sqrt() * output, alpha.sqrt() * output + (1 - alpha).sqrt() * x
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    std = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps, std


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, std^2) per element, averaged over each sample's elements:
    mean(-(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi))."""
    log_prob = -((sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.flatten(1).mean(1)


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per element, averaged over each sample's: mean((mean - mean_ref)^2) /
    (2 std^2); for the flow SDE std^2 = std_t^2 (-dt)."""
    return ((mean - reference_mean) ** 2 / (2 * std**2)).flatten(1).mean(1)


def clipped_objective(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped loss -mean(min(r A, clip(r, 1 - eps, 1 + eps) A)), r = exp(logp - logp_old); returns (loss, r)."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    return -torch.minimum(ratio * advantages, clipped * advantages).mean(), ratio


@dataclass(frozen=True)
class FlowSchedule:
    """A flow sampler's steps: sigmas [T+1] (shifted as the pipeline shifts them, ending at 0) and the denoiser's
    timesteps [T] = 1000 sigma (Wan's sampler rounds them down)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def step(self, x: torch.Tensor, output: torch.Tensor, index: torch.Tensor, eta: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of x_{i+1} given x_i at per-sample step `index` (`flow_sde_step`; eta = 0: Euler)."""
        shape = (-1, *[1] * (x.dim() - 1))
        sigma, sigma_next = self.sigmas[index].view(shape), self.sigmas[index + 1].view(shape)
        return flow_sde_step(x.float(), output.float(), sigma, sigma_next, float(self.sigmas[1]), eta)


@dataclass(frozen=True)
class DDIMSchedule:
    """A DDIM sampler's steps: the denoiser's timesteps [T], alpha-bar at each and at the step after it (the scheduler's
    final alpha-bar after the last), the prediction type and x0's clip range (None: no clipping)."""

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    prediction_type: str
    clip_sample: float | None

    def step(self, x: torch.Tensor, output: torch.Tensor, index: torch.Tensor, eta: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of x_{i+1} given x_i at per-sample step `index` (`ddim_step`; eta = 0: deterministic DDIM)."""
        shape = (-1, *[1] * (x.dim() - 1))
        return ddim_step(x.float(), output.float(), self.alphas[index].view(shape), self.alphas_prev[index].view(shape),
                         eta, self.prediction_type, self.clip_sample)


Schedule = FlowSchedule | DDIMSchedule


def policy_schedule(pipe, scheduler, steps: int, latent_side: int, device: torch.device) -> Schedule:
    """The sampler's `steps` steps for the pipeline's model: for a flow `scheduler` (`base.training_scheduler`) its
    `set_timesteps(steps)`, or with dynamic shifting (FLUX) the pipelines' sigmas linspace(1, 1/T, T) shifted by
    mu(image tokens); for a sampler on flow sigmas (Wan's UniPC) that sampler's own shifted sigmas and the integer
    timesteps it gives the denoiser, with its first sigma 1 - 1e-6 (a guard for UniPC's log) put back to 1, where the
    SDE's std_t takes sigma_max; for a diffusion model DDIM's timesteps on the pipeline scheduler's betas."""
    from .scoring import is_flow

    if pipe.scheduler.config.get("prediction_type") == "flow_prediction":
        sampler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sampler.set_timesteps(steps)
        sigmas = sampler.sigmas.float()
        sigmas[0] = torch.where(sigmas[0] > 1 - 1e-5, 1.0, sigmas[0])
        return FlowSchedule(sigmas.to(device), sampler.timesteps.float().to(device))
    if is_flow(scheduler):
        c = scheduler.config
        if c.get("use_dynamic_shifting"):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            tokens = (latent_side // 2) ** 2
            mu = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                 c.get("base_shift", 0.5), c.get("max_shift", 1.15))
            scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 1 / steps, steps)), mu=mu)
        else:
            scheduler.set_timesteps(steps)
        return FlowSchedule(scheduler.sigmas.float().to(device), scheduler.timesteps.float().to(device))
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(steps)
    timesteps = ddim.timesteps.long()
    previous = timesteps - ddim.config.num_train_timesteps // steps
    alphas_prev = torch.where(previous >= 0, ddim.alphas_cumprod[previous.clamp(min=0)], ddim.final_alpha_cumprod)
    clip = ddim.config.clip_sample_range if ddim.config.clip_sample else None
    return DDIMSchedule(timesteps.to(device), ddim.alphas_cumprod[timesteps].float().to(device),
                        alphas_prev.float().to(device), ddim.config.prediction_type, clip)
