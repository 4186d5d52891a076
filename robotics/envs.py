"""Meta-World 3 tasks through gymnasium: `gym.make("Meta-World/MT1", env_name=task)`, vectorised, headless frames.

An MT1 task has 50 initial states (object and goal positions), drawn when the environment is made
from `state_seed` (Meta-World's `seed` argument; without it every instance draws its own). Meta-World
then picks one at random on every reset from a generator that the reset's own seed has not touched
yet, so `reset(seed=s)` is not reproducible by itself; `InitialState` makes it so: `reset(seed=s)`
puts the task in initial state `s mod 50`, and `reset(options={"initial_state": k})` in state k.
Episodes last `max_episode_steps` (success does not end them), so a vectorised batch of episodes runs
in lockstep.

Frames: MuJoCo renders offscreen through EGL unless MUJOCO_GL says otherwise (set before the first
import of mujoco); shadows and multisampling are switched off, which makes small frames several
times faster on a CPU renderer.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable

from mmalign.errors import ConfigError

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import metaworld  # noqa: E402,F401  (registers Meta-World/MT1)
import numpy as np  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402
from metaworld.policies.policy import Policy  # noqa: E402
from metaworld.sawyer_xyz_env import SawyerXYZEnv  # noqa: E402

warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", module="metaworld")

TASKS = tuple(sorted(ENV_POLICY_MAP))
NUM_INITIAL_STATES = 50
OBSERVATION_SIZE, ACTION_SIZE = 39, 4  # the same in every Meta-World v3 task
CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
UPSIDE_DOWN = ("corner", "corner2", "corner3", "corner4")


def check_task(task: str) -> str:
    """The task name if Meta-World 3 has a scripted expert for it; otherwise a ConfigError naming close matches."""
    if task in TASKS:
        return task
    close = difflib.get_close_matches(task, TASKS, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"v3 names such as {', '.join(TASKS[:4])}, ..."
    raise ConfigError(f"unknown Meta-World task {task!r}; {hint}")


def metaworld_env(env: gym.Env) -> SawyerXYZEnv:
    """The Meta-World environment inside `env`'s wrappers."""
    inner = env.unwrapped
    assert isinstance(inner, SawyerXYZEnv)  # every environment here is made by `make_env`
    return inner


class InitialState(gym.Wrapper):
    """reset(seed=s) starts in initial state s mod 50; reset(options={'initial_state': k}) in state k."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.tasks = env.get_wrapper_attr("tasks")
        env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        options = dict(options or {})
        index = options.pop("initial_state", None)
        if index is None:
            index = seed if seed is not None else int(self.np_random.integers(len(self.tasks)))
        metaworld_env(self.env).set_task(self.tasks[index % len(self.tasks)])
        return self.env.reset(seed=seed, options=options or None)


class Frames(gym.Wrapper):
    """Adds info['frame'] (uint8 [H, W, 3], upright) to the observations numbered 0, k, 2k, ... of an episode."""

    def __init__(self, env: gym.Env, frame_every: int = 1):
        super().__init__(env)
        self.frame_every, self.t = frame_every, 0

    def _frame(self, info: dict) -> dict:
        self.t += 1
        if (self.t - 1) % self.frame_every:
            return info
        frame = self.env.render()
        assert isinstance(frame, np.ndarray)  # render_mode "rgb_array": one image
        if metaworld_env(self.env).camera_name in UPSIDE_DOWN:
            frame = frame[::-1, ::-1]
        return {**info, "frame": frame.copy()}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.t = 0
        return obs, self._frame(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self._frame(info)


def make_env(task: str, max_episode_steps: int = 150, frames: bool = False, camera: str = "topview",
             size: int = 64, frame_every: int = 1, state_seed: int = 0) -> gym.Env:
    """One Meta-World MT1 environment with reproducible initial states; `frames` adds info['frame'] every k steps."""
    check_task(task)
    if max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be at least 1, got {max_episode_steps}")
    if camera not in CAMERAS:
        raise ValueError(f"unknown camera {camera!r}; choose one of {', '.join(CAMERAS)}")
    if frame_every < 1:
        raise ValueError(f"frame_every must be at least 1, got {frame_every}")
    render = dict(render_mode="rgb_array", camera_name=camera, width=size, height=size) if frames else {}
    env = gym.make("Meta-World/MT1", env_name=task, seed=state_seed, max_episode_steps=max_episode_steps,
                   disable_env_checker=True, **render)
    if frames:
        quality = metaworld_env(env).model.vis.quality
        quality.shadowsize, quality.offsamples = 0, 0
        env = Frames(env, frame_every)
    return InitialState(env)


def make_vector_env(task: str, num_envs: int, max_episode_steps: int = 150, frames: bool = False,
                    camera: str = "topview", size: int = 64, frame_every: int = 1, state_seed: int = 0,
                    mode: str = "sync") -> gym.vector.SyncVectorEnv | gym.vector.AsyncVectorEnv:
    """`num_envs` copies of `make_env` stepped together: 'sync' in this process, 'async' one process each."""
    check_task(task)
    if num_envs < 1:
        raise ValueError(f"num_envs must be at least 1, got {num_envs}")
    if mode not in ("sync", "async"):
        raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
    factories = [lambda: make_env(task, max_episode_steps, frames, camera, size, frame_every, state_seed)] * num_envs
    vector = gym.vector.SyncVectorEnv if mode == "sync" else gym.vector.AsyncVectorEnv
    return vector(factories, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def scripted_expert(task: str) -> Policy:
    """Meta-World's scripted expert for `task` (`.get_action(obs) -> action`)."""
    expert: Callable[[], Policy] = ENV_POLICY_MAP[check_task(task)]  # a concrete subclass of Meta-World's Policy
    return expert()
