"""GRAPE (Zhang et al. 2024): trajectory-wise preference optimisation (TPO) of a behaviour-cloned policy.

`mmalign robotics grape --task drawer-open-v3 --output RUN` pretrains a Gaussian policy by behaviour
cloning on noisy scripted-expert demonstrations (or loads one, `--policy`), then runs `--rounds` of:

1. roll the current policy out `--samples-per-state` times (sampling) from each of `--states` initial states;
2. rank the trajectories of each initial state by GRAPE's score
       R = 0.01 * sum_t max(log pi(a_t|s_t), log 0.05) + R_ext + 5 * 1[success]
   with R_ext the stage-cost term of `stages.py`; the best and the worst form a (chosen, rejected) pair
   that shares task and initial state (GRAPE, TPO-Train/finetune.py);
3. TPO against the round's starting policy as the frozen reference (core `FrozenCopy`), beta 0.1:
       loss = -log sigmoid(beta * sum_{t in window} [(log pi - log pi_ref)(a^w_t|s^w_t)
                                                     - (log pi - log pi_ref)(a^l_t|s^l_t)])
   i.e. the core sigmoid objective on log-ratios summed over a window of `--window` steps (8, GRAPE's
   chunk; the same random offset in both trajectories; 0: the whole trajectory).

Held-out success is measured before and after every round over `--eval-episodes` episodes from initial
states the training never saw (`--eval-state-seed` draws another 50), acting by sampling (the policy as
trained and ranked) and by its mean; episode i starts from the same state with the same action noise for
every policy, so two policies' successes pair up.

Round guard (`--round-guard`, on by default). TPO's loss can keep falling while the policy collapses
(success 0.54 -> 0.00 in one round on door-open-v3), so every round is judged on the held-out episodes:
with d_i = s_i(after) - s_i(before) the paired change of episode i's success, the round is rejected when,
for either way of acting, the 95% CI of mean(d) (`mmalign.stats.mean_ci`) lies wholly below 0, i.e. its
drop is beyond what the episodes' noise explains. A rejected round is rolled back to the policy it started
from, the last accepted one: its update is discarded whole (nothing in it is known to be good), and the
next round samples fresh rollouts from that policy under its own seed, so a bad round costs one round and
a collapse never compounds. Accepted rounds within the noise are kept even when their means fall a little;
the best policy so far (the highest mean of the two held-out success rates, the earlier on a tie, among the
policies the run went on from) is saved to best/ and named in eval.json and the output.
`--no-round-guard` keeps every round (the decision is still measured and logged).

The run folder gets policy.safetensors/.json (final: the last policy the run went on from), best/, bc/ and
round-k/ (each with metrics.jsonl), rounds.jsonl (per round: rollouts, held-out success with 95% CIs, the
paired change with its CI, the decision), eval.json and success.png. The clipped action that was executed
is the one scored: the Gaussian's density there stands in for GRAPE's action-token probability.

`--policy` and `--demos` are read and checked before anything is written. `--resume latest` continues
an interrupted run: it keeps demos.npz, takes each stage that has checkpoints (bc/, round-k/) from its
last one and replays the rollouts from the same seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from mmalign import run_folder
from mmalign.config import option
from mmalign.errors import ConfigError, DataError
from mmalign.objectives import preference_loss, preference_metrics
from mmalign.plots import plot_metrics
from mmalign.reference import FrozenCopy
from mmalign.stats import mean_ci
from mmalign.trainer import TrainConfig, Trainer

from .bc import behaviour_clone
from .collect import Config as CollectConfig
from .collect import run as collect
from .envs import make_vector_env
from .policies import GaussianPolicy, PolicyActor, PolicyArch, load_policy
from .rollout import rollout
from .stages import external_reward, stages
from .trajectories import Trajectories

LOG_FLOOR = float(np.log(0.05))
EVAL_SEED_OFFSET = 7  # the evaluation's action noise: seed + 7, apart from every round's (seed * stride + k)
ROUND_SEED_STRIDE = 1000  # round k of seed s samples its rollouts' actions with seed s * stride + k
MODES = ("sampled", "mean_action")  # the two ways of acting that held-out success is measured for


def grape_score(log_probs: np.ndarray, success: np.ndarray, r_ext: np.ndarray) -> np.ndarray:
    """R = 0.01 * sum_t max(log p_t, log 0.05) + R_ext + 5 * 1[success], per trajectory [N] (log_probs [N, T])."""
    return 0.01 * np.maximum(log_probs, LOG_FLOOR).sum(-1) + r_ext + 5.0 * success


def best_and_worst(scores: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group (initial state), the index of its highest and of its lowest score; none where the scores all tie."""
    chosen, rejected = [], []
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        best, worst = members[scores[members].argmax()], members[scores[members].argmin()]
        if scores[best] > scores[worst]:
            chosen.append(best)
            rejected.append(worst)
    return np.asarray(chosen, dtype=np.int64), np.asarray(rejected, dtype=np.int64)


