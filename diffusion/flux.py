"""FLUX.1 (FluxPipeline): its packed latent tokens, position ids and guidance embedding as a denoiser Condition.

FluxTransformer2DModel sees latents x [B,C,h,w] as tokens [B, hw/4, 4C] (2x2 patches), with position ids for the
image (img_ids) and text tokens (txt_ids), the timestep as sigma = t / 1000, CLIP's pooled and T5's per-token text
states. FLUX.1-dev is guidance-distilled: instead of classifier-free guidance it takes the guidance scale as an
input embedding. Training and sampling give it the same value, `DenoiserConfig.distilled_guidance` (default 3.5:
FLUX.1-dev's model card and FluxPipeline's sampling default, and what diffusers' FLUX LoRA trainer passes during
training), so the loss is measured on the conditional distribution the model samples from. FLUX.1-schnell has no
guidance embedding and ignores the value.
"""

from __future__ import annotations

import torch

from .scoring import Condition

DISTILLED_GUIDANCE = 3.5  # FLUX.1-dev's guidance embedding (model card, FluxPipeline's default)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Latents [B,C,h,w] as FLUX tokens [B, (h/2)(w/2), 4C]: each 2x2 patch flattened channel-major."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """FLUX tokens [B, (h/2)(w/2), 4C] back to latents [B,C,h,w] of spatial `size` (h, w): the inverse of `pack`."""
    b, _, channels = tokens.shape
    h, w = size[-2], size[-1]
    return tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


def latent_grid(pipe, latents: torch.Tensor, resolution: int) -> torch.Tensor:
    """A pipeline's `output_type="latent"` result as latents [B,C,h,w] (FLUX returns packed tokens)."""
    if latents.dim() != 3:
        return latents
    side = resolution // pipe.vae_scale_factor
    return unpack(latents, torch.Size((side, side)))


def flux_condition(pipe, prompts: list[str], resolution: int, device, guidance: float | None = None) -> Condition:
    """FLUX's conditioning: T5 states, CLIP pooled text, position ids and the distilled guidance (if embedded;
    default `DISTILLED_GUIDANCE`)."""
    states, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                  num_images_per_prompt=1)
    side = resolution // pipe.vae_scale_factor // 2
    image_ids = pipe._prepare_latent_image_ids(len(prompts), side, side, device, states.dtype)
    batched = {"encoder_hidden_states": states, "pooled_projections": pooled}
    if pipe.transformer.config.guidance_embeds:
        value = DISTILLED_GUIDANCE if guidance is None else guidance
        batched["guidance"] = torch.full((len(prompts),), value, device=device, dtype=torch.float32)
    return Condition(batched, "hidden_states", shared={"img_ids": image_ids, "txt_ids": text_ids},
                     timestep_scale=1 / 1000, pack=pack, unpack=unpack)
