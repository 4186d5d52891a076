"""AC-Flow (arXiv 2510.18072): actor-critic fine-tuning of a flow-matching model from a reward, with a critic on
intermediate states and Wasserstein-2 regularisation to the reference.

The paper's exact equations are not public; the choices made here, following its three parts and its
special case ORW-CFM-W2 (markerthu/orw-cfm), are:

1. Samples and reward. Each step the current actor samples K images per prompt (Euler, no gradients);
   a reward callable `reward(images [N,3,H,W] in [0,1], prompts) -> [N]` scores them.
2. Reward shaping: per-prompt standardisation r~ = (r - mean_K r) / (std_K r + 1e-6), so the learning
   signal has the same scale for every prompt and every stage of training.
3. Critic: V(x_t, sigma, c), a small network on the intermediate state x_t = (1 - sigma) x0 + sigma eps of
   the sample x0, its noise level and the pooled prompt embedding, regressed on r~ (MSE).
4. Advantage and warm-up: A = r~ - V(x_t, sigma, c) after `critic_warmup` steps (before that the critic
   only learns and A = r~), clipped to [-clip, clip] (Flow-GRPO clips at 5).
5. Actor: the critic-weighted flow-matching loss on its own samples, w = exp(beta * A) / mean_batch(...),
   L_actor = mean(w * ||v_theta(x_t) - (eps - x0)||^2) + alpha * mean ||v_theta(x_t) - v_ref(x_t)||^2, the
   second term bounding the W2 distance to the reference (ORW-CFM-W2: beta 0.5, alpha 1).
Loss = L_actor + critic_weight * L_critic. The samples are drawn without classifier-free guidance by default
(guidance_scale 1): the flow-matching term assumes they come from the actor's own conditional distribution,
and guided samples also distil the guidance into the actor, a drift unrelated to the reward (on the tiny
SD3 test model, guidance 5 moved a brightness reward the wrong way, ten times more than the reward moved it).
Logged: reward (raw mean), critic_loss, advantage (mean |A|), weight_max, w2 and diversity (mean pairwise
pixel distance among a prompt's K samples).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.config import option
from mmalign.plots import plot_metrics
from mmalign.reference import unwrap
from mmalign.trainer import Trainer

from .base import (
    DenoiserConfig,
    HeldOutReward,
    Parts,
    first_prompts,
    given_grid_prompts,
    held_out_evaluation,
    prepare,
    read_held_out,
    sample_grid,
    save_result,
)
from .data import read_prompts
from .evaluate import RewardFn, checked_rewards, reward_on_device
from .flow import flow_interpolate, sample_u
from .flux import latent_grid
from .latents import from_latents
from .models import denoiser_of
from .scoring import encode_prompts, predict

TIME_FREQUENCIES = 8  # the critic sees sigma through sin and cos at 8 frequencies (16 features)
TIME_SCALE = 1000  # sigma in [0, 1] scaled to the range of diffusion timesteps before the sinusoids


@dataclass
class Config(DenoiserConfig):
    """AC-Flow settings (plus the denoiser's and the training loop's); batch_size counts prompts per step."""

    schedule: ClassVar[Literal["flow", "diffusion"] | None] = "flow"
    unsharded_because: ClassVar[str | None] = ("it trains the denoiser and its critic as one container whose parts the "
                                               "step calls one by one, and FSDP gathers a module's weights only when "
                                               "that module itself is called")

    prompts: str = option(None, "text file of training prompts, one per line")
    reward: str | RewardFn = option("mmalign.diffusion.world:reward", "reward callable as module:function, a reward-"
                                    "model folder (`mmalign reward train`), a reward spec of named scorers "
                                    "(pickscore:1.0,hpsv21=FILE:0.5), or from Python the callable itself; "
                                    "called as reward(images, prompts) -> [N]")
    samples_per_prompt: int = option(4, "K images sampled per prompt each step")
    sample_steps: int = option(10, "Euler steps of the actor's samples")
    guidance_scale: float = option(1.0, "classifier-free guidance of the samples (1: none; see the module docstring)")
    beta: float = option(0.5, "advantage temperature of the weights exp(beta * A)")
    advantage_clip: float = option(5.0, "advantages are clipped to [-clip, clip]")
    alpha: float = option(1.0, "weight of the W2 regulariser ||v_theta - v_ref||^2")
    critic_warmup: int = option(20, "optimizer steps during which only the critic learns to weight (A = r~)")
    critic_weight: float = option(1.0, "weight of the critic's regression loss")
    critic_width: int = option(64, "channels of the critic network")
    learning_rate: float = option(1e-4, "peak learning rate of actor and critic")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompts:
            raise ValueError("--prompts is required")
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be at least 2 (rewards are standardised per prompt)")
        if self.sample_steps < 1 or self.critic_warmup < 0 or self.advantage_clip <= 0:
            raise ValueError("sample_steps >= 1, critic_warmup >= 0 and advantage_clip > 0 are required")


class Critic(nn.Module):
    """V(x_t, sigma, c): a small conv net on the intermediate latent, with sigma and the pooled prompt embedding."""

    def __init__(self, latent_channels: int, prompt_dim: int, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(width + prompt_dim + 2 * TIME_FREQUENCIES, width), nn.SiLU(),
                                  nn.Linear(width, 1))

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(TIME_FREQUENCIES, device=latents.device, dtype=latents.dtype)
        freqs = torch.exp(steps * -math.log(TIME_SCALE) / TIME_FREQUENCIES)
        angle = sigma.to(latents.dtype)[:, None] * TIME_SCALE * freqs
        time = torch.cat([angle.sin(), angle.cos()], dim=1)
        return self.head(torch.cat([self.features(latents), prompt.to(latents.dtype), time], dim=1)).squeeze(1)


class ActorCritic(nn.Module):
    """The trained modules together (the actor is the pipeline's denoiser); one forward gives velocity and value."""

    def __init__(self, actor: nn.Module, critic: Critic, num_train_timesteps: int):
        super().__init__()
        self.actor, self.critic, self.num_train_timesteps = actor, critic, num_train_timesteps

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition) -> tuple[torch.Tensor, torch.Tensor]:
        velocity = predict(self.actor, noisy, timesteps, condition)
        sigma = timesteps / self.num_train_timesteps  # diffusers' flow timesteps are sigma * num_train_timesteps
        return velocity, self.critic(noisy, sigma, condition.kwargs["pooled_projections"])


