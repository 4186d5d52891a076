"""The diffusion score: per-sample denoising error at a given noisy latent, timestep and condition.

A diffusion model's log-likelihood of x0 is bounded by -E_t,eps[w(t) ||target - model(x_t, t)||^2];
Diffusion-DPO uses one (t, eps) draw of that bound as the sample's score. The target follows the
scheduler's `prediction_type`: eps for "epsilon", v = sqrt(abar) eps - sqrt(1-abar) x0 for "v_prediction".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Condition:
    """UNet conditioning for a batch: text states, plus SDXL's pooled text embeds and size ids."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def repeat(self, times: int) -> "Condition":
        """The same conditions for `times` stacked copies of the batch ([c, c, ...])."""
        added = None if self.added_cond_kwargs is None else {
            k: v.repeat(times, *[1] * (v.dim() - 1)) for k, v in self.added_cond_kwargs.items()}
        states = self.encoder_hidden_states
        return Condition(states.repeat(times, *[1] * (states.dim() - 1)), added)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], resolution: int, device: torch.device) -> Condition:
    """Text conditioning from the pipeline's own `encode_prompt` (SD: CLIP states; SDXL: both encoders + pooled)."""
    if hasattr(pipe, "text_encoder_2"):
        states, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        size_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device)
        time_ids = size_ids.to(states.dtype).repeat(len(prompts), 1)
        return Condition(states, {"text_embeds": pooled, "time_ids": time_ids})
    states, _ = pipe.encode_prompt(prompts, device, 1, False)
    return Condition(states)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model is trained to predict at (x_t, t): eps, or v for v-prediction schedulers."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported; use epsilon or v_prediction")


def denoising_error(unet, noisy: torch.Tensor, timesteps: torch.Tensor, condition: Condition,
                    target: torch.Tensor) -> torch.Tensor:
    """e = mean over (C,H,W) of (model(x_t, t, c) - target)^2, one value per sample, in float32."""
    pred = unet(noisy, timesteps, condition.encoder_hidden_states,
                added_cond_kwargs=condition.added_cond_kwargs).sample
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