def tpo_loss(policy_w: torch.Tensor, ref_w: torch.Tensor, policy_l: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-pair TPO loss [B]: the core sigmoid objective on the log-ratios summed over steps (inputs [B, W])."""
    return preference_loss((policy_w - ref_w).sum(-1), (policy_l - ref_l).sum(-1), kind="sigmoid", beta=beta)


class TrajectoryPairs(Dataset):
    """Item i: observations and actions of the i-th chosen (w) and rejected (l) trajectory."""

    def __init__(self, trajs: Trajectories, chosen: np.ndarray, rejected: np.ndarray):
        self.obs, self.act = torch.from_numpy(trajs.observations), torch.from_numpy(trajs.actions)
        self.chosen, self.rejected = chosen, rejected

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        winner, loser = int(self.chosen[i]), int(self.rejected[i])
        return {"obs_w": self.obs[winner], "act_w": self.act[winner],
                "obs_l": self.obs[loser], "act_l": self.act[loser]}


def window_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi of the chosen and rejected actions inside each pair's window, [B, W] each."""
    assert isinstance(model, GaussianPolicy)  # the policy, or its frozen copy as the reference scores it
    return model.log_prob(batch["obs_w"], batch["act_w"]), model.log_prob(batch["obs_l"], batch["act_l"])


def tpo_step(policy: GaussianPolicy, batch: dict[str, torch.Tensor], generator: torch.Generator,
             reference: FrozenCopy, beta: float, window: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """TPO on one batch of trajectory pairs: a random window per pair, log-ratios summed inside it."""
    horizon = batch["obs_w"].shape[1]
    if 0 < window < horizon:
        start = torch.randint(0, horizon - window + 1, (batch["obs_w"].shape[0], 1), generator=generator,
                              device=batch["obs_w"].device)
        steps = start + torch.arange(window, device=start.device)
        batch = {k: torch.take_along_dim(v, steps[..., None], dim=1) for k, v in batch.items()}
    policy_w, policy_l = window_log_probs(policy, batch)
    ref_w, ref_l = reference.scores(window_log_probs, policy, batch)
    losses = tpo_loss(policy_w, ref_w, policy_l, ref_l, beta)
    metrics = preference_metrics((policy_w - ref_w).sum(-1), (policy_l - ref_l).sum(-1), beta)
    return losses.mean(), {**metrics, "sigma": policy.log_std.detach().exp().mean()}


@dataclass
class Config(TrainConfig):
    """Settings of `mmalign robotics grape` (the training-loop settings are TPO's, per round)."""

    task: str = option(None, "Meta-World v3 task with stage constraints in stages.py")
    policy: str | None = option(None, "start from this behaviour-cloned policy folder instead of training one",
                                reads="folder")
    demos: str | None = option(None, "demonstrations for behaviour cloning (.npz); default: collect them",
                               reads="file")
    demo_episodes: int = option(20, "noisy expert episodes to collect when --demos is not given")
    demo_noise: float = option(1.0, "action-noise std of the collected demonstrations")
    bc_steps: int = option(1000, "behaviour-cloning optimizer steps")
    bc_batch_size: int = option(256, "behaviour-cloning steps per batch")
    bc_learning_rate: float = option(1e-3, "behaviour-cloning learning rate")
    hidden: int = option(256, "policy MLP width")
    layers: int = option(2, "policy MLP hidden layers")
    max_episode_steps: int = option(150, "steps per episode")
    rounds: int = option(3, "GRAPE rounds (rollouts, ranking, TPO)")
    states: int = option(50, "training initial states per round")
    samples_per_state: int = option(8, "rollouts per initial state per round")
    beta: float = option(0.1, "TPO beta")
    window: int = option(8, "steps per TPO window (0: the whole trajectory)")
    eval_episodes: int = option(50, "evaluation episodes before and after each round (at least 2: a CI)")
    eval_state_seed: int = option(1, "seed of the evaluation's 50 initial states (training uses seed 0)")
    num_envs: int = option(10, "vectorised environments for rollouts")
    max_steps: int = option(200, "TPO optimizer steps per round")
    batch_size: int = option(16, "trajectory pairs per TPO step")
    learning_rate: float = option(3e-5, "TPO learning rate")
    checkpoint_every: int = option(0, "checkpoint every N TPO steps (0: at the end of each round only)")
    round_guard: bool = option(True, "roll back a round whose held-out success falls beyond its 95% CI (sampled or "
                                     "mean action); --no-round-guard keeps every round")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.task:
            raise ValueError("--task is required")
        stages(self.task)
        if self.eval_episodes < 2:
            raise ValueError(f"eval_episodes must be at least 2 (a confidence interval), got {self.eval_episodes}")
        for name in ("rounds", "states", "bc_steps", "bc_batch_size", "num_envs", "demo_episodes",
                     "max_episode_steps", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_state_seed < 0:
            raise ValueError(f"eval_state_seed must not be negative, got {self.eval_state_seed}")
        if self.samples_per_state < 2:
            raise ValueError(f"samples_per_state must be at least 2 to rank, got {self.samples_per_state}")
        if not self.beta > 0 or self.window < 0:
            raise ValueError("beta must be positive and window not negative")
        if not (0 <= self.demo_noise < math.inf and self.bc_learning_rate > 0):
            raise ValueError("demo_noise must be finite and not negative, bc_learning_rate positive")
        if self.resume not in (None, "latest"):
            raise ValueError("grape resumes each stage (bc/, round-k/) from its own last checkpoint: "
                             "pass --resume latest")
        if self.policy and self.demos:
            raise ValueError("--policy starts from a trained policy, --demos trains one: give one of them")
        if not self.policy and not self.demos and self.demo_episodes * self.max_episode_steps < self.bc_batch_size:
            raise ValueError(f"{self.demo_episodes} demonstration episodes of {self.max_episode_steps} steps are fewer "
                             f"steps than one behaviour-cloning batch (bc_batch_size {self.bc_batch_size})")


def held_out_success(policy: GaussianPolicy, config: Config) -> dict[str, np.ndarray]:
    """Per way of acting (MODES), whether each of `eval_episodes` episodes from held-out initial states succeeds."""
    env = make_vector_env(config.task, min(config.num_envs, config.eval_episodes), config.max_episode_steps,
                          state_seed=config.eval_state_seed)
    successes = {mode: rollout(env, PolicyActor(policy, mode == "mean_action", seed=config.seed + EVAL_SEED_OFFSET),
                               np.arange(config.eval_episodes), config.task).success() for mode in MODES}
    env.close()
    return successes


def success_point(step: int, successes: dict[str, np.ndarray]) -> dict[str, Any]:
    """One point of the success curve: per way of acting, the success rate and its 95% CI."""
    point: dict[str, Any] = {"step": step}
    for mode, success in successes.items():
        ci = mean_ci(success.astype(np.float64).tolist())
        point.update({f"success_{mode}": ci["mean"], f"success_{mode}_ci_low": ci["ci_low"],
                      f"success_{mode}_ci_high": ci["ci_high"]})
    return point


def round_decision(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accept unless, for some way of acting, the paired change d_i = s_i(after) - s_i(before) has its 95% CI wholly
    below 0: mean(d) + 1.96 * std(d) / sqrt(n) < 0 (`mean_ci`)."""
    change = {mode: mean_ci((after[mode].astype(np.float64) - before[mode].astype(np.float64)).tolist())
              for mode in before}
    fell = [mode for mode, ci in change.items() if ci["ci_high"] < 0]
    return {"accepted": not fell, "fell": fell, "change": change}


def best_score(successes: dict[str, np.ndarray]) -> float:
    """What `best/` maximises: the mean of the held-out success rates of the two ways of acting."""
    return float(np.mean([success.mean() for success in successes.values()]))


def rank_rollouts(policy: GaussianPolicy, config: Config,
                  round_index: int) -> tuple[Trajectories, np.ndarray, np.ndarray, dict]:
    """Sample rollouts from the training initial states, score them, pair best with worst per state."""
    env = make_vector_env(config.task, config.num_envs, config.max_episode_steps)
    states = np.repeat(np.arange(config.states), config.samples_per_state)
    trajs = rollout(env, PolicyActor(policy, seed=config.seed * ROUND_SEED_STRIDE + round_index), states, config.task)
    env.close()
    with torch.no_grad():
        device = policy.log_std.device
        log_probs = policy.log_prob(torch.from_numpy(trajs.observations).to(device),
                                    torch.from_numpy(trajs.actions).to(device)).cpu().numpy()
    scores = grape_score(log_probs, trajs.success(), external_reward(config.task, trajs.observations))
    chosen, rejected = best_and_worst(scores, states)
    summary = {"rollout_success": float(trajs.success().mean()), "pairs": len(chosen),
               "chosen_success": float(trajs.success()[chosen].mean()) if len(chosen) else float("nan"),
               "rejected_success": float(trajs.success()[rejected].mean()) if len(chosen) else float("nan")}
    return trajs, chosen, rejected, summary


def load_demos(config: Config) -> Trajectories:
    """--demos (checked: the task's, at least one batch of steps), or the run's demos.npz, collected unless there."""
    if config.demos:
        demos = Trajectories.load(config.demos)
        if demos.task != config.task:
            raise DataError(f"{config.demos}: demonstrations of {demos.task}, not of --task {config.task}")
        if len(demos) * demos.horizon < config.bc_batch_size:
            raise DataError(f"{config.demos}: {len(demos) * demos.horizon} steps, fewer than one behaviour-cloning "
                            f"batch (--bc-batch-size {config.bc_batch_size})")
        return demos
    path = config.output / "demos.npz"
    if not path.exists():  # a resumed run keeps the demonstrations it collected
        collect(CollectConfig(task=config.task, output=path, episodes=config.demo_episodes,
                              noise=[config.demo_noise], max_episode_steps=config.max_episode_steps,
                              num_envs=min(config.num_envs, config.demo_episodes), seed=config.seed))
    return Trajectories.load(path)


def pretrained_policy(config: Config) -> GaussianPolicy:
    """The starting policy: loaded, or behaviour-cloned on (collected) noisy expert demonstrations into bc/."""
    if config.policy:
        return load_policy(config.policy)
    demos = load_demos(config)
    bc_config = dataclasses.replace(config, output=config.output / "bc", max_steps=config.bc_steps,
                                    batch_size=config.bc_batch_size, learning_rate=config.bc_learning_rate,
                                    warmup_steps=0, lr_scheduler="constant")
    arch = PolicyArch(demos.observations.shape[-1], demos.actions.shape[-1], config.hidden, config.layers)
    return behaviour_clone(bc_config, demos, arch)[0]


def tpo_round(policy: GaussianPolicy, config: Config, k: int) -> dict[str, Any]:
    """Round k: rollouts ranked into pairs, then TPO against the round's starting policy (skipped without a batch)."""
    trajs, chosen, rejected, summary = rank_rollouts(policy, config, k)
    print(f"round {k}: {json.dumps(summary)}")
    if len(chosen) < config.batch_size:
        print(f"round {k}: {len(chosen)} pair(s), fewer than one batch (--batch-size {config.batch_size}); "
              "no TPO this round")
        return {**summary, "trained": False}
    trainer = Trainer(dataclasses.replace(config, output=config.output / f"round-{k}"))
    policy.to(trainer.device).train()
    reference = FrozenCopy(policy)
    trainer.fit(policy, TrajectoryPairs(trajs, chosen, rejected), default_collate,
                functools.partial(tpo_step, reference=reference, beta=config.beta, window=config.window))
    policy.eval()
    return {**summary, "trained": True}


def decision_line(k: int, record: dict[str, Any]) -> str:
    """The output line of round k's decision: the paired changes with their CIs and what was done."""
    changes = ", ".join(f"{mode} {c['mean']:+.3f} (95% CI {c['ci_low']:+.3f} .. {c['ci_high']:+.3f})"
                        for mode, c in record["change"].items())
    return f"round {k}: held-out success change {changes}: {record['decision']}"


def run(config: Config) -> dict[str, Any]:
    """BC (or load), then rounds of rollouts, GRAPE ranking and TPO, each judged on held-out success (round guard)."""
    with run_folder.claim(config.output, resuming=config.resume is not None):
        if config.states < config.batch_size:
            raise ConfigError(f"--states {config.states} gives at most {config.states} pairs a round, fewer than one "
                              f"TPO batch (--batch-size {config.batch_size})")
        policy = pretrained_policy(config)
        current = held_out_success(policy, config)  # the policy the run goes on from
        curve = [success_point(0, current)]
        print(json.dumps(curve[-1]))
        best = {"round": 0, "score": best_score(current), "folder": str(config.output / "best"), **curve[-1]}
        policy.save(config.output / "best")
        rounds: list[dict[str, Any]] = []
        policy_round = 0  # the round whose policy the run goes on from
        for k in range(1, config.rounds + 1):
            start = {name: value.detach().clone() for name, value in policy.state_dict().items()}
            summary = tpo_round(policy, config, k)
            after = held_out_success(policy, config) if summary["trained"] else current
            curve.append(success_point(k, after))
            decision = round_decision(current, after)
            fell = " and ".join(decision["fell"])
            if decision["accepted"] or not config.round_guard:
                current, policy_round = after, k
                verdict = "accepted" if decision["accepted"] else \
                    f"kept although {fell} fell beyond the CI (--no-round-guard)"
            else:
                policy.load_state_dict(start)
                verdict = f"rejected: {fell} fell beyond the CI; rolled back to the policy of round {policy_round}"
            rounds.append({"round": k, **summary, **curve[-1], "change": decision["change"],
                           "accepted": decision["accepted"], "decision": verdict, "policy_round": policy_round})
            print(decision_line(k, rounds[-1]))
            if policy_round == k and best_score(after) > best["score"]:
                best = {"round": k, "score": best_score(after), "folder": best["folder"], **curve[-1]}
                policy.save(config.output / "best")
            (config.output / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
        policy.save(config.output)
        print(f"best policy: round {best['round']} (held-out success {best['success_sampled']:.3f} sampled, "
              f"{best['success_mean_action']:.3f} mean action) in {best['folder']}")
        plot_metrics(curve, ["success_sampled", "success_mean_action"], config.output / "success.png",
                     f"GRAPE on {config.task}: held-out success per round (before the round guard)")
        report = {"task": config.task, "eval_episodes": config.eval_episodes, "round_guard": config.round_guard,
                  "before": curve[0], "after": success_point(config.rounds, current), "best": best, "curve": curve,
                  "rounds": rounds}
        (config.output / "eval.json").write_text(json.dumps(report, indent=1))
    return report
