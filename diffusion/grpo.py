"""Online RL of a generator from a reward with group-relative advantages and PPO's clipped ratio: Flow-GRPO (arXiv
2505.05470) on flow models (SD3, SD3.5, FLUX.1, and Wan 2.1 text-to-video) and DDPO (arXiv 2305.13301) on diffusion
models (SD, SDXL), with the Flow-GRPO-Fast, MixGRPO (arXiv 2507.21802) and DanceGRPO options.

Each sampler step is a Gaussian policy N(mean_theta(x_i, c), std_i^2) (`mmalign.diffusion.sde`): Flow-GRPO's SDE with
the Euler ODE's marginals for flow models, DDIM with eta > 0 for diffusion models; which one follows from the model's
scheduler, and everything below is the same for both. A text-to-video pipeline (Wan 2.1's WanPipeline, also UNet3D's)
samples K videos per prompt the same way: the policy is the step on the whole video latent [C, F', h, w] (Wan: F' =
1 + (F-1)/4 for F = `--num-frames` = 4k+1), on the flow sigmas and timesteps Wan's UniPC sampler uses
(`sde.policy_schedule`), and the videos are decoded to frames for the reward. The choices, where the papers and their
code leave them open:

1. Rollout. The current policy samples K images per prompt (no gradients, `--sample-steps` steps, `--noise-level` eta:
   Flow-GRPO's 0.7 for flow models, DDPO's 1.0 for DDIM), keeping x_i, x_{i+1}, log pi_old(x_{i+1} | x_i) and the step
   of every trained step. The K samples of a prompt are drawn on one process (its prompts are expanded there), so a
   group never spans processes and the advantages need no gathering; equal prompts drawn on two processes are two
   groups. `--shared-noise` starts a group from one initial noise (DanceGRPO).
2. Reward and advantage. Reward: `evaluate.load_reward` of --reward, an image reward; a video's reward is the mean of
   its frames' rewards (`evaluate.checked_rewards`), so every reward callable, scorer and spec scores videos.
   A = (r - mean_K r) / (std_K r + 1e-6) (`acflow.shape_rewards`) clipped to [-5, 5] (Flow-GRPO's adv_clip_max). No
   reward history per prompt (Flow-GRPO's stat tracker keeps none across epochs either).
3. Loss per (sample, trained step): PPO's -min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(log pi_theta - log pi_old),
   eps = 1e-4 (both references), plus beta * KL(pi_theta || pi_ref) between the two Gaussians of the step, which share
   std: mean((mean_theta - mean_ref)^2) / (2 std^2), std^2 = std_t^2 (-dt) for the flow SDE. Flow-GRPO's code divides
   by 2 std_t^2 alone, i.e. its KL is (-dt) times this one; beta 0.004 here matches its 0.04 at 10 even steps (-dt 0.1).
   The reference is the LoRA switched off or the frozen copy (`parts.reference`); beta 0 skips its forward (DDPO has
   no KL). Log-probs and KLs are means over the latent's elements (both references), so eps does not depend on the
   resolution. The loss of a micro-step is the mean over its trained steps, one graph (memory grows with their
   number: `--train-steps-fraction`, `--sde-window`, `--gradient-checkpointing` bound it).
4. Rollout reuse. A rollout's samples are shuffled and split into `--updates-per-rollout` U parts, one per micro-step
   (`--gradient-accumulation-steps` micro-steps make an optimizer step): U = 2 with no accumulation gives Flow-GRPO's
   two optimizer steps per rollout, the second off-policy (r departs from 1 and the clip acts). The parts not yet
   trained on are training state (`RolloutBuffer`, kept in checkpoints), so a resumed run trains on exactly the samples
   the uninterrupted one would. Micro-steps that train on a stored part do not sample, and their prompts go unused.
5. Steps trained ("Fast"). `--train-steps-fraction` f trains floor(f * S) of a sample's S stochastic steps: the first
   ones (`--step-selection first`, Flow-GRPO's timestep_fraction) or a random subset per sample (`random`, DanceGRPO).
   `--sde-window` w > 0 is MixGRPO's sliding window: only w consecutive steps are stochastic (and trained), ODE steps
   (eta 0) elsewhere; the window starts at step 0 and moves one step every `--window-every` optimizer steps, back to 0
   after the last position.
6. Guidance. The policy is the guided sampler: u + g (c - u) with the empty prompt as u, in rollout and in training
   alike, so the log-probs, ratios and KL are those of the sampler that is deployed. The default g = 4.5 is
   Flow-GRPO's for SD3 (DDPO samples SD 1.5 at 5); it doubles every forward, and `--guidance-scale 1` turns it off.
   Guidance-distilled FLUX.1-dev takes no classifier-free guidance: its guidance embedding is `--distilled-guidance`
   throughout (Flow-GRPO's FLUX setting).
Logged: reward (rollout mean), reward_std (mean within-prompt std), advantage (mean |A|), ratio (mean r), clip_fraction
(|r - 1| > eps), approx_kl (0.5 mean (log r)^2), kl (beta > 0), diversity (AC-Flow's), policy_loss; each a mean over
the trained steps.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from accelerate.utils import send_to_device
from torch import nn

from mmalign.config import option
from mmalign.errors import ConfigError
from mmalign.plots import plot_metrics
from mmalign.reference import unwrap

from .acflow import collate_prompts, diversity, online_setup, shape_rewards
from .base import (
    DenoiserConfig,
    Parts,
    held_out_evaluation,
    prepare,
    sample_grid,
    save_result,
)
from .evaluate import RewardFn, checked_rewards
from .latents import from_latents, latent_shape
from .models import VIDEO_PIPELINES, denoiser_of
from .scoring import Condition, encode_prompts, is_flow, predict, sampler_default
from .sde import Schedule, clipped_objective, gaussian_kl, gaussian_log_prob, policy_schedule
from .video import check_video_shape

FLOW_NOISE_LEVEL, DDIM_ETA = 0.7, 1.0  # Flow-GRPO's noise_level, DDPO's eta


@dataclass
class Config(DenoiserConfig):
    """Flow-GRPO / DDPO settings (plus the denoiser's and the training loop's); batch_size: prompts per rollout."""

    video: ClassVar[bool | None] = None  # image and text-to-video pipelines alike

    prompts: str = option(None, "text file of training prompts, one per line")
    reward: str | RewardFn = option("mmalign.diffusion.world:reward", "reward callable as module:function, a reward-"
                                    "model folder (`mmalign reward train`), a reward spec of named scorers "
                                    "(pickscore:1.0,hpsv21=FILE:0.5), or from Python the callable itself; called as "
                                    "reward(images, prompts) -> [N]; a video's reward is the mean of its frames' "
                                    "rewards")
    samples_per_prompt: int = option(4, "K images (videos) sampled per prompt (one group) in each rollout")
    num_frames: int | None = option(None, "text-to-video pipelines: frames of each sampled video (Wan: 4k+1, e.g. 81, "
                                          "33, 17; default: the pipeline's own, Wan's 81)")
    sample_steps: int = option(10, "sampler steps of the rollouts (and the grids)")
    guidance_scale: float = option(4.5, "classifier-free guidance of the policy in rollout and training (1: none; "
                                        "see the module docstring)")
    noise_level: float | None = option(None, "eta of the stochastic steps (default: 0.7 for flow models, "
                                             "Flow-GRPO's; 1.0 for DDIM, DDPO's)")
    clip_range: float = option(1e-4, "PPO clip range eps of the ratio")
    advantage_clip: float = option(5.0, "advantages are clipped to [-clip, clip]")
    beta: float = option(0.004, "weight of KL(policy || reference) per step (0: no reference forward)")
    updates_per_rollout: int = option(2, "micro-steps that train on one rollout, each on its own share of the samples")
    train_steps_fraction: float = option(1.0, "fraction of each sample's stochastic steps that is trained")
    step_selection: Literal["first", "random"] = option("first", "trained steps: the first ones (Flow-GRPO) or a "
                                                                 "random subset per sample (DanceGRPO)")
    sde_window: int = option(0, "MixGRPO: stochastic (and trained) steps only in a window of this many steps, ODE "
                                "elsewhere (0: every step is stochastic)")
    window_every: int = option(25, "MixGRPO: the window moves one step every this many optimizer steps")
    shared_noise: bool = option(False, "the K samples of a prompt start from one initial noise (DanceGRPO)")
    learning_rate: float = option(3e-4, "peak learning rate (Flow-GRPO's and DDPO's for a LoRA)")

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            ("prompts", bool(self.prompts), "is required (a text file of training prompts)"),
            ("samples-per-prompt", self.samples_per_prompt >= 2, "must be at least 2 (advantages compare a "
                                                                 "prompt's samples)"),
            ("sample-steps", self.sample_steps >= 1, "must be at least 1"),
            ("num-frames", self.num_frames is None or self.num_frames >= 1, "must be at least 1"),
            ("noise-level", self.noise_level is None or self.noise_level > 0, "must be positive"),
            ("clip-range", self.clip_range > 0, "must be positive"),
            ("advantage-clip", self.advantage_clip > 0, "must be positive"),
            ("beta", self.beta >= 0, "must not be negative"),
            ("train-steps-fraction", 0 < self.train_steps_fraction <= 1, "must be in (0, 1]"),
            ("sde-window", 0 <= self.sde_window <= self.sample_steps, f"must be in [0, --sample-steps "
                                                                      f"{self.sample_steps}]"),
            ("window-every", self.window_every >= 1, "must be at least 1"),
            ("updates-per-rollout", self.updates_per_rollout >= 1
             and self.batch_size * self.samples_per_prompt % self.updates_per_rollout == 0,
             f"must be at least 1 and divide the {self.batch_size * self.samples_per_prompt} samples of a rollout "
             "(--batch-size x --samples-per-prompt)"),
        ]
        for flag, ok, message in checks:
            if not ok:
                value = getattr(self, flag.replace("-", "_"))
                raise ConfigError(f"--{flag} {value}: {message}")

    def sampling_kwargs(self) -> dict[str, Any]:
        return {} if self.num_frames is None else {"num_frames": self.num_frames}


class RolloutBuffer:
    """The parts of the last rollout not trained on yet, and the micro-steps trained so far: training state."""

    def __init__(self) -> None:
        self.parts: list[dict[str, Any]] = []
        self.micro_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"parts": self.parts, "micro_steps": self.micro_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.parts, self.micro_steps = state["parts"], state["micro_steps"]


def video_frames(parts: Parts[Config]) -> int | None:
    """Frames of each sampled video: --num-frames or the pipeline's default, checked against its VAE
    (`video.check_video_shape`); None for an image pipeline, which refuses --num-frames."""
    c, pipe = parts.config, parts.pipe
    if type(pipe).__name__ not in VIDEO_PIPELINES:
        if c.num_frames is not None:
            raise ConfigError(f"--num-frames {c.num_frames}: --model {c.model} is an image pipeline "
                              f"({type(pipe).__name__}); frames are for text-to-video ones "
                              f"({', '.join(VIDEO_PIPELINES)})")
        return None
    frames = c.num_frames or sampler_default(pipe, "num_frames")
    check_video_shape(pipe, frames, parts.resolution)
    return frames


def guidance_of(parts: Parts[Config]) -> float:
    """The classifier-free guidance g of the policy: --guidance-scale, or 1 (none) for a guidance-embedded denoiser."""
    embedded = getattr(denoiser_of(parts.pipe).config, "guidance_embeds", False)
    return 1.0 if embedded else parts.config.guidance_scale


def noise_level_of(parts: Parts[Config]) -> float:
    """eta of the stochastic steps: --noise-level, else Flow-GRPO's for a flow model, DDPO's for DDIM."""
    c = parts.config
    if c.noise_level is not None:
        return c.noise_level
    return FLOW_NOISE_LEVEL if is_flow(parts.noise_scheduler) else DDIM_ETA


def encode(parts: Parts[Config], prompts: list[str], device: torch.device) -> Condition:
    """The prompts' condition, preceded by the empty prompt's for each when the policy is guided."""
    negatives = [""] * len(prompts) if guidance_of(parts) > 1 else []
    return encode_prompts(parts.pipe, negatives + prompts, parts.resolution, device, parts.config.distilled_guidance)


def guided_output(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, condition: Condition,
                  guidance: float) -> torch.Tensor:
    """The denoiser's output at (x, t): u + g (c - u) when g > 1 (the condition holds the unconditional half first)."""
    if guidance <= 1:
        return predict(model, x, timesteps, condition)
    uncond, cond = predict(model, torch.cat([x, x]), torch.cat([timesteps, timesteps]), condition).float().chunk(2)
    return uncond + guidance * (cond - uncond)


