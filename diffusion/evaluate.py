"""Held-out evaluation of a pipeline by a reward: fixed-seed samples per prompt, mean reward with a 95% CI; the reward
callables every command reads (`load_reward`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mmalign.errors import ConfigError
from mmalign.stats import mean_ci

from .sample import generate

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


def fixed_seed_samples(pipe, prompts: list[str], per_prompt: int = 8, seed: int = 1000, steps: int = 20,
                       guidance_scale: float = 5.0, **generate_kwargs) -> tuple[list[str], torch.Tensor]:
    """`per_prompt` images of each prompt, sample i (of prompt i // per_prompt) with seed `seed + i`: the prompt of each
    sample and the images. `generate_kwargs` go to `sample.generate` (batch_size, height, width)."""
    expanded = [p for p in prompts for _ in range(per_prompt)]
    return expanded, generate(pipe, expanded, seed=seed, steps=steps, guidance_scale=guidance_scale, **generate_kwargs)


def evaluate_reward(pipe, prompts: list[str], reward_fn: RewardFn, per_prompt: int = 8, seed: int = 1000,
                    steps: int = 20, guidance_scale: float = 5.0
                    ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Sample `per_prompt` images per prompt (sample i with seed `seed + i`), score them: summary, rewards, images."""
    expanded, images = fixed_seed_samples(pipe, prompts, per_prompt, seed, steps, guidance_scale)
    rewards = reward_fn(images, expanded).float()
    if not torch.isfinite(rewards).all():
        raise ValueError("the reward function returned NaN or infinite values")
    return mean_ci(rewards), rewards, images


def paired_gain(base, tuned, prompts: list[str], reward_fn: RewardFn,
                **sampling) -> tuple[dict[str, float], torch.Tensor]:
    """Mean and 95% CI of r(tuned sample) - r(base sample) over the same seeds and prompts; also the tuned images.

    `sampling` goes to `evaluate_reward` (per_prompt, seed, steps, guidance_scale)."""
    _, base_rewards, _ = evaluate_reward(base, prompts, reward_fn, **sampling)
    _, tuned_rewards, images = evaluate_reward(tuned, prompts, reward_fn, **sampling)
    return mean_ci(tuned_rewards - base_rewards), images


def load_reward(spec: str, where: str = "--reward") -> RewardFn:
    """The callable named `module:function`, the `score` of a reward-model folder (`mmalign reward train`), or of a
    reward spec of named scorers (`pickscore:1.0,aesthetic=FILE:0.2`, `mmalign.diffusion.rewards.combine`)."""
    from .rewards.combine import is_reward_spec, load_reward_spec

    if is_reward_spec(spec):
        return load_reward_spec(spec, where=where).score
    if Path(spec).is_dir():
        from .rewards import load_scorer

        return load_scorer(spec).requires_grad_(False).score
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{where} {spec}: cannot import it as module:function ({err})") from None
    if not callable(fn):
        raise ConfigError(f"{where} {spec}: {name} is not callable")
    return fn


def checked_rewards(reward_fn: RewardFn, images: torch.Tensor, prompts: list[str],
                    spec: str | RewardFn, where: str = "--reward") -> torch.Tensor:
    """reward_fn(images, prompts) as float32 [N] on the images' device; anything but N finite numbers: ConfigError.
    Videos [N,F,3,H,W] get the mean of their frames' rewards, r(video, y) = (1/F) sum_f r(frame_f, y), so every image
    reward scores videos."""
    if images.dim() == 5:
        count, frames = images.shape[:2]
        expanded = [prompt for prompt in prompts for _ in range(frames)]
        return checked_rewards(reward_fn, images.flatten(0, 1), expanded, spec, where).view(count, frames).mean(1)
    rewards = reward_fn(images, prompts).float().to(images.device)
    if rewards.shape != (len(prompts),) or not torch.isfinite(rewards).all():
        raise ConfigError(f"{where} {spec} returned {tuple(rewards.shape)} values"
                          f"{'' if torch.isfinite(rewards).all() else ' with NaN or inf'}; expected {len(prompts)} "
                          "finite numbers, one per image (per frame of a video)")
    return rewards


def reward_on_device(reward: str | RewardFn, device: torch.device, where: str = "--reward") -> RewardFn:
    """The reward callable (`load_reward` of a spec), a reward model moved to where training runs."""
    reward_fn = reward if callable(reward) else load_reward(reward, where)
    owner = getattr(reward_fn, "__self__", None)
    if isinstance(owner, nn.Module):
        owner.to(device)
    return reward_fn
