"""VAE latents: images and videos to the training latents x0 of a pipeline's denoiser and back.

    x0 = (z - shift) * scale,   z ~ N(mean, std^2) the VAE posterior of the image

(shift is SD3's `shift_factor`, 0 for SD/SDXL; scale the VAE's `scaling_factor`). Wan's causal 3D VAE normalises per
channel: shift = latents_mean, scale = 1 / latents_std, as WanPipeline decodes (`latents / latents_std +
latents_mean` with its latents_std = 1 / the config's). Videos [N,F,3,R,R] are encoded frame by frame into
[N,C,F,h,w] by an image VAE, whole into [N,C,1+(F-1)/4,h,w] by Wan's.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

CAUSAL_VIDEO_VAES = ("AutoencoderKLWan",)


def is_causal_video_vae(vae) -> bool:
    """Whether the VAE encodes whole videos [N,3,F,R,R], compressing time (Wan), instead of single images."""
    return type(vae).__name__ in CAUSAL_VIDEO_VAES


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std: images [N,3,R,R] -> [N,C,h,w]; videos [N,F,3,R,R] -> [N,C,F,h,w] frame by frame,
    or [N,C,1+(F-1)/4,h,w] through a causal video VAE."""
    if is_causal_video_vae(vae):
        posterior = vae.encode(pixels.transpose(1, 2).to(dtype)).latent_dist
        return posterior.mean, posterior.std
    posterior = vae.encode(pixels.flatten(0, pixels.dim() - 4).to(dtype)).latent_dist
    if pixels.dim() == 4:
        return posterior.mean, posterior.std
    frames = pixels.shape[1]
    mean, std = (x.unflatten(0, (-1, frames)).transpose(1, 2) for x in (posterior.mean, posterior.std))
    return mean, std


def to_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, vae) -> torch.Tensor:
    """Training latents x0 = (z - shift) * scale with z drawn from the VAE posterior N(mean, std^2)."""
    z = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    scale, shift = latent_scale_shift(vae, z)
    return (z - shift) * scale


def from_latents(x0: torch.Tensor, vae) -> torch.Tensor:
    """Images [N,3,H,W] (videos [N,F,3,H,W]) in [0, 1] from training latents: decode(z) with z = x0 / scale + shift
    (the inverse of `to_latents`; video latents [N,C,F,h,w] frame by frame through an image VAE)."""
    if x0.dim() == 5 and not is_causal_video_vae(vae):
        return from_latents(x0.transpose(1, 2).flatten(0, 1), vae).unflatten(0, (x0.shape[0], x0.shape[2]))
    scale, shift = latent_scale_shift(vae, x0)
    decoded = (vae.decode((x0 / scale + shift).to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)
    return decoded.transpose(1, 2) if decoded.dim() == 5 else decoded


def latent_shape(pipe, resolution: int, frames: int | None = None) -> tuple[int, ...]:
    """One sample's training latent at `resolution` px: [C,h,w], or for a video of `frames` frames [C,F',h,w] (F' = F
    through an image VAE, 1 + (F-1)/4 through Wan's causal one, as WanPipeline's `prepare_latents`)."""
    config = pipe.vae.config
    if is_causal_video_vae(pipe.vae):
        assert frames is not None, "a causal video VAE encodes videos"
        side = resolution // pipe.vae_scale_factor_spatial
        return config.z_dim, (frames - 1) // pipe.vae_scale_factor_temporal + 1, side, side
    side = resolution // pipe.vae_scale_factor
    return (config.latent_channels, *(() if frames is None else (frames,)), side, side)


def latent_scale_shift(vae, like: torch.Tensor) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(scale, shift) of x0 = (z - shift) * scale: the VAE's scaling_factor and shift (`vae_shift`), or for Wan's VAE
    1 / latents_std and latents_mean per channel, shaped [1,C,1,1,1] on `like`'s device and dtype."""
    if not is_causal_video_vae(vae):
        return vae.config.scaling_factor, vae_shift(vae)
    c = vae.config
    mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
    inverse_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
    return inverse_std, mean


def vae_shift(vae) -> float:
    """The VAE's latent shift (SD3's shift_factor; 0 where it has none)."""
    return getattr(vae.config, "shift_factor", None) or 0.0
