"""Seconds per training step of each diffusion method against Diffusion-DPO on the same tiny model (ratio).

SD family (InPO, SePPO) on the embedded model assets/tiny-sd; flow family (Flow-DPO, AC-Flow) on a tiny
random SD3-architecture model built in-process; each against `diffusion dpo` on the same model, LoRA rank
8, fp32, 4 pairs (SePPO: 4 winners; AC-Flow: 2 prompts x 4 samples) per step, the methods' default
settings otherwise. Seconds per step is (wall(--long steps) - wall(--short steps)) / (long - short), so
loading and saving cancel; the methods run in alternating order, the ratio is the median of --repeats
per-repetition ratios.

    python scripts/benchmark_methods.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from mmalign.diffusion import acflow, dpo, flow_dpo, inpo, seppo
from mmalign.diffusion.tiny import tiny_pipeline

ASSETS = Path(__file__).resolve().parents[1] / "assets"
COMMON = dict(num_samples=0, report_to="none", checkpoint_every=0, learning_rate=1e-5)


def seconds_per_step(method, settings: dict, short: int, long: int, common: dict = COMMON) -> float:
    """(wall(long) - wall(short)) / (long - short) of `method.run` with `settings` and `common`."""
    walls = []
    for steps in (short, long):
        with tempfile.TemporaryDirectory() as folder:
            config = method.Config(**settings, **common, output=Path(folder) / "run", max_steps=steps)
            start = time.perf_counter()
            method.run(config)
            walls.append(time.perf_counter() - start)
    return (walls[1] - walls[0]) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--long", type=int, default=12)
    args = parser.parse_args()
    pairs = dict(data=str(ASSETS / "tiny-sd-prefs" / "train.parquet"), batch_size=4)
    with tempfile.TemporaryDirectory() as folder:
        sd3 = Path(folder) / "tiny-sd3"
        tiny_pipeline(kind="sd3").save_pretrained(sd3)
        groups: dict[str, tuple[dict[str, Any], list[tuple[str, ModuleType, dict[str, Any]]]]] = {
            "tiny SD (assets/tiny-sd)": (dict(model=str(ASSETS / "tiny-sd"), **pairs),
                                         [("InPO", inpo, {}), ("SePPO", seppo, {})]),
            "tiny SD3 (random)": (dict(model=str(sd3), **pairs),
                                  [("Flow-DPO", flow_dpo, {}),
                                   ("AC-Flow", acflow, dict(model=str(sd3), prompts=str(ASSETS / "tiny-sd-prompts.txt"),
                                                            batch_size=2, samples_per_prompt=4))]),
        }
        lines = ["| model | method | s/step | Diffusion-DPO s/step | method / DPO (median) |",
                 "|---|---|---:|---:|---:|"]
        for model, (dpo_settings, methods) in groups.items():
            for name, method, own in methods:
                settings = own or dpo_settings
                ratios, mine, theirs = [], [], []
                for repeat in range(args.repeats):
                    order = [(method, settings), (dpo, dpo_settings)][:: 1 if repeat % 2 == 0 else -1]
                    timed = {m: seconds_per_step(m, s, args.short, args.long) for m, s in order}
                    mine.append(timed[method])
                    theirs.append(timed[dpo])
                    ratios.append(timed[method] / timed[dpo])
                    print(f"{model} {name} repeat {repeat}: {timed[method]:.3f} vs {timed[dpo]:.3f}", flush=True)
                lines.append(f"| {model} | {name} | {statistics.median(mine):.3f} | {statistics.median(theirs):.3f} | "
                             f"**{statistics.median(ratios):.2f}** |")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
