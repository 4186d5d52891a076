"""Collect trajectories in Meta-World: `mmalign robotics collect --task push-v3 --episodes 200 --output data/push.npz`.

Policies: the scripted expert with Gaussian action noise (`--noise 0 0.5 1 2`: episode i uses
noise[i mod len]), uniform random actions, or a learned Gaussian policy (`--policy learned
--policy-path RUN`). Episode i starts from initial state `first_state + i` (mod 50) and runs
`--max-episode-steps` steps in `--num-envs` vectorised environments; `--frames` renders every
`--frame-every`-th observation (headless, MUJOCO_GL=egl by default). Writes one new trajectory file (an
existing `--output` is refused; a learned policy is read and checked before the first rollout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from tqdm.auto import tqdm

from mmalign.config import option
from mmalign.errors import ConfigError

from .envs import CAMERAS, check_task, make_vector_env
from .policies import PolicyActor, load_policy
from .rollout import NoisyExpert, RandomPolicy, rollout
from .trajectories import Trajectories

Camera = Literal[CAMERAS]  # type: ignore[valid-type]


@dataclass
class Config:
    """Settings of `mmalign robotics collect`."""

    task: str = option(None, "Meta-World v3 task, e.g. push-v3")
    output: Path = option(None, "trajectory file to write (.npz; must not exist)")
    writes_file: ClassVar[bool] = True  # --output is one new file, not a run folder
    episodes: int = option(100, "episodes to collect")
    policy: Literal["expert", "random", "learned"] = option("expert", "who acts")
    noise: list[float] = option([0.0], "expert action-noise std per episode, cycled")
    policy_path: str | None = option(None, "--policy learned: a folder holding policy.safetensors/.json",
                                     reads="folder")
    deterministic: bool = option(False, "--policy learned: act with the mean instead of sampling")
    max_episode_steps: int = option(150, "steps per episode")
    first_state: int = option(0, "initial state of the first episode (episode i starts in first_state + i, mod 50)")
    state_seed: int = option(0, "seed that draws the task's 50 initial states")
    num_envs: int = option(4, "vectorised environments")
    vector_mode: Literal["sync", "async"] = option("sync", "sync: one process; async: one process per environment")
    frames: bool = option(False, "render frames (headless)")
    frame_every: int = option(1, "render every k-th observation")
    camera: Camera = option("topview", "camera of the frames")
    size: int = option(64, "frame width and height in pixels")
    seed: int = option(0, "seed of the action noise and the policy's sampling")

    def __post_init__(self) -> None:
        if not self.task:
            raise ValueError("--task is required")
        check_task(self.task)
        if self.output is None:
            raise ValueError("--output (a .npz file) is required")
        self.output = Path(self.output)
        if self.output.suffix != ".npz":
            raise ValueError(f"--output must end in .npz, got {self.output}")
        for name in ("episodes", "max_episode_steps", "num_envs", "frame_every", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("state_seed", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.camera not in CAMERAS:
            raise ValueError(f"unknown camera {self.camera!r}; choose one of {', '.join(CAMERAS)}")
        if (self.policy == "learned") != bool(self.policy_path):
            raise ValueError("--policy learned needs --policy-path" if self.policy == "learned"
                             else f"--policy-path is for --policy learned, not --policy {self.policy}")
        if not self.noise or not all(0 <= n < math.inf for n in self.noise):
            raise ValueError(f"noise must be a non-empty list of finite, non-negative numbers, got {self.noise}")


def make_policy(config: Config):
    """The rollout policy and its per-episode info columns."""
    if config.policy == "expert":
        noise = np.resize(np.asarray(config.noise, dtype=np.float64), config.episodes)
        return NoisyExpert(config.task, noise, seed=config.seed), {"noise": noise}
    if config.policy == "random":
        return RandomPolicy(seed=config.seed), {}
    assert config.policy_path is not None  # Config requires it for --policy learned
    return PolicyActor(load_policy(config.policy_path), config.deterministic, seed=config.seed), {}


def run(config: Config) -> Trajectories:
    """Roll out and write the trajectory file; prints the mean return and success rate."""
    if config.output.exists():
        raise ConfigError(f"--output {config.output} already exists; collect writes a new file (nothing was collected)")
    policy, info = make_policy(config)
    env = make_vector_env(config.task, min(config.num_envs, config.episodes), config.max_episode_steps,
                          config.frames, config.camera, config.size, config.frame_every, config.state_seed,
                          config.vector_mode)
    states = (config.first_state + np.arange(config.episodes)) % 50
    with tqdm(total=config.episodes, desc=f"collect {config.task}") as bar:
        trajs = rollout(env, policy, states, config.task, info, progress=bar.update)
    env.close()
    trajs.meta.update(policy=config.policy, max_episode_steps=config.max_episode_steps, state_seed=config.state_seed,
                      camera=config.camera if config.frames else None)
    trajs.save(config.output)
    print(f"{len(trajs)} episodes of {config.task} -> {config.output}: mean return {trajs.returns().mean():.1f}, "
          f"success {trajs.success().mean():.2f}")
    return trajs
