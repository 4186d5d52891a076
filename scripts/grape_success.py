"""Success rate of GRAPE before and after its TPO rounds on Meta-World tasks (the numbers in BENCHMARKS.md).

Each run: behaviour cloning on 20 noisy expert episodes (action-noise std 1.0), then 3 rounds of 50
initial states x 8 sampled rollouts, GRAPE ranking and 200 TPO steps; success over `--eval-episodes`
episodes from 50 initial states training never saw, acting by sampling and by the mean action.

    python scripts/grape_success.py --out /tmp/grape-bench --tasks drawer-open-v3 plate-slide-v3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mmalign.robotics import grape


def main() -> None:
    """Success before and after GRAPE per task and seed, then the mean gain per task in points."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/grape-bench"))
    parser.add_argument("--tasks", nargs="+", default=["drawer-open-v3", "plate-slide-v3"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--eval-episodes", type=int, default=100)
    args = parser.parse_args()
    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            report = grape.run(grape.Config(task=task, seed=seed, output=args.out / f"{task}-{seed}",
                                            eval_episodes=args.eval_episodes, report_to="none"))
            before, after = report["before"], report["after"]
            rows.append((task, seed, before, after))
            print(f"{task} seed {seed}: sampled {before['success_sampled']:.2f} -> {after['success_sampled']:.2f}, "
                  f"mean action {before['success_mean_action']:.2f} -> {after['success_mean_action']:.2f}", flush=True)
    print("| task | seed | sampled: before | after | mean action: before | after |")
    print("|---|---:|---:|---:|---:|---:|")
    for task, seed, before, after in rows:
        print(f"| {task} | {seed} | {before['success_sampled']:.2f} | {after['success_sampled']:.2f} | "
              f"{before['success_mean_action']:.2f} | {after['success_mean_action']:.2f} |")
    for task in args.tasks:
        gains = [(a["success_sampled"] - b["success_sampled"], a["success_mean_action"] - b["success_mean_action"])
                 for t, _, b, a in rows if t == task]
        print(f"{task}: mean gain sampled {100 * np.mean([g[0] for g in gains]):+.0f} points, "
              f"mean action {100 * np.mean([g[1] for g in gains]):+.0f} points")


if __name__ == "__main__":
    main()
