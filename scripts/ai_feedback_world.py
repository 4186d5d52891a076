"""AI feedback end to end on the embedded world: human pairs -> reward model -> ranked samples -> Diffusion-DPO.

1. `reward train`: a tiny open_clip ViT (assets/tiny-clip.json) learns from the world's human pairs
   (assets/tiny-sd-prefs/train.parquet, labelled by placement); held-out accuracy and ECE on test.parquet.
2. `reward pairs`: the base model (assets/tiny-sd) samples N images per prompt, the scorer ranks them,
   pairs are built (best vs worst by default). The agreement of these AI labels with the world's own
   placement reward is measured, never shown to anything that trains.
3. `diffusion dpo --full` on those pairs (lr 1e-4, beta 5000, 300 steps of 16 pairs, as the demo).
4. The world's placement reward of base and aligned models on fixed held-out seeds: means with 95% CIs
   and the paired gain (mmalign.stats.mean_ci).

    python scripts/ai_feedback_world.py --output runs/ai-feedback
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from mmalign.diffusion import dpo, world
from mmalign.diffusion.data import PreferencePairs
from mmalign.diffusion.evaluate import evaluate_reward
from mmalign.diffusion.models import load_pipeline
from mmalign.diffusion.rewards import pairs as reward_pairs
from mmalign.diffusion.rewards import train as reward_train
from mmalign.stats import mean_ci

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def placement(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return world.placement_reward(images)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--scorer-steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=16, help="copies of the 12 captions, one group of samples each")
    parser.add_argument("--num-per-prompt", type=int, default=8)
    parser.add_argument("--strategy", default="best-worst", choices=["best-worst", "margin"])
    parser.add_argument("--max-pairs-per-prompt", type=int, default=0)
    parser.add_argument("--dpo-steps", type=int, default=300)
    parser.add_argument("--eval-per-prompt", type=int, default=8)
    parser.add_argument("--eval-seed", type=int, default=1000)
    args = parser.parse_args(argv)
    out, start, seconds = args.output, time.time(), {}

    began = time.time()
    scorer_run = reward_train.run(reward_train.Config(
        scorer=str(ASSETS / "tiny-clip.json"), data=str(ASSETS / "tiny-sd-prefs" / "train.parquet"),
        eval_data=str(ASSETS / "tiny-sd-prefs" / "test.parquet"), output=out / "scorer",
        max_steps=args.scorer_steps, batch_size=32, learning_rate=1e-3, warmup_steps=10, report_to="none",
        checkpoint_every=0))
    seconds["scorer"] = time.time() - began

    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(list(world.CAPTIONS) * args.repeats) + "\n")
    began = time.time()
    pairs = reward_pairs.run(reward_pairs.Config(
        scorer=str(out / "scorer"), model=str(ASSETS / "tiny-sd"), prompts=str(prompts), output=out / "pairs",
        num_per_prompt=args.num_per_prompt, steps=20, batch_size=128, strategy=args.strategy,
        max_pairs_per_prompt=args.max_pairs_per_prompt, seed=10_000))
    seconds["pairs"] = time.time() - began

    began = time.time()
    dpo_config = dpo.Config(model=str(ASSETS / "tiny-sd"), data=str(out / "pairs"), output=out / "dpo", full=True,
                            beta=5000, learning_rate=1e-4, warmup_steps=10, max_steps=args.dpo_steps, batch_size=16,
                            num_samples=0, report_to="none", checkpoint_every=0)
    history = dpo.run(dpo_config)
    seconds["dpo"] = time.time() - began

    began = time.time()
    kwargs = dict(per_prompt=args.eval_per_prompt, seed=args.eval_seed, steps=20)
    rewards, colour = {}, {}
    captions = [c for c in world.CAPTIONS for _ in range(args.eval_per_prompt)]
    for name, folder in (("base", ASSETS / "tiny-sd"), ("aligned", out / "dpo")):
        pipe = load_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
        _, rewards[name], images = evaluate_reward(pipe, list(world.CAPTIONS), placement, **kwargs)
        colour[name] = world.colour_match(images, captions).mean().item()
    seconds["evaluate"] = time.time() - began

    result: dict[str, Any] = {
        "scorer_held_out": {k: scorer_run[k] for k in ("before", "after")},
        "pairs": {k: pairs[k] for k in ("samples", "pairs", "images_per_second")},
        "ai_label_agreement_with_world": world.placement_agreement(PreferencePairs(out / "pairs", resolution=32)),
        "dpo_implicit_acc_last_50": sum(r["implicit_acc"] for r in history[-50:]) / len(history[-50:]),
        "placement": {"base": mean_ci(rewards["base"]), "aligned": mean_ci(rewards["aligned"]),
                      "gain": mean_ci(rewards["aligned"] - rewards["base"]), "samples": len(rewards["base"])},
        "colour_match": colour,
        "seconds": {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(time.time() - start, 1)},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    p = result["placement"]
    print(f"scorer held-out accuracy {result['scorer_held_out']['after']['accuracy']:.3f}, "
          f"ECE {result['scorer_held_out']['after']['ece']:.3f}; {result['pairs']['pairs']} AI pairs, "
          f"{result['ai_label_agreement_with_world']:.3f} agree with the world's reward")
    for name in ("base", "aligned", "gain"):
        s = p[name]
        print(f"placement {name:<8} {s['mean']:+.3f} (95% CI {s['ci_low']:+.3f} .. {s['ci_high']:+.3f})")
    print(f"colour match: base {colour['base']:.2f}, aligned {colour['aligned']:.2f}; seconds: {result['seconds']}")
    return result


if __name__ == "__main__":
    main()
