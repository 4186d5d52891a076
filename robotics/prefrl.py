"""Preference RL (PEBBLE, Lee et al. 2021; B-Pref's teachers and queries): SAC on a reward learned from preferences.

`mmalign robotics prefrl --env reach-v3 --teacher oracle --queries-per-round 20 --total-queries 200 --steps 20000
--output RUN` runs stable-baselines3's SAC, whose reward is the reward model's r_hat(s, a) (the ensemble mean):

1. `--learning-starts` steps of random actions, then `--unsup-steps` of SAC on PEBBLE's k-NN state-entropy
   reward (`replay.py`; 0: no unsupervised pre-training);
2. feedback: `--candidates` x `--queries-per-round` candidate pairs of `--segment-length`-step segments
   (inside episodes) are drawn from the replay buffer, `--queries-per-round` of them kept by
   `--query-selection` (`queries.py`; uniformly in the first round, before a reward model exists) and labelled
   by the B-Pref `--teacher` (`teachers.py`; a pair it skips is asked but not labelled); the reward ensemble is
   trained on every label so far (`reward.py`, Bradley-Terry, `--max-steps` optimizer steps into
   reward/round-k/, each round continuing from the last), and the whole replay buffer is relabelled with it;
3. SAC learns `--feedback-every` steps on that reward, then feedback again while the budget `--total-queries`
   lasts; after it SAC keeps the last reward model until `--steps`.

`--reward true` runs SAC on the environment's own reward with no queries: the upper bound. Before training
and after every round the policy acts by its mean for `--eval-episodes` episodes (Meta-World: initial states
drawn with `--eval-state-seed`, which training never meets): curve.csv and curve.png hold the true return and
success against queries used and env steps, eval.json the last row.

A checkpoint (checkpoints/checkpoint-<env step>, after every round, the last `--keep-checkpoints` kept, written
whole or not at all) holds SAC's networks and optimizers (its `get_parameters` state dicts) and counters as
safetensors/JSON, the replay buffer as .npz, the reward model, the labelled segments and pairs, the query count and
the curve: nothing pickled (SB3's own `save` pickles). Every round reseeds the global RNGs, the action space and
the environment from (seed, round) and starts a new episode, so `--resume latest` continues exactly as an
uninterrupted run; round ends (learning_starts + unsup_steps, then every feedback_every, and steps) fall on episode
ends. Departures from PEBBLE: the critic is not reset after unsupervised pre-training, and the state-entropy
reward is normalised per batch (see `replay.py`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv

from mmalign import run_folder
from mmalign.config import option, save_config
from mmalign.errors import RunFolderError
from mmalign.files import write_atomically, write_npz
from mmalign.plots import plot_metrics
from mmalign.state import StateFormatError, load_state, save_state
from mmalign.trainer import checkpoints, resume_checkpoint, write_checkpoint

from .label import TeacherName
from .pairs import Pairs, labelled_pairs
from .queries import RANKED, SELECTIONS, preference_probabilities, uniform
from .replay import PreferenceReplayBuffer, relabel, sample_segments
from .reward import RewardConfig, train_reward_model
from .reward_models import RewardModel, load_reward_model
from .rl_env import LearnedReward, RewardFunction, check_env_name, evaluate, make_rl_env
from .teachers import teacher

Selection = Literal[SELECTIONS]  # type: ignore[valid-type]
ROUND_SEED_STRIDE = 1000  # round k of seed s trains its reward model with seed s * stride + k


@dataclass
class Config(RewardConfig):
    """Settings of `mmalign robotics prefrl` (the training-loop settings are the reward model's, per round)."""

    env: str = option(None, "Meta-World v3 task (e.g. reach-v3) or gymnasium id (e.g. Pendulum-v1)")
    reward: Literal["learned", "true"] = option("learned", "SAC's reward: learned from preferences, or the "
                                                          "environment's own (the upper bound, no queries)")
    teacher: TeacherName = option("oracle", "B-Pref scripted teacher")
    query_selection: Selection = option("disagreement", "which candidate pairs are asked (B-Pref's sampling)")
    queries_per_round: int = option(20, "queries asked per feedback round")
    total_queries: int = option(200, "feedback budget: queries asked over the whole run")
    candidates: int = option(10, "candidate pairs drawn per query asked (B-Pref's large_batch)")
    segment_length: int = option(50, "steps per queried segment")
    steps: int = option(20000, "environment steps in all")
    feedback_every: int = option(3000, "environment steps between feedback rounds")
    learning_starts: int = option(1500, "random-action steps before SAC learns")
    unsup_steps: int = option(0, "PEBBLE's unsupervised pre-training: SAC steps on the k-NN state entropy before the "
                                 "first feedback")
    entropy_k: int = option(5, "k of the k-NN state entropy")
    max_episode_steps: int = option(150, "steps per episode")
    state_seed: int = option(0, "Meta-World: seed that draws the training task's 50 initial states")
    eval_state_seed: int = option(1, "Meta-World: seed that draws the evaluation's 50 initial states")
    eval_episodes: int = option(10, "evaluation episodes (mean action) before training and after every round")
    sac_hidden: int = option(256, "width of SAC's actor and critic layers")
    sac_layers: int = option(2, "hidden layers of SAC's actor and critic")
    sac_batch_size: int = option(256, "SAC minibatch size")
    sac_learning_rate: float = option(3e-4, "SAC learning rate")
    gamma: float = option(0.99, "SAC discount")
    tau: float = option(0.005, "SAC target-network update rate")
    members: int = option(3, "reward ensemble members (disagreement needs at least 2)")
    max_steps: int = option(100, "reward-model optimizer steps per feedback round")
    batch_size: int = option(64, "labelled pairs per reward-model step (all of them while fewer are labelled)")
    learning_rate: float = option(3e-4, "reward-model learning rate")
    checkpoint_every: int = option(0, "reward-model checkpoint every N steps within a round (0: at its end); the run "
                                      "itself checkpoints after every round")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.env:
            raise ValueError("--env is required (a Meta-World v3 task or a gymnasium id)")
        check_env_name(self.env)
        for name in ("queries_per_round", "total_queries", "candidates", "segment_length", "steps", "feedback_every",
                     "entropy_k", "max_episode_steps", "eval_episodes", "sac_hidden", "sac_layers", "sac_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_starts", "unsup_steps", "state_seed", "eval_state_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not (self.sac_learning_rate > 0 and 0 < self.gamma <= 1 and 0 < self.tau <= 1):
            raise ValueError("sac_learning_rate must be positive, gamma and tau in (0, 1]")
        first = self.learning_starts + self.unsup_steps
        for name, value in (("learning_starts + unsup_steps", first), ("feedback_every", self.feedback_every),
                            ("steps", self.steps)):
            if value % self.max_episode_steps:
                raise ValueError(f"{name} ({value}) must be a multiple of max_episode_steps ({self.max_episode_steps}):"
                                 " rounds end on episode ends")
        if not 0 < first <= self.steps:
            raise ValueError(f"learning_starts + unsup_steps ({first}) must be positive and at most steps "
                             f"({self.steps}): the first feedback comes after them")
        if self.segment_length > self.max_episode_steps:
            raise ValueError(f"segment_length {self.segment_length} is longer than an episode "
                             f"({self.max_episode_steps} steps)")
        if self.query_selection == "disagreement" and self.members < 2:
            raise ValueError("--query-selection disagreement needs an ensemble: --members 2 or more")
        if self.eval_data:
            raise ValueError("--eval-data is for `mmalign robotics reward`; prefrl evaluates the policy it trains")


def round_ends(config: Config) -> list[int]:
    """Env step at which each round ends: learning_starts + unsup_steps, then every feedback_every, and steps."""
    first = config.learning_starts + config.unsup_steps
    return [*range(first, config.steps, config.feedback_every), config.steps]


def round_seed(seed: int, round_index: int) -> int:
    """The seed of round k's randomness (below 2**32, numpy's limit), a pure function of (seed, k)."""
    return int(np.random.SeedSequence([seed, round_index]).generate_state(1)[0])


@dataclass
class Labelled:
    """Every segment asked about so far (observations [N, L, D], actions, true rewards [N, L]) and its pairs."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    pairs: Pairs

    def __post_init__(self) -> None:
        self.observations, self.actions, self.rewards = (np.asarray(x, dtype=np.float32) for x in
                                                         (self.observations, self.actions, self.rewards))

    def save(self, path: Path) -> None:
        """One .npz of the segments and the pairs' chosen, rejected and label columns."""
        write_npz(path, {"observations": self.observations, "actions": self.actions, "rewards": self.rewards,
                         "chosen": self.pairs.chosen, "rejected": self.pairs.rejected, "label": self.pairs.label})


def load_labelled(path: Path, task: str, name: str) -> Labelled:
    """The labelled segments and pairs a checkpoint holds (RunFolderError for a file that is not one)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("observations", "actions", "rewards", "chosen", "rejected", "label")}
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise RunFolderError(f"{path}: not the labelled segments this run wrote ({err})") from None
    return Labelled(arrays["observations"], arrays["actions"], arrays["rewards"],
                    Pairs(task, arrays["chosen"], arrays["rejected"], arrays["label"], name))


def reward_function(model: RewardModel) -> RewardFunction:
    """(s [n, D], a [n, A]) -> r_hat [n], the ensemble members' mean reward."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def reward(obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        out = model(torch.as_tensor(obs, dtype=torch.float32, device=device),
                    torch.as_tensor(act, dtype=torch.float32, device=device))[0]
        return out.mean(0).cpu().numpy()
    return reward


@torch.no_grad()
def member_returns(model: RewardModel, observations: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Each member's predicted return of each segment [K, N] (observations [N, L, D], actions [N, L, A])."""
    device = next(model.parameters()).device
    mean, _ = model(torch.as_tensor(observations, dtype=torch.float32, device=device),
                    torch.as_tensor(actions, dtype=torch.float32, device=device))
    return mean.sum(-1).cpu().numpy()


def ask_teacher(config: Config, buffer: PreferenceReplayBuffer, model: RewardModel | None, queries: int,
                labelled: Labelled | None, rng: np.random.Generator) -> Labelled:
    """One feedback round: draw candidates, select `queries` of them, label them, append them to `labelled`."""
    count = queries * config.candidates
    segments = sample_segments(buffer, config.segment_length, 2 * count, rng)
    a, b = np.arange(count), np.arange(count, 2 * count)
    if model is None or config.query_selection == "uniform":
        keep = uniform(count, queries, rng)
    else:
        probabilities = preference_probabilities(
            member_returns(model, segments["observations"][a], segments["actions"][a]),
            member_returns(model, segments["observations"][b], segments["actions"][b]))
        keep = RANKED[config.query_selection](probabilities, queries)
    asked = np.concatenate([a[keep], b[keep]])
    p_b = teacher(config.teacher).label(segments["true_rewards"][a[keep]], segments["true_rewards"][b[keep]], rng)
    offset = 0 if labelled is None else len(labelled.observations)
    new = labelled_pairs(config.env, offset + np.arange(queries), offset + queries + np.arange(queries), p_b,
                         config.teacher)
    parts = [segments["observations"][asked], segments["actions"][asked], segments["true_rewards"][asked]]
    if labelled is None:
        return Labelled(parts[0], parts[1], parts[2], new)
    old = labelled.pairs
    return Labelled(np.concatenate([labelled.observations, parts[0]]), np.concatenate([labelled.actions, parts[1]]),
                    np.concatenate([labelled.rewards, parts[2]]),
                    Pairs(config.env, np.concatenate([old.chosen, new.chosen]),
                          np.concatenate([old.rejected, new.rejected]), np.concatenate([old.label, new.label]),
                          config.teacher))


def update_reward_model(config: Config, labelled: Labelled, model: RewardModel | None,
                        round_index: int) -> RewardModel:
    """Train the reward model (new, or `model` further) on every label so far, into reward/round-<k>/."""
    folder = config.output / "reward" / f"round-{round_index}"
    round_config = dataclasses.replace(config, output=folder, batch_size=min(config.batch_size, len(labelled.pairs)),
                                       resume="latest" if checkpoints(folder) else None, keep_checkpoints=1,
                                       seed=config.seed * ROUND_SEED_STRIDE + round_index)
    return train_reward_model(round_config, labelled, labelled.pairs, model=model)[0]


def make_sac(config: Config, env: DummyVecEnv) -> SAC:
    """SB3's SAC with the preference replay buffer, holding every step of the run."""
    device = "cpu" if config.cpu or not torch.cuda.is_available() else "cuda"
    return SAC("MlpPolicy", env, learning_rate=config.sac_learning_rate, buffer_size=config.steps,
               learning_starts=config.learning_starts, batch_size=config.sac_batch_size, tau=config.tau,
               gamma=config.gamma, train_freq=1, gradient_steps=1, replay_buffer_class=PreferenceReplayBuffer,
               policy_kwargs={"net_arch": [config.sac_hidden] * config.sac_layers}, seed=config.seed, device=device)


def start_round(sac: SAC, seed: int, round_index: int) -> None:
    """Reseed every RNG the round draws from (torch, numpy, random, the action space, the env) and start an episode."""
    seed = round_seed(seed, round_index)
    set_random_seed(seed)
    sac.action_space.seed(seed)
    assert sac.env is not None
    sac.env.seed(seed)
    sac._last_obs = sac.env.reset()  # type: ignore[assignment]
    sac._last_episode_starts = np.ones((1,), dtype=bool)


def save_run(folder: Path, sac: SAC, model: RewardModel | None, labelled: Labelled | None,
             progress: dict[str, Any]) -> None:
    """SAC (state dicts and counters), the replay buffer, the reward model, the labels and the progress, into
    `folder`."""
    assert sac.log_ent_coef is not None  # SAC's entropy coefficient is learned here (ent_coef "auto")
    save_state({"parameters": sac.get_parameters(), "log_ent_coef": sac.log_ent_coef.detach(),
                "num_timesteps": sac.num_timesteps, "n_updates": sac._n_updates, "episode_num": sac._episode_num},
               folder, "sac")
    assert isinstance(sac.replay_buffer, PreferenceReplayBuffer)
    sac.replay_buffer.save(folder / "replay.npz")
    if model is not None:
        model.save(folder)
    if labelled is not None:
        labelled.save(folder / "labels.npz")
    (folder / "progress.json").write_text(json.dumps(progress))


def load_run(folder: Path, sac: SAC, config: Config) -> tuple[RewardModel | None, Labelled | None, dict[str, Any]]:
    """Restore what `save_run` wrote into `sac`; returns the reward model, labels and progress."""
    try:
        state = load_state(folder, "sac")
        sac.set_parameters(state["parameters"], exact_match=True, device=sac.device)
        assert sac.log_ent_coef is not None  # ent_coef "auto", as make_sac builds it
        with torch.no_grad():
            sac.log_ent_coef.copy_(state["log_ent_coef"])
        sac.num_timesteps, sac._n_updates, sac._episode_num = (state["num_timesteps"], state["n_updates"],
                                                               state["episode_num"])
        progress = json.loads((folder / "progress.json").read_text())
    except (StateFormatError, OSError, ValueError, KeyError, RuntimeError) as err:
        raise RunFolderError(f"checkpoint {folder} cannot be resumed: {err}") from None
    assert isinstance(sac.replay_buffer, PreferenceReplayBuffer)
    sac.replay_buffer.load(folder / "replay.npz")
    labels = folder / "labels.npz"
    labelled = load_labelled(labels, config.env, config.teacher) if labels.is_file() else None
    model = load_reward_model(folder).to(sac.device) if labelled is not None and len(labelled.pairs) else None
    return model, labelled, progress


def write_curve(config: Config, curve: list[dict[str, float]]) -> None:
    """curve.csv (every row) and curve.png (true return and success against queries, or env steps for --reward true)."""
    columns = list(dict.fromkeys(key for row in curve for key in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(curve)
    write_atomically(config.output / "curve.csv", write)
    x = "queries" if config.reward == "learned" else "step"
    plot_metrics(curve, ["true_return", "success"], config.output / "curve.png",
                 f"{config.env}: {config.reward} reward ({config.teacher}, {config.query_selection})"
                 if config.reward == "learned" else f"{config.env}: SAC on the true reward", x=x)


def run(config: Config) -> dict[str, Any]:
    """Rounds of SAC steps and feedback (see the module docstring); returns the last curve row."""
    with run_folder.claim(config.output, resuming=config.resume is not None):
        resume_from = resume_checkpoint(config.output, config.resume)
        save_config(config, config.output / "config.yaml")
        wrapper = LearnedReward(make_rl_env(config.env, config.max_episode_steps, config.state_seed))
        sac = make_sac(config, DummyVecEnv([lambda: wrapper]))
        buffer = sac.replay_buffer
        assert isinstance(buffer, PreferenceReplayBuffer)

        def act(obs: np.ndarray) -> np.ndarray:
            return sac.predict(obs, deterministic=True)[0]

        def scores() -> dict[str, float]:
            return evaluate(act, config.env, config.max_episode_steps, config.eval_episodes, config.eval_state_seed)

        model: RewardModel | None = None
        labelled: Labelled | None = None
        if resume_from is not None:
            model, labelled, progress = load_run(resume_from, sac, config)
            print(f"resumed from {resume_from} after round {progress['round']}")
        else:
            progress = {"round": -1, "queries": 0, "curve": [{"round": -1, "step": 0, "queries": 0, "labels": 0,
                                                               **scores()}]}
            print(json.dumps(progress["curve"][-1]))
        ends = round_ends(config)
        for k in range(progress["round"] + 1, len(ends)):
            start_round(sac, config.seed, k)
            unsupervised = config.reward == "learned" and ends[k] <= config.learning_starts + config.unsup_steps
            buffer.entropy_k = config.entropy_k if unsupervised and config.unsup_steps else 0
            wrapper.reward_fn = None if config.reward == "true" else (
                reward_function(model) if model is not None else lambda obs, _: np.zeros(len(obs)))
            sac.learn(ends[k] - sac.num_timesteps, reset_num_timesteps=False)
            queries = min(config.queries_per_round, config.total_queries - progress["queries"])
            if config.reward == "learned" and queries > 0:
                rng = np.random.default_rng(round_seed(config.seed, k))
                labelled = ask_teacher(config, buffer, model, queries, labelled, rng)
                progress["queries"] += queries
                if len(labelled.pairs):
                    model = update_reward_model(config, labelled, model, k)
                    relabel(buffer, reward_function(model))
            progress["round"] = k
            progress["curve"].append({"round": k, "step": ends[k], "queries": progress["queries"],
                                      "labels": len(labelled.pairs) if labelled is not None else 0, **scores()})
            print(json.dumps(progress["curve"][-1]))
            write_checkpoint(config.output, f"checkpoint-{ends[k]}",
                             functools.partial(save_run, sac=sac, model=model, labelled=labelled, progress=progress),
                             {"step": ends[k], "seed": config.seed, "num_processes": 1}, config.keep_checkpoints)
            write_curve(config, progress["curve"])
            # the round's reward model is in the run's checkpoint now; its own checkpoint is not needed to resume
            shutil.rmtree(config.output / "reward" / f"round-{k}" / "checkpoints", ignore_errors=True)
        if model is not None:
            model.save(config.output)
        write_curve(config, progress["curve"])
        report = {"env": config.env, "reward": config.reward, **progress["curve"][-1],
                  "before": progress["curve"][0]}
        (config.output / "eval.json").write_text(json.dumps(report, indent=1))
    return report
