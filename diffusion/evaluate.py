"""Held-out evaluation of a pipeline by a reward: fixed-seed samples per prompt, mean reward with a 95% CI."""

from __future__ import annotations

from collections.abc import Callable

import torch

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
