"""SB3's replay buffer for preference RL (PEBBLE, Lee et al. 2021): true rewards kept for the teacher, relabelling.

The buffer stores what SAC learns from (the reward of the moment: learned, intrinsic or true) and, beside
it, each step's true reward and success flag from the environment's info, which only the scripted teacher
reads. `relabel` rewrites every stored reward with the current reward model, r_i = r_hat(s_i, a_i).
While `entropy_k` is set, sampled batches carry PEBBLE's unsupervised state-entropy reward instead:

    r_int(s') = ||s' - s'_kNN|| / std_batch,   s'_kNN the k-th nearest stored observation of the next state

(PEBBLE's code uses the k-NN distance, normalised by a running std; here by the std over the batch, so the
buffer holds no statistic that a checkpoint would have to carry). A checkpoint keeps the filled part as
arrays in one .npz file, read back with pickling off.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.type_aliases import ReplayBufferSamples

from mmalign.errors import RunFolderError
from mmalign.files import write_npz

STORED = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts", "true_rewards", "successes")


def state_entropy(states: torch.Tensor, stored: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """||s_i - s_i^(k)||: distance of each state [B, D] to its k-th nearest among `stored` [N, D] (itself counts)."""
    if not 0 < k <= len(stored):
        raise ValueError(f"k-NN state entropy needs 0 < k <= {len(stored)} stored states, got k={k}")
    nearest = torch.cat([torch.cdist(states, stored[i:i + chunk]) for i in range(0, len(stored), chunk)], dim=1)
    return nearest.kthvalue(k, dim=1).values


class PreferenceReplayBuffer(ReplayBuffer):
    """SB3's ReplayBuffer (one environment) plus `true_rewards` and `successes`, and the state-entropy reward."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.n_envs != 1:
            raise ValueError(f"the preference replay buffer holds one environment's steps, got n_envs={self.n_envs}")
        self.true_rewards = np.zeros((self.buffer_size, 1), dtype=np.float32)
        self.successes = np.zeros((self.buffer_size, 1), dtype=bool)
        self.entropy_k = 0  # > 0: sampled rewards are the k-NN state entropy

    def add(self, obs: np.ndarray, next_obs: np.ndarray, action: np.ndarray, reward: np.ndarray, done: np.ndarray,
            infos: list[dict[str, Any]]) -> None:
        self.true_rewards[self.pos] = [info["true_reward"] for info in infos]
        self.successes[self.pos] = [bool(info.get("success", False)) for info in infos]
        super().add(obs, next_obs, action, reward, done, infos)

    def sample(self, batch_size: int, env: Any = None) -> ReplayBufferSamples:
        batch = super().sample(batch_size, env)
        if not self.entropy_k:
            return batch
        stored = self.to_torch(self.observations[:self.size(), 0]).float()
        distance = state_entropy(batch.next_observations.float(), stored, min(self.entropy_k, len(stored)))
        reward = distance / distance.std().clamp_min(1e-8)
        return batch._replace(rewards=reward.unsqueeze(-1).to(batch.rewards.dtype))

    def save(self, path: str | Path) -> Path:
        """The filled part of every stored array, and the write position, as one .npz (atomically)."""
        n = self.size()
        arrays = {name: getattr(self, name)[:n] for name in STORED}
        return write_npz(path, {"pos": np.asarray(self.pos), "full": np.asarray(self.full), **arrays})

    def load(self, path: str | Path) -> None:
        """Fill the buffer from a file `save` wrote; RunFolderError names the file and field that do not fit."""
        try:
            with np.load(path, allow_pickle=False) as data:
                loaded = {name: data[name] for name in (*STORED, "pos", "full")}
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise RunFolderError(f"{path}: not a replay buffer this run wrote ({err})") from None
        n = len(loaded["observations"])
        for name in STORED:
            want = (n, *getattr(self, name).shape[1:])
            if loaded[name].shape != want:
                raise RunFolderError(f"{path}: field {name!r} has shape {loaded[name].shape}, this run's buffer "
                                     f"needs {want}; was it made with other settings?")
            getattr(self, name)[:n] = loaded[name]
        self.pos, self.full = int(loaded["pos"]), bool(loaded["full"])
        if self.size() != n:
            raise RunFolderError(f"{path}: {n} stored steps but write position {self.pos}")


def relabel(buffer: ReplayBuffer, reward: Callable[[np.ndarray, np.ndarray], np.ndarray], batch: int = 8192) -> None:
    """r_i = reward(s_i, a_i) for every stored step (observations [n, D], actions [n, A] -> rewards [n])."""
    n = buffer.size()
    for begin in range(0, n, batch):
        end = min(begin + batch, n)
        buffer.rewards[begin:end, 0] = reward(buffer.observations[begin:end, 0], buffer.actions[begin:end, 0])


def segment_starts(dones: np.ndarray, length: int) -> np.ndarray:
    """Steps i where a segment of `length` steps fits inside one episode: no episode ends at steps i .. i+length-2."""
    ends = np.concatenate([[0], np.cumsum(np.asarray(dones, dtype=np.int64))])
    starts = np.arange(max(len(dones) - length + 1, 0))
    return starts[ends[starts + length - 1] - ends[starts] == 0]


def sample_segments(buffer: PreferenceReplayBuffer, length: int, num: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`num` random segments of `length` steps within episodes: observations, actions, true_rewards, successes."""
    starts = segment_starts(buffer.dones[:buffer.size(), 0], length)
    if not len(starts):
        raise ValueError(f"no episode in the replay buffer holds a segment of {length} steps yet")
    steps = rng.choice(starts, size=num)[:, None] + np.arange(length)
    return {name: getattr(buffer, name)[steps, 0] for name in ("observations", "actions", "true_rewards", "successes")}
