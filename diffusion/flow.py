"""Flow matching (SD3-style models): the forward process and timestep sampling used in training.

A flow model interpolates x_t = (1 - sigma) x0 + sigma eps and predicts the velocity v = eps - x0;
the transformer sees the timestep sigma * 1000. sigma is taken from the scheduler's own (shifted)
training sigmas at u ~ U(0, 1), or at u = sigmoid(N(m, s^2)) ("logit_normal", the SD3 paper's
sampling, m = 0, s = 1).
"""

from __future__ import annotations

import torch

from .scoring import training_target


def sample_u(n: int, generator: torch.Generator | None, device, sampling: str = "uniform", logit_mean: float = 0.0,
             logit_std: float = 1.0) -> torch.Tensor:
    """u in (0, 1) that picks each training sigma: U(0, 1), or sigmoid(N(m, s^2)) for "logit_normal"."""
    if sampling == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device) * logit_std + logit_mean)
    return torch.rand(n, generator=generator, device=device)


def flow_interpolate(scheduler, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t = (1 - sigma) x0 + sigma eps, timesteps = sigma * 1000, target = eps - x0) at the scheduler's sigma(u)."""
    index = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1).cpu()
    timesteps = scheduler.timesteps[index].to(latents.device)
    sigma = scheduler.sigmas[index].to(latents.device, latents.dtype).view(-1, *[1] * (latents.dim() - 1))
    return (1 - sigma) * latents + sigma * noise, timesteps, training_target(scheduler, latents, noise, timesteps)


def flow_noising(scheduler, latents: torch.Tensor, generator: torch.Generator, sampling: str = "uniform"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, timesteps, target) for pairs [2B] ordered [w; l]: one eps and one sigma shared by each pair."""
    n, device = latents.shape[0] // 2, latents.device
    u = sample_u(n, generator, device, sampling).repeat(2)
    noise = torch.randn(latents[:n].shape, generator=generator, device=device, dtype=latents.dtype)
    noise = noise.repeat(2, *[1] * (latents.dim() - 1))
    return flow_interpolate(scheduler, latents, noise, u)