class StepCount:
    """Optimizer steps seen, kept in checkpoints so a resumed run knows whether the critic warm-up is over."""

    def __init__(self) -> None:
        self.micro_steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"micro_steps": self.micro_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.micro_steps = state["micro_steps"]


def shape_rewards(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Per-prompt standardisation of rewards [B*K] (K consecutive samples per prompt): (r - mean) / (std + 1e-6)."""
    grouped = rewards.view(-1, k)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).flatten()


def diversity(images: torch.Tensor, k: int) -> torch.Tensor:
    """Mean pairwise L2 distance between the K images of each prompt (images [B*K,3,H,W]), averaged over prompts."""
    flat = images.flatten(1).view(-1, k, images[0].numel())
    distances = torch.cdist(flat, flat)
    return distances.sum(dim=(1, 2)).mean() / (k * (k - 1))


@torch.no_grad()
def sample(parts: Parts[Config], prompts: list[str], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The actor's samples as training latents x0 and as images in [0, 1]."""
    c = parts.config
    latents = parts.pipe(prompt=prompts, num_inference_steps=c.sample_steps,
                         guidance_scale=c.sampler_guidance(parts.pipe, c.guidance_scale), height=parts.resolution,
                         width=parts.resolution, generator=generator, output_type="latent").images
    latents = latent_grid(parts.pipe, latents, parts.resolution)
    return latents, from_latents(latents, parts.pipe.vae)


def acflow_step(container, batch: dict[str, Any], generator: torch.Generator, *, parts: Parts[Config],
                reward_fn: RewardFn, count: StepCount) -> tuple[torch.Tensor, dict]:
    """One AC-Flow micro-step: sample, score, shape, critic regression, critic-weighted flow matching + W2."""
    config, k = parts.config, parts.config.samples_per_prompt
    prompts = [p for p in batch["prompt"] for _ in range(k)]
    x0, images = sample(parts, prompts, generator)
    rewards = checked_rewards(reward_fn, images, prompts, config.reward)
    shaped = shape_rewards(rewards, k)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    u = sample_u(len(prompts), generator, x0.device)
    noisy, timesteps, target = flow_interpolate(parts.noise_scheduler, x0, noise, u)
    condition = encode_prompts(parts.pipe, prompts, parts.resolution, x0.device, config.distilled_guidance)
    velocity, value = container(noisy, timesteps, condition)
    actor_critic = unwrap(container)
    assert isinstance(actor_critic, ActorCritic)  # what `run` trains, inside any DDP/compile wrapper
    reference_velocity = parts.reference.scores(lambda m, _: predict(m, noisy, timesteps, condition),
                                                actor_critic.actor, batch)
    warm = count.micro_steps < config.critic_warmup * config.gradient_accumulation_steps
    count.micro_steps += 1
    advantage = (shaped if warm else shaped - value.detach()).clamp(-config.advantage_clip, config.advantage_clip)
    weights = torch.exp(config.beta * advantage)
    weights = weights / weights.mean()
    fm = (weights * (velocity.float() - target.float()).pow(2).flatten(1).mean(1)).mean()
    w2 = (velocity.float() - reference_velocity.float()).pow(2).mean()
    critic_loss = F.mse_loss(value.float(), shaped)
    loss = fm + config.alpha * w2 + config.critic_weight * critic_loss
    return loss, {"reward": rewards.mean(), "critic_loss": critic_loss.detach(), "advantage": advantage.abs().mean(),
                  "weight_max": weights.max(), "w2": w2.detach(), "flow_matching": fm.detach(),
                  "diversity": diversity(images, k), "critic_warmup": torch.tensor(float(warm))}


class Prompts(torch.utils.data.Dataset):
    """Training prompts as {'prompt': text}."""

    def __init__(self, path: str | Path):
        self.prompts = read_prompts(path)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, str]:
        return {"prompt": self.prompts[i]}


