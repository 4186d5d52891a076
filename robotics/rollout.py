"""Roll policies out in a vectorised Meta-World environment: scripted experts with action noise, random, learned.

A policy maps a batch of observations [n, D] to actions [n, A]; one with a `reset(episodes)` method
is told which episodes (indices into the rollout's list) the next batch plays, so that it can hold
per-episode settings. Every episode starts from the initial state given for it and runs the
environment's full `max_episode_steps` (success does not end it); episodes run in lockstep,
`num_envs` at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from .envs import scripted_expert
from .trajectories import Trajectories

Policy = Callable[[np.ndarray], np.ndarray]


class NoisyExpert:
    """a = clip(expert(o) + sigma_e * N(0, I), -1, 1), sigma_e the noise of episode e (one value or one per episode)."""

    def __init__(self, task: str, noise: float | np.ndarray = 0.0, seed: int = 0):
        self.expert = scripted_expert(task)
        self.noise = np.asarray(noise, dtype=np.float64)
        if (self.noise < 0).any():
            raise ValueError(f"action noise must not be negative, got {noise}")
        self.rng = np.random.default_rng(seed)
        self.sigma = self.noise if self.noise.ndim == 0 else None

    def reset(self, episodes: np.ndarray) -> None:
        """Take the noise of the episodes the next batch plays."""
        if self.noise.ndim:
            self.sigma = self.noise[episodes]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if self.sigma is None:
            raise ValueError("per-episode action noise needs reset(episodes) before the first batch")
        clean = np.stack([self.expert.get_action(o) for o in obs])
        noise = np.broadcast_to(self.sigma, (len(obs),))[:, None] * self.rng.standard_normal(clean.shape)
        return np.clip(clean + noise, -1.0, 1.0)


class RandomPolicy:
    """Uniform actions in [-1, 1]^A."""

    def __init__(self, action_dim: int = 4, seed: int = 0):
        self.action_dim, self.rng = action_dim, np.random.default_rng(seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=(len(obs), self.action_dim))


def rollout(env: gym.vector.SyncVectorEnv | gym.vector.AsyncVectorEnv, policy: Policy,
            initial_states: Sequence[int] | np.ndarray, task: str, info: dict[str, np.ndarray] | None = None,
            progress: Callable[[int], None] | None = None) -> Trajectories:
    """One episode per entry of `initial_states`; `info` adds per-episode columns; returns Trajectories.

    The policy is called on whole batches of `env.num_envs` observations; a short last batch is
    padded with repeats and its extra episodes dropped.
    """
    starts = np.asarray(initial_states, dtype=np.int64)
    n_env = env.num_envs
    horizon = env.get_attr("_max_episode_steps")[0]  # TimeLimit's; an env spec does not pickle to async workers
    chunks: list[dict[str, Any]] = []
    for begin in range(0, len(starts), n_env):
        states = starts[begin:begin + n_env]
        padded = np.resize(states, n_env)
        if hasattr(policy, "reset"):
            policy.reset(np.resize(np.arange(begin, begin + len(states)), n_env))
        obs, reset_info = env.reset(seed=[int(s) for s in padded])
        record: dict[str, list[np.ndarray]] = {"observations": [], "actions": [], "rewards": [], "successes": []}
        frames = [reset_info["frame"]] if "frame" in reset_info else []
        for t in range(horizon):
            action = np.asarray(policy(obs), dtype=np.float32)
            record["observations"].append(obs)
            record["actions"].append(action)
            obs, reward, _, _, step_info = env.step(action)
            record["rewards"].append(reward)
            record["successes"].append(np.asarray(step_info["success"]) > 0)
            if "frame" in step_info and t + 1 < horizon:
                frames.append(step_info["frame"])
        arrays: dict[str, Any] = {k: np.stack(v, axis=1)[:len(states)] for k, v in record.items()}
        arrays["frames"] = np.stack(frames, axis=1)[:len(states)] if frames else None
        chunks.append(arrays)
        if progress is not None:
            progress(len(states))
    columns = {"initial_state": starts, **(info or {})}
    frame_every = env.get_attr("frame_every")[0] if chunks[0]["frames"] is not None else 1

    def joined(key: str) -> np.ndarray:
        return np.concatenate([c[key] for c in chunks])

    return Trajectories(task, joined("observations"), joined("actions"), joined("rewards"), joined("successes"),
                        None if chunks[0]["frames"] is None else joined("frames"), columns,
                        {"frame_every": int(frame_every)})