def policy_mean(model: nn.Module, _batch: Any, *, x: torch.Tensor, index: torch.Tensor, condition: Condition,
                parts: Parts[Config], schedule: Schedule) -> torch.Tensor:
    """The mean of the step `index` from x under `model` (a `Reference` score function)."""
    output = guided_output(model, x, schedule.timesteps[index], condition, guidance_of(parts))
    return schedule.step(x, output, index, noise_level_of(parts))[0]


def stochastic_steps(total: int, window: int, start: int) -> list[int]:
    """The steps sampled by the SDE: all `total`, or the `window` steps from `start` (MixGRPO)."""
    return list(range(total)) if window == 0 else list(range(start, start + window))


def window_start(optimizer_step: int, total: int, window: int, every: int) -> int:
    """MixGRPO's window position: one step further every `every` optimizer steps, back to 0 after the last."""
    return (optimizer_step // every) % (total - window + 1) if window else 0


def trained_steps(stochastic: list[int], n: int, fraction: float, selection: str, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """[n, S] steps each sample trains on, S = max(1, floor(fraction * len(stochastic))): the first S ("first") or S
    drawn at random per sample ("random"), in sampling order."""
    count = max(1, math.floor(fraction * len(stochastic) + 1e-6))
    pool = torch.tensor(stochastic, device=device)
    if selection == "first":
        return pool[:count].expand(n, count).clone()
    chosen = torch.rand(n, len(stochastic), generator=generator, device=device).argsort(1)[:, :count]
    return pool[chosen].sort(1).values


@torch.no_grad()
def rollout(policy: nn.Module, prompts: list[str], generator: torch.Generator, parts: Parts[Config],
            schedule: Schedule, reward_fn: RewardFn, window: int, latent: tuple[int, ...]) -> list[dict[str, Any]]:
    """K samples per prompt (of latent shape `latent`: [C,h,w], a video's [C,F',h,w]) from the current policy, scored
    and given advantages, shuffled and split into `updates_per_rollout` parts of {prompts, steps, latents,
    next_latents, log_probs, advantages, statistics}."""
    c, k, device = parts.config, parts.config.samples_per_prompt, generator.device
    expanded = [p for p in prompts for _ in range(k)]
    n, total, eta = len(expanded), len(schedule.timesteps), noise_level_of(parts)
    condition = encode(parts, expanded, device)
    x = torch.randn((len(prompts) if c.shared_noise else n, *latent), generator=generator, device=device)
    x = x.repeat_interleave(k, 0) if c.shared_noise else x
    stochastic = stochastic_steps(total, c.sde_window, window)
    trajectory, log_probs = [x], torch.zeros(n, total, device=device)
    for i in range(total):
        index = torch.full((n,), i, device=device)
        output = guided_output(policy, x, schedule.timesteps[index], condition, guidance_of(parts))
        mean, std = schedule.step(x, output, index, eta if i in stochastic else 0.0)
        if i in stochastic:
            x = mean + std * torch.randn(mean.shape, generator=generator, device=device)
            log_probs[:, i] = gaussian_log_prob(x, mean, std)
        else:
            x = mean
        trajectory.append(x)
    images = from_latents(x, parts.pipe.vae)
    rewards = checked_rewards(reward_fn, images, expanded, c.reward)
    advantages = shape_rewards(rewards, k).clamp(-c.advantage_clip, c.advantage_clip)
    steps = trained_steps(stochastic, n, c.train_steps_fraction, c.step_selection, generator, device)
    latents, rows = torch.stack(trajectory, 1), torch.arange(n, device=device)[:, None]
    stats = {"reward": rewards.mean(), "reward_std": rewards.view(-1, k).std(1).mean(),
             "diversity": diversity(images, k)}
    parts_of_rollout = []
    for share in torch.randperm(n, generator=generator, device=device).chunk(c.updates_per_rollout):
        parts_of_rollout.append({
            "prompts": [expanded[i] for i in share.tolist()], "steps": steps[share],
            "latents": latents[rows, steps][share], "next_latents": latents[rows, steps + 1][share],
            "log_probs": log_probs[rows, steps][share], "advantages": advantages[share], **stats})
    return parts_of_rollout


def grpo_step(model: nn.Module, batch: dict[str, Any], generator: torch.Generator, *, parts: Parts[Config],
              schedule: Schedule, reward_fn: RewardFn, buffer: RolloutBuffer, latent: tuple[int, ...]
              ) -> tuple[torch.Tensor, dict]:
    """One micro-step: a rollout when the buffer is empty, then PPO's clipped loss + beta KL on one part of it, averaged
    over its trained steps."""
    c, policy = parts.config, unwrap(model)
    if not buffer.parts:
        optimizer_step = buffer.micro_steps // c.gradient_accumulation_steps
        start = window_start(optimizer_step, len(schedule.timesteps), c.sde_window, c.window_every)
        buffer.parts = rollout(policy, batch["prompt"], generator, parts, schedule, reward_fn, start, latent)
    part = send_to_device(buffer.parts.pop(0), generator.device)
    buffer.micro_steps += 1
    condition = encode(parts, part["prompts"], generator.device)
    guidance, eta = guidance_of(parts), noise_level_of(parts)
    total = torch.zeros((), device=generator.device)
    logged: dict[str, list[torch.Tensor]] = {}
    trained = part["steps"].shape[1]
    for s in range(trained):
        x, index, old = part["latents"][:, s], part["steps"][:, s], part["log_probs"][:, s]
        output = guided_output(model, x, schedule.timesteps[index], condition, guidance)
        mean, std = schedule.step(x, output, index, eta)
        log_prob = gaussian_log_prob(part["next_latents"][:, s], mean, std)
        policy_loss, ratio = clipped_objective(log_prob, old, part["advantages"], c.clip_range)
        step_metrics = {"policy_loss": policy_loss.detach(), "ratio": ratio.detach().mean(),
                        "clip_fraction": ((ratio.detach() - 1).abs() > c.clip_range).float().mean(),
                        "approx_kl": 0.5 * (log_prob.detach() - old).pow(2).mean()}
        total = total + policy_loss
        if c.beta > 0:
            score = functools.partial(policy_mean, x=x, index=index, condition=condition, parts=parts,
                                      schedule=schedule)
            kl = gaussian_kl(mean, parts.reference.scores(score, policy, batch), std).mean()
            total = total + c.beta * kl
            step_metrics["kl"] = kl.detach()
        for key, value in step_metrics.items():
            logged.setdefault(key, []).append(value)
    metrics = {key: part[key] for key in ("reward", "reward_std", "diversity")}
    means = {key: torch.stack(values).mean() for key, values in logged.items()}
    return total / trained, {**metrics, "advantage": part["advantages"].abs().mean(), **means}


def run(config: Config) -> list[dict[str, float]]:
    """`mmalign diffusion grpo`: Flow-GRPO (flow models) or DDPO (diffusion models) into config.output."""
    prompts, shown, trainer, reward_fn, held_out = online_setup(config, config.prompts, config.reward)
    pipe, parts = prepare(config, trainer)
    latent = latent_shape(pipe, parts.resolution, video_frames(parts))
    schedule = policy_schedule(pipe, parts.noise_scheduler, config.sample_steps, latent[-1], trainer.device)
    buffer = RolloutBuffer()
    trainer.begin()  # everything is checked: the run folder is created here, before the first grid is written
    if trainer.resume_from is None:
        sample_grid(trainer, parts, shown, "samples_before.png")
    step = functools.partial(grpo_step, parts=parts, schedule=schedule, reward_fn=reward_fn, buffer=buffer,
                             latent=latent)
    history = trainer.fit(denoiser_of(pipe), prompts, collate_prompts, step,
                          save_model=lambda model, output: save_result(parts, model, Path(output)),
                          stateful=(buffer,),
                          finish=lambda: sample_grid(trainer, parts, shown, "samples_after.png", config.max_steps),
                          evaluation=held_out_evaluation(parts, held_out))
    if trainer.is_main:
        method = "Flow-GRPO" if is_flow(parts.noise_scheduler) else "DDPO"
        plot_metrics(history, ["reward", "advantage", "ratio", "clip_fraction", "kl", "approx_kl", "diversity", "loss"],
                     config.output / "curves.png", title=method)
    return history
