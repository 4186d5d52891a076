"""Environments for RL on a learned reward: a Meta-World task or any gymnasium id, the reward swapped for r_hat(s, a).

`make_rl_env` makes a Meta-World v3 task (`envs.make_env`: reset(seed=s) starts in initial state s mod 50)
or a registered gymnasium environment, both with continuous actions rescaled to [-1, 1] (so the action an
agent stores is the one the environment ran). `LearnedReward` hands the agent r_t = reward(s_t, a_t) and
keeps the environment's own reward in info['true_reward'] (for the teacher and the evaluation);
without a reward function the agent gets the true reward.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from mmalign.errors import ConfigError

from .envs import TASKS, make_env

RewardFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (s [n, D], a [n, A]) -> r [n]


def check_env_name(name: str) -> str:
    """`name` if it is a Meta-World v3 task or a registered gymnasium id; otherwise a ConfigError naming close ones."""
    if name in TASKS or name in gym.registry:
        return name
    close = difflib.get_close_matches(name, [*TASKS, *gym.registry], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else " (a Meta-World v3 task or a gymnasium id)"
    raise ConfigError(f"unknown environment {name!r}{hint}")


def make_rl_env(name: str, max_episode_steps: int, state_seed: int = 0) -> gym.Env:
    """The environment `name` (Meta-World task or gymnasium id), episodes of `max_episode_steps`, actions in [-1, 1]."""
    if check_env_name(name) in TASKS:
        env = make_env(name, max_episode_steps, state_seed=state_seed)
    else:
        env = gym.make(name, max_episode_steps=max_episode_steps, disable_env_checker=True)
    space = env.action_space
    if not isinstance(space, gym.spaces.Box) or not isinstance(env.observation_space, gym.spaces.Box) \
            or len(env.observation_space.shape or ()) != 1:
        raise ConfigError(f"environment {name!r}: SAC here needs flat Box observations and Box actions, got "
                          f"{env.observation_space} and {space}")
    if not (np.all(space.low == -1) and np.all(space.high == 1)):
        ones = np.ones(space.shape, dtype=np.float32)
        env = gym.wrappers.RescaleAction(env, -ones, ones)
    return env


class LearnedReward(gym.Wrapper):
    """r_t = reward_fn(s_t, a_t) (the true reward when reward_fn is None); info['true_reward'] keeps the env's own."""

    def __init__(self, env: gym.Env, reward_fn: RewardFunction | None = None):
        super().__init__(env)
        self.reward_fn = reward_fn
        self.obs: np.ndarray | None = None

    def reset(self, **kwargs: Any):
        obs, info = self.env.reset(**kwargs)
        self.obs = obs
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = {**info, "true_reward": float(reward)}
        if self.reward_fn is not None:
            reward = float(self.reward_fn(np.asarray(self.obs)[None], np.asarray(action)[None])[0])
        self.obs = obs
        return obs, reward, terminated, truncated, info


def evaluate(act: Callable[[np.ndarray], np.ndarray], name: str, max_episode_steps: int, episodes: int,
             state_seed: int = 0) -> dict[str, float]:
    """Mean true return (and, where the env reports it, the share of episodes that ever succeed) of `act` (obs ->
    action) over episodes reset with seeds 0 .. episodes-1."""
    env = make_rl_env(name, max_episode_steps, state_seed)
    returns, successes = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=episode)
        total, success, done = 0.0, False, False
        while not done:
            obs, reward, terminated, truncated, info = env.step(act(obs))
            total += float(reward)
            success = success or float(info.get("success", 0.0)) > 0
            done = terminated or truncated
        returns.append(total)
        successes.append(success)
    env.close()
    report = {"true_return": float(np.mean(returns))}
    if name in TASKS:
        report["success"] = float(np.mean(successes))
    return report
