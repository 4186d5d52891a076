"""VAE latents: images to the training latents x0 of a pipeline's denoiser and back.

    x0 = (z - shift) * scale,   z ~ N(mean, std^2) the VAE posterior of the image

(shift is SD3's `shift_factor`, 0 for SD/SDXL). Videos [N,F,3,R,R] are encoded frame by frame into [N,C,F,h,w].
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std: images [N,3,R,R] -> [N,C,h,w]; videos [N,F,3,R,R] -> [N,C,F,h,w], frame by frame."""
    posterior = vae.encode(pixels.flatten(0, pixels.dim() - 4).to(dtype)).latent_dist
    if pixels.dim() == 4:
        return posterior.mean, posterior.std
    frames = pixels.shape[1]
    mean, std = (x.unflatten(0, (-1, frames)).transpose(1, 2) for x in (posterior.mean, posterior.std))
    return mean, std


def to_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, vae) -> torch.Tensor:
    """Training latents x0 = (z - shift) * scale with z drawn from the VAE posterior N(mean, std^2)."""
    z = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (z - vae_shift(vae)) * vae.config.scaling_factor


def from_latents(x0: torch.Tensor, vae) -> torch.Tensor:
    """Images in [0, 1] from training latents: decode(z) with z = x0 / scale + shift (the inverse of `to_latents`)."""
    z = x0 / vae.config.scaling_factor + vae_shift(vae)
    return (vae.decode(z.to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)


def vae_shift(vae) -> float:
    """The VAE's latent shift (SD3's shift_factor; 0 where it has none)."""
    return getattr(vae.config, "shift_factor", None) or 0.0
