"""InPO against Diffusion-DPO on the embedded task: steps to reach the reward Diffusion-DPO ends with.

Both train the embedded tiny model with the demo's settings (full fine-tune, beta 5000, lr 1e-4, 16 pairs
per step, same seed, same data order), writing a checkpoint every --every steps. Each checkpoint is
scored by the world's held-out placement reward over the same fixed-seed samples (12 prompts x
--per-prompt). The table gives, for each method, the held-out reward at each checkpoint, the first
step at which it reaches Diffusion-DPO's final reward, and seconds per training step.

    python scripts/benchmark_inpo.py --steps 300 --every 25
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from mmalign.diffusion import dpo, inpo, world
from mmalign.diffusion.demo import embedded_config
from mmalign.diffusion.evaluate import evaluate_reward
from mmalign.diffusion.models import load_pipeline
from mmalign.trainer import checkpoints

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def placement(images, prompts):
    return world.placement_reward(images)


def train(method, output: Path, args) -> float:
    """Train one method; returns seconds per step (wall time of the whole run over its steps)."""
    config = embedded_config(method, output, beta=args.beta, max_steps=args.steps, checkpoint_every=args.every,
                             keep_checkpoints=args.steps // args.every + 1, seed=args.seed)
    start = time.perf_counter()
    method.run(config)
    return (time.perf_counter() - start) / args.steps


def curve(output: Path, args) -> dict[int, float]:
    """Held-out reward of the base model (step 0) and of every checkpoint under `output`."""
    pipe = load_pipeline(ASSETS / "tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    rewards = {}
    for step, state in [(0, base_state)] + [(int(p.name.split("-")[1]), load_file(str(p / "trainable.safetensors")))
                                             for p in checkpoints(output)]:
        pipe.unet.load_state_dict(state)
        summary, _, _ = evaluate_reward(pipe, list(world.CAPTIONS), placement, per_prompt=args.per_prompt,
                                        seed=args.eval_seed)
        rewards[step] = summary["mean"]
        print(f"  {output.name} step {step}: {summary['mean']:.3f}", flush=True)
    return rewards


def first_reaching(rewards: dict[int, float], target: float) -> int | None:
    return next((step for step, value in sorted(rewards.items()) if value >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--beta", type=float, default=5000.0)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--eval-seed", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("runs/benchmark-inpo"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for name, method in (("Diffusion-DPO", dpo), ("InPO", inpo)):
        output = args.workdir / f"{name.lower()}-{time.strftime('%H%M%S')}"
        seconds = train(method, output, args)
        results[name] = {"s_per_step": seconds, "rewards": curve(output, args)}
    target = results["Diffusion-DPO"]["rewards"][args.steps]
    steps = sorted(results["Diffusion-DPO"]["rewards"])
    lines = [f"target: Diffusion-DPO's held-out reward after {args.steps} steps = {target:.3f} "
             f"(base {results['Diffusion-DPO']['rewards'][0]:.3f}; {12 * args.per_prompt} fixed-seed samples)", "",
             "| method | s/step | steps to reach target | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---:|---:|" + "---:|" * len(steps)]
    for name, r in results.items():
        reached = first_reaching(r["rewards"], target)
        lines.append(f"| {name} | {r['s_per_step']:.3f} | {reached if reached is not None else 'not reached'} | "
                     + " | ".join(f"{r['rewards'][s]:.3f}" for s in steps) + " |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