def online_setup(config: DenoiserConfig, prompts_file: str, reward: str | RewardFn
                 ) -> tuple[Prompts, list[str], Trainer, RewardFn, HeldOutReward | None]:
    """What an online method (AC-Flow, GRPO) reads and checks before its model loads: the training prompts, the grid
    prompts, the trainer, the reward callable on its device and the held-out set."""
    prompts = Prompts(prompts_file)
    trainer = Trainer(config)
    reward_fn = reward_on_device(reward, trainer.device)
    return (prompts, given_grid_prompts(config) or first_prompts(prompts.prompts), trainer, reward_fn,
            read_held_out(config, trainer.device))


def collate_prompts(items: list[dict[str, str]]) -> dict[str, list[str]]:
    return {"prompt": [it["prompt"] for it in items]}


def run(config: Config) -> list[dict[str, float]]:
    """`mmalign diffusion acflow`: AC-Flow training into config.output (actor LoRA or pipeline, critic.safetensors)."""
    from safetensors.torch import save_file

    prompts, shown, trainer, reward_fn, held_out = online_setup(config, config.prompts, config.reward)
    pipe, parts = prepare(config, trainer)
    actor = denoiser_of(pipe)
    pooled = encode_prompts(pipe, [""], parts.resolution, trainer.device).kwargs["pooled_projections"].shape[-1]
    critic = Critic(pipe.vae.config.latent_channels, pooled, config.critic_width).to(trainer.device)
    container = ActorCritic(actor, critic, parts.noise_scheduler.config.num_train_timesteps)
    count = StepCount()

    def save(model: ActorCritic, output: Path) -> None:
        save_result(parts, model.actor, output)
        save_file({k: v.contiguous() for k, v in model.critic.state_dict().items()}, str(output / "critic.safetensors"))

    trainer.begin()  # everything is checked: the run folder is created here, before the first grid is written
    if trainer.resume_from is None:
        sample_grid(trainer, parts, shown, "samples_before.png")
    step = functools.partial(acflow_step, parts=parts, reward_fn=reward_fn, count=count)
    history = trainer.fit(container, prompts, collate_prompts, step, save_model=save, stateful=(count,),
                          finish=lambda: sample_grid(trainer, parts, shown, "samples_after.png", config.max_steps),
                          evaluation=held_out_evaluation(parts, held_out))
    if trainer.is_main:
        plot_metrics(history, ["reward", "diversity", "critic_loss", "advantage", "w2", "loss"],
                     config.output / "curves.png", title="AC-Flow")
    return history
