"""Robotics throughput (numbers in BENCHMARKS.md): environment steps/s, GW + label transfer time, reward-model pairs/s.

1. Meta-World steps/s of `rollout` with uniform random actions: one environment, `--num-envs` stepped
   together in this process (sync), and one process per environment (async).
2. PEARL on n source and n target segments (random 50-step segments with 8 hand/action features each):
   distance matrices + one GW solve (exact and entropic), then the label transfer through the entropic
   coupling as one normalised matrix product against a Python loop over target pairs (each pair's two
   bilinear forms in numpy); at n = 1000 the loop is timed on `--loop-pairs` random pairs and scaled to
   all n^2.
3. Reward-model training pairs/s through the core trainer (MLP, 3-member ensemble, PEARL's Gaussian/RRL).

    python scripts/benchmark_robotics.py --out /tmp/robotics-bench
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mmalign.robotics import pearl
from mmalign.robotics.envs import make_vector_env
from mmalign.robotics.pairs import Pairs
from mmalign.robotics.reward import RewardConfig, train_reward_model
from mmalign.robotics.rollout import RandomPolicy, rollout
from mmalign.robotics.trajectories import Trajectories


def steps_per_second(task: str, num_envs: int, mode: str, episodes: int, horizon: int) -> float:
    """Environment steps per second of random-action rollouts (the environments built before the clock starts)."""
    env = make_vector_env(task, num_envs, horizon, mode=mode)
    rollout(env, RandomPolicy(seed=0), np.arange(num_envs), task)  # warm-up
    start = time.perf_counter()
    rollout(env, RandomPolicy(seed=1), np.arange(episodes), task)
    elapsed = time.perf_counter() - start
    env.close()
    return episodes * horizon / elapsed


def transfer_loop(coupling: np.ndarray, z_source: np.ndarray, mask: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Z_t[k, m] = T[:,k]^T (M*Z_s) T[:,m] / T[:,k]^T M T[:,m], one target pair (k, m) at a time."""
    weighted, out = mask * z_source, np.full(len(pairs), 0.5)
    for i, (k, m) in enumerate(pairs):
        denominator = coupling[:, k] @ mask @ coupling[:, m]
        if denominator > 1e-300:
            out[i] = (coupling[:, k] @ weighted @ coupling[:, m]) / denominator
    return out


def gw_and_transfer(n: int, loop_pairs: int, seed: int = 0) -> dict[str, float]:
    """Seconds of the distance matrices, GW (entropic, exact), and the transfer vectorised vs looped."""
    rng = np.random.default_rng(seed)
    source, target = rng.normal(size=(2, n, 50 * 8))
    z_source = rng.random((n, n))
    mask = (rng.random((n, n)) < 0.1).astype(np.float64)
    row: dict[str, float] = {}
    start = time.perf_counter()
    c_source, c_target = pearl.distance_matrix(source), pearl.distance_matrix(target)
    row["distances"] = time.perf_counter() - start
    for entropic in (False, True):  # the transfer below uses the entropic coupling, PEARL's default
        start = time.perf_counter()
        coupling = pearl.gw_coupling(c_source, c_target, entropic=entropic)
        row["gw_entropic" if entropic else "gw_exact"] = time.perf_counter() - start
    start = time.perf_counter()
    z_target = pearl.transfer_labels(coupling, z_source, mask)
    row["transfer_vectorised"] = time.perf_counter() - start
    every = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
    sample = every if n * n <= loop_pairs else every[rng.choice(n * n, loop_pairs, replace=False)]
    start = time.perf_counter()
    looped = transfer_loop(coupling, z_source, mask, sample)
    row["transfer_loop"] = (time.perf_counter() - start) * n * n / len(sample)
    np.testing.assert_allclose(looped, z_target[sample[:, 0], sample[:, 1]], rtol=1e-8)
    return row


def reward_pairs_per_second(out: Path, members: int, gaussian: bool, steps: int) -> float:
    """Training pairs per second of a reward model on 1000 random 50-step segments (batch 64)."""
    rng = np.random.default_rng(0)
    n, length = 1000, 50
    segments = Trajectories("button-press-v3", rng.normal(size=(n, length, 39)), rng.uniform(-1, 1, (n, length, 4)),
                            rng.normal(size=(n, length)), np.zeros((n, length), bool))
    chosen = rng.integers(n, size=20000)
    pairs = Pairs("button-press-v3", chosen, (chosen + rng.integers(1, n, size=20000)) % n, np.ones(20000, np.float32))
    config = RewardConfig(output=out / f"reward-{members}-{gaussian}", max_steps=steps, members=members,
                          gaussian=gaussian, report_to="none")
    start = time.perf_counter()
    train_reward_model(config, segments, pairs)
    return steps * config.batch_size / (time.perf_counter() - start)


def main() -> None:
    """Print the three tables (markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/robotics-bench"))
    parser.add_argument("--task", default="button-press-v3")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=150)
    parser.add_argument("--sizes", nargs="+", type=int, default=[200, 1000])
    parser.add_argument("--loop-pairs", type=int, default=5000)
    parser.add_argument("--reward-steps", type=int, default=300)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"| environments ({args.task}, {args.horizon}-step episodes, random actions) | steps/s |")
    print("|---|---:|")
    for label, num_envs, mode in [("1, single", 1, "sync"), (f"{args.num_envs}, sync vector", args.num_envs, "sync"),
                                  ("2, async vector (a process each)", 2, "async")]:
        rate = steps_per_second(args.task, num_envs, mode, args.episodes, args.horizon)
        print(f"| {label} | {rate:,.0f} |", flush=True)

    print("\n| n | distances s | GW entropic s | GW exact s | transfer vectorised s | transfer loop s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        r = gw_and_transfer(n, args.loop_pairs)
        print(f"| {n} | {r['distances']:.2f} | {r['gw_entropic']:.2f} | {r['gw_exact']:.2f} | "
              f"{r['transfer_vectorised']:.3f} | {r['transfer_loop']:.1f} | "
              f"{r['transfer_loop'] / r['transfer_vectorised']:,.0f}x |", flush=True)

    print("\n| reward model (batch 64, 50-step segments) | pairs/s |")
    print("|---|---:|")
    models = [("MLP 3x256", 1, False), ("ensemble of 3", 3, False), ("PEARL RRL (Gaussian)", 1, True)]
    for label, members, gaussian in models:
        pairs_per_second = reward_pairs_per_second(args.out, members, gaussian, args.reward_steps)
        print(f"| {label} | {pairs_per_second:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
