"""Over-optimisation on the embedded world, seen and stopped by a held-out gold reward during training.

Training preference (the proxy): LARGER objects. Pairs of the world's renderings (same caption, random place and
size) are labelled by `world.object_area` (a tie when the areas differ by less than --tie-margin); the demo's
placement preference plays no part. Held-out gold reward: what people here want, the caption's colour at the size
they like, gold(x, y) = colour_match(x, y) * max(0, 1 - |area(x) - A*| / A*) with A* = 0.14, a little above
the base model's mean area (0.12): "larger" is right until the objects pass A*, then the proxy and the gold part.
Colour match alone cannot serve as the gold here: the base model already scores 1.000 on it, so it can only fall
and its best would be the untrained model. Diffusion-DPO with the demo's settings (`demo.embedded_config`: full
fine-tune of assets/tiny-sd, beta 5000, lr 1e-4, batch 16) is scored every --eval-every steps on the 12 captions x
--eval-per-prompt fixed seeds, with --early-stop-patience:

1. the run stops at step S, keeping checkpoints/best-B (copied to <run>/kept/best-B);
2. the run is resumed with patience 0 and driven on to --max-steps: its best.json then names the best evaluation
   of the whole run, B*;
3. the base model, the kept checkpoint, B* and the end of the run are sampled on fresh seeds (--final-per-prompt
   per caption from seed 5000) and scored on both rewards (and colour match): means with 95% CIs, and the paired
   difference kept - B* with its 95% CI.

    python scripts/overoptimisation.py --output runs/overoptimisation
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from mmalign.diffusion import dpo, world
from mmalign.diffusion.data import write_pickapic
from mmalign.diffusion.demo import embedded_config
from mmalign.diffusion.eval.models import load_checkpoint
from mmalign.diffusion.evaluate import fixed_seed_samples
from mmalign.diffusion.models import load_pipeline
from mmalign.stats import mean_ci

FINAL_SEED = 5000  # the final comparison's seeds, apart from the training-time evaluation's (1000 on)
REWARDS = ("area", "gold", "colour_match")
LIKED_AREA = 0.14  # A*: the object area the gold reward likes best (the base model's mean is about 0.12)


def gold(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """gold(x, y) = colour_match(x, y) * max(0, 1 - |area(x) - A*| / A*), A* = LIKED_AREA."""
    closeness = (1 - (world.object_area(images) - LIKED_AREA).abs() / LIKED_AREA).clamp_min(0)
    return world.colour_match(images, prompts) * closeness


def scores(model: str, checkpoint: Path | None, per_prompt: int) -> dict[str, torch.Tensor]:
    """Fixed-seed samples of the model (with a run checkpoint's weights) scored by area, gold and colour match."""
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    if checkpoint is not None:
        load_checkpoint(pipe, checkpoint)
    captions, images = fixed_seed_samples(pipe, list(world.CAPTIONS), per_prompt, seed=FINAL_SEED, steps=20)
    return {"area": world.object_area(images), "gold": gold(images, captions),
            "colour_match": world.colour_match(images, captions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="folder of the pairs, the run and the results")
    parser.add_argument("--pairs", type=int, default=2000, help="training pairs labelled by object area")
    parser.add_argument("--tie-margin", type=float, default=0.01, help="area difference below which a pair ties")
    parser.add_argument("--max-steps", type=int, default=240, help="optimizer steps the run is driven to")
    parser.add_argument("--eval-every", type=int, default=20, help="optimizer steps between held-out evaluations")
    parser.add_argument("--eval-per-prompt", type=int, default=8, help="held-out samples per caption in training")
    parser.add_argument("--early-stop-patience", type=int, default=4, help="evaluations without a new best (3 "
                        "stops on the plateau of steps 20-80, before the gold reward's rise to its peak at 120)")
    parser.add_argument("--final-per-prompt", type=int, default=16, help="samples per caption in the comparison")
    args = parser.parse_args()

    args.output.mkdir(parents=True, exist_ok=True)
    pairs = write_pickapic(world.preference_pairs(args.pairs, seed=7, tie_margin=args.tie_margin,
                                                  reward=world.object_area), args.output / "pairs.parquet")
    prompts = args.output / "held_out_prompts.txt"
    prompts.write_text("".join(caption + "\n" for caption in world.CAPTIONS))
    run = args.output / "run"
    settings = dict(data=str(pairs), max_steps=args.max_steps, eval_every=args.eval_every, eval_prompts=str(prompts),
                    eval_reward=gold,
                    eval_per_prompt=args.eval_per_prompt)
    history = dpo.run(embedded_config(dpo, run, early_stop_patience=args.early_stop_patience, **settings))
    stop = int(history[-1]["step"])
    kept_step = json.loads((run / "checkpoints" / "best.json").read_text())["step"]
    kept = run / "kept" / f"best-{kept_step}"
    shutil.copytree(run / "checkpoints" / kept.name, kept)
    if stop < args.max_steps:
        dpo.run(embedded_config(dpo, run, resume="latest", **settings))
    best = json.loads((run / "checkpoints" / "best.json").read_text())

    model = str(embedded_config(dpo, run).model)
    folders = {"base": None, f"kept (step {kept_step})": kept,
               f"best of the whole run (step {best['step']})": run / "checkpoints" / best["folder"],
               f"end of the run (step {args.max_steps})": run / "checkpoints" / f"checkpoint-{args.max_steps}"}
    measured = {name: scores(model, folder, args.final_per_prompt) for name, folder in folders.items()}
    names = list(measured)
    curve = [(row["step"], row["eval/reward"]) for row in
             (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()) if "eval/reward" in row]
    result = {
        "stop_step": stop, "kept_step": kept_step, "best_step": best["step"], "max_steps": args.max_steps,
        "liked_area": LIKED_AREA,
        "held_out_curve": curve,
        "samples": len(measured["base"]["area"]),
        "scores": {name: {reward: mean_ci(values) for reward, values in by_reward.items()}
                   for name, by_reward in measured.items()},
        "kept_minus_best": {reward: mean_ci(measured[names[1]][reward] - measured[names[2]][reward])
                            for reward in REWARDS},
    }
    (args.output / "overoptimisation.json").write_text(json.dumps(result, indent=2))
    print(f"stopped at step {stop} of {args.max_steps}; kept best-{kept_step}; best of the whole run: step "
          f"{best['step']}")
    print("held-out gold reward during training: " + ", ".join(f"{s}: {r:.3f}" for s, r in curve))
    for reward in REWARDS:
        print(f"{reward} over {result['samples']} fresh fixed-seed samples:")
        for name in names:
            s = result["scores"][name][reward]
            print(f"  {name:<34} {s['mean']:.4f}  (95% CI {s['ci_low']:.4f} .. {s['ci_high']:.4f})")
        d = result["kept_minus_best"][reward]
        print(f"  kept - best (paired)               {d['mean']:+.4f}  (95% CI {d['ci_low']:+.4f} .. "
              f"{d['ci_high']:+.4f})")
    print(f"curves: {run / 'held_out.png'}; numbers: {args.output / 'overoptimisation.json'}")


if __name__ == "__main__":
    main()
