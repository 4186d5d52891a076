"""Transferred-label accuracy of PEARL's CPA on Meta-World task pairs (the numbers in BENCHMARKS.md).

For every task: noisy scripted-expert episodes (noise std cycling through 0, 0.5, 1, 1.5, 2, 3, 4;
100 steps), cut into random segments. Source segments get oracle labels on random pairs; the
transfer labels every target pair; accuracy = share of target pairs whose transferred preference
agrees with the true target returns. Repeated over seeds (new episodes, segments and pairs).

With --baselines, only the default (hand features, entropic GW) is run, beside the label-free rules of
robotics/baselines.py on the same target pairs, on all of them and on those whose segments start at most
--same-window steps apart (where progress in time gives little away).

    python scripts/pearl_transfer.py --out /tmp/pearl-bench --seeds 3               # best of 5 GW solves
    python scripts/pearl_transfer.py --out /tmp/pearl-bench --seeds 3 --restarts 1  # one solve
    python scripts/pearl_transfer.py --out /tmp/pearl-bench --seeds 1 --baselines   # PEARL beside the baselines
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mmalign.robotics import collect, pearl
from mmalign.robotics.pairs import Pairs, label_pairs
from mmalign.robotics.teachers import teacher
from mmalign.robotics.trajectories import Trajectories

PAIRS = [("button-press-v3", "button-press-topdown-v3"), ("button-press-topdown-v3", "button-press-v3"),
         ("button-press-v3", "button-press-wall-v3"), ("button-press-topdown-v3", "button-press-topdown-wall-v3"),
         ("push-v3", "button-press-v3"), ("window-open-v3", "window-close-v3"), ("drawer-open-v3", "drawer-close-v3")]
RULES = ["pearl", "later_segment", "smoother_actions", "nearest_neighbour", "random_plan"]
NOISE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]


def episodes(task: str, seed: int, out: Path, count: int) -> Trajectories:
    """`count` noisy-expert episodes of `task` (collected once into `out`, then read back)."""
    path = out / f"{task}-{seed}.npz"
    if not path.exists():
        collect.run(collect.Config(task=task, output=path, episodes=count, noise=NOISE, max_episode_steps=100,
                                   num_envs=7, seed=seed, first_state=seed * 7))
    return Trajectories.load(path)


def labelled_source_and_target(args: argparse.Namespace, source_task: str, target_task: str,
                               seed: int) -> tuple[Trajectories, Trajectories, Pairs]:
    """(source segments, target segments, oracle-labelled source pairs) of one seed."""
    length, count = args.segment_length, args.segments
    source = episodes(source_task, seed, args.out, args.episodes).fragment(length, count, seed=seed)
    target = episodes(target_task, seed + 100, args.out, args.episodes).fragment(length, count, seed=seed + 100)
    return source, target, label_pairs(source, args.source_pairs, teacher("oracle"), seed=seed)


def cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def baselines_table(args: argparse.Namespace, pairs: list[tuple[str, str]]) -> None:
    """PEARL's default beside the label-free rules: all decided target pairs, then those within --same-window."""
    rows = []
    for source_task, target_task in pairs:
        scores: dict[str, list] = {"all": [], "window": [], "window_pairs": []}
        for seed in range(args.seeds):
            source, target, labelled = labelled_source_and_target(args, source_task, target_task, seed)
            _, z_target = pearl.align(source, labelled, target, restarts=args.restarts, seed=seed)
            report = pearl.baseline_report(source, labelled, target, z_target, window=args.same_window, seed=seed)
            scores["all"].append(report["baselines"])
            scores["window"].append(report["same_window"])
            scores["window_pairs"].append(report["same_window"]["pairs"])
            print(f"  {source_task} -> {target_task} seed {seed}: {report}", flush=True)
        rows.append((f"{source_task} -> {target_task}", scores))
    for key, title in (("all", "all target pairs"), ("window", f"pairs starting <= {args.same_window} steps apart")):
        print(f"\n{title}\n| source -> target | " + " | ".join(RULES) + " |\n|---|" + "---:|" * len(RULES))
        for name, scores in rows:
            extra = f" ({int(np.mean(scores['window_pairs']))} pairs)" if key == "window" else ""
            print(f"| {name}{extra} | " + " | ".join(cell([s[r] for s in scores[key]]) for r in RULES) + " |")


def main() -> None:
    """Accuracy mean ± std over seeds per task pair and variant (segment features, entropic or exact GW)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/pearl-bench"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=140)
    parser.add_argument("--segments", type=int, default=500)
    parser.add_argument("--segment-length", type=int, default=50)
    parser.add_argument("--source-pairs", type=int, default=20000)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--baselines", action="store_true", help="the default beside the label-free rules")
    parser.add_argument("--same-window", type=int, default=5)
    parser.add_argument("--pairs", nargs="+", help="SOURCE:TARGET task pairs (default: all of PAIRS)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    task_pairs = [(p.split(":")[0], p.split(":")[1]) for p in args.pairs] if args.pairs else PAIRS
    if args.baselines:
        baselines_table(args, task_pairs)
        return
    variants = [("hand", True), ("hand", False), ("full", True), ("full", False)]
    print("| source -> target | " + " | ".join(f"{f}, {'entropic' if e else 'exact'}" for f, e in variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for source_task, target_task in task_pairs:
        scores: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
        for seed in range(args.seeds):
            source, target, pairs = labelled_source_and_target(args, source_task, target_task, seed)
            for features, entropic in variants:
                start = time.perf_counter()
                _, z_target = pearl.align(source, pairs, target, features, entropic, restarts=args.restarts, seed=seed)
                scores[(features, entropic)].append(pearl.label_accuracy(z_target, target.returns()))
                print(f"  {source_task} -> {target_task} seed {seed} {features} entropic={entropic}: "
                      f"{scores[(features, entropic)][-1]:.3f} ({time.perf_counter() - start:.1f} s)", flush=True)
        cells = [cell(scores[v]) for v in variants]
        print(f"| {source_task} -> {target_task} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
