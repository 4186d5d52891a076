"""Flow-GRPO's cost against AC-Flow's on the same tiny model: seconds per update and prompts per second (ratios).

A tiny random SD3-architecture model built in-process, LoRA rank 8, fp32, 2 prompts x 4 samples per rollout, 10
sampler steps, both methods' defaults otherwise; Flow-GRPO with its default guidance 4.5 (every forward doubled) and
with guidance 1 (AC-Flow's default). An update is an optimizer step; AC-Flow samples every update, Flow-GRPO once per
`--updates-per-rollout` (2) updates, so its prompts/s = prompts per rollout / (2 x seconds per update). Seconds per
update is (wall(--long) - wall(--short)) / (long - short), so loading and saving cancel; the methods run in
alternating order; the ratios are of the medians over --repeats.

    python scripts/benchmark_grpo.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmark_methods import seconds_per_step  # the same timing: scripts/ is on sys.path when run as a script

from mmalign.diffusion import acflow, grpo
from mmalign.diffusion.tiny import tiny_pipeline

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PROMPTS = 2  # per rollout
COMMON = dict(num_samples=0, report_to="none", checkpoint_every=0, batch_size=PROMPTS, samples_per_prompt=4,
              sample_steps=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--long", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        sd3 = Path(folder) / "tiny-sd3"
        tiny_pipeline(kind="sd3").save_pretrained(sd3)
        base = dict(model=str(sd3), prompts=str(ASSETS / "tiny-sd-prompts.txt"))
        runs: list[tuple[str, ModuleType, dict[str, Any], int]] = [
            ("AC-Flow", acflow, base, 1),
            ("Flow-GRPO, guidance 4.5", grpo, base, 2),
            ("Flow-GRPO, guidance 1", grpo, {**base, "guidance_scale": 1.0}, 2),
        ]
        timed: dict[str, list[float]] = {name: [] for name, *_ in runs}
        for repeat in range(args.repeats):
            for name, method, settings, _ in runs[:: 1 if repeat % 2 == 0 else -1]:
                timed[name].append(seconds_per_step(method, settings, args.short, args.long, COMMON))
                print(f"repeat {repeat} {name}: {timed[name][-1]:.3f} s/update", flush=True)
        reference = statistics.median(timed["AC-Flow"])
        lines = ["| method | s/update | prompts/s | s/update vs AC-Flow | prompts/s vs AC-Flow |",
                 "|---|---:|---:|---:|---:|"]
        for name, _, _, updates_per_rollout in runs:
            seconds = statistics.median(timed[name])
            prompts = PROMPTS / (updates_per_rollout * seconds)
            lines.append(f"| {name} | {seconds:.3f} | {prompts:.2f} | **{seconds / reference:.2f}** | "
                         f"**{prompts * reference / PROMPTS:.2f}** |")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
