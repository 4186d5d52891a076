"""The diffusion score: per-sample denoising error at a given noisy latent, timestep and condition.

A diffusion model's log-likelihood of x0 is bounded by -E_t,eps[w(t) ||target - model(x_t, t)||^2];
Diffusion-DPO uses one (t, eps) draw of that bound as the sample's score. The target follows the
noise scheduler: eps for "epsilon", v = sqrt(abar) eps - sqrt(1-abar) x0 for "v_prediction", and the
velocity eps - x0 for flow matching (x_t = (1 - sigma) x0 + sigma eps, SD3's FlowMatchEulerDiscreteScheduler, or a
sampler on flow sigmas predicting that velocity: Wan 2.1's UniPCMultistepScheduler with prediction_type
"flow_prediction").
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Condition:
    """A batch's conditioning as the denoiser's keyword arguments (`kwargs` per sample, `shared` by all), the name of
    its noisy-input argument, the scale of the timestep it takes, and how latents [B,C,h,w] become its input tokens
    and back (`pack`, `unpack(output, latent shape)`; FLUX) where it does not take them as they are."""

    kwargs: dict[str, Any]
    sample_key: str = "sample"
    shared: dict[str, Any] = field(default_factory=dict)
    timestep_scale: float = 1.0
    pack: Callable[[torch.Tensor], torch.Tensor] | None = None
    unpack: Callable[[torch.Tensor, torch.Size], torch.Tensor] | None = None

    def repeat(self, times: int) -> Condition:
        """The same conditions for `times` stacked copies of the batch ([c, c, ...])."""
        def rep(value):
            if torch.is_tensor(value):
                return value.repeat(times, *[1] * (value.dim() - 1))
            if isinstance(value, dict):
                return {k: rep(v) for k, v in value.items()}
            return value
        return dataclasses.replace(self, kwargs=rep(self.kwargs))


def is_flow(scheduler) -> bool:
    """Whether the noise scheduler is a flow-matching one (velocity target, sigma-interpolated latents): a FlowMatch
    scheduler, or a sampler whose model predicts the flow velocity (Wan's UniPC, prediction_type "flow_prediction")."""
    return "FlowMatch" in type(scheduler).__name__ or scheduler.config.get("prediction_type") == "flow_prediction"


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], resolution: int, device: torch.device,
                   distilled_guidance: float | None = None) -> Condition:
    """Text conditioning from the pipeline's own `encode_prompt`: SD (CLIP states), SDXL (+ pooled, size ids), SD3,
    FLUX (`flux.flux_condition`, its guidance embedding at `distilled_guidance`, default FLUX.1-dev's), Wan (UMT5
    states)."""
    name = type(pipe).__name__
    if name.startswith("Flux"):
        from .flux import flux_condition

        return flux_condition(pipe, prompts, resolution, device, distilled_guidance)
    if name.startswith("StableDiffusion3"):
        states, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Condition({"encoder_hidden_states": states, "pooled_projections": pooled}, "hidden_states")
    if name.startswith("Wan"):  # padded to the sampler's text length (512), not encode_prompt's default (226)
        states, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, device=device,
                                       max_sequence_length=sampler_default(pipe, "max_sequence_length"))
        return Condition({"encoder_hidden_states": states}, "hidden_states")
    if hasattr(pipe, "text_encoder_2"):
        states, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        size_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device)
        time_ids = size_ids.to(states.dtype).repeat(len(prompts), 1)
        return Condition({"encoder_hidden_states": states,
                          "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}})
    states, _ = pipe.encode_prompt(prompts, device, 1, False)
    return Condition({"encoder_hidden_states": states})


def sampler_default(pipe, argument: str) -> Any:
    """The default value of an argument of the pipeline's sampler (`pipe(...)`), e.g. Wan's height or text length."""
    return inspect.signature(type(pipe).__call__).parameters[argument].default


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model is trained to predict at (x_t, t): eps, v for v-prediction, eps - x0 for flow matching."""
    if is_flow(scheduler):
        return noise - latents
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported; use {' or '.join(PREDICTION_TYPES)}")


def predict(model, noisy: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
    """The denoiser's prediction at (x_t, t) under `condition`, for UNets and transformers alike, as latents [B,...]."""
    c = condition
    inputs = c.pack(noisy) if c.pack is not None else noisy
    timesteps = timesteps * c.timestep_scale if c.timestep_scale != 1 else timesteps
    output = model(**{c.sample_key: inputs, "timestep": timesteps}, **c.kwargs, **c.shared).sample
    return c.unpack(output, noisy.shape) if c.unpack is not None else output


def denoising_error(model, noisy: torch.Tensor, timesteps: torch.Tensor, condition: Condition,
                    target: torch.Tensor) -> torch.Tensor:
    """e = mean over (C,H,W) of (model(x_t, t, c) - target)^2, one value per sample, in float32."""
    return (predict(model, noisy, timesteps, condition).float() - target.float()).pow(2).flatten(1).mean(dim=1)
