"""Train one diffusion method on the embedded world and report its paired held-out placement gain over the base.

The demo's training settings (`demo.embedded_config`: full fine-tune of assets/tiny-sd, beta 5000, lr 1e-4, 300
steps of 16, unless --set says otherwise; the flow methods and GRPO train the flow twin assets/tiny-sd3, AC-Flow
and GRPO on the world's captions and reward instead of pairs), then 4 fixed-seed samples per caption (48;
--eval-per-prompt) from the base and the trained model, scored by the world's placement reward; the gain is the
mean of the paired differences with its 95% CI. `--model-winners K N` replaces the human pairs by the base model's
own samples (`world.model_pairs`): for each caption, the N best by placement of K samples are the winners (the N
worst the losers), as Pick-a-Pic rows. Also printed: the change in denoising error on the held-out winners
(test.parquet) at fixed noise and timesteps, and the implicit accuracy over the first 30 and last 50 steps.

    python scripts/embedded_gain.py seppo --set max_steps=150 batch_size=8 reference_steps=10
    python scripts/embedded_gain.py seppo --model-winners 32 8 --set max_steps=300 batch_size=8 reference_steps=10
    python scripts/embedded_gain.py inpo --set beta=2000 max_steps=150 batch_size=8
    python scripts/embedded_gain.py flow-dpo --set max_steps=200
    python scripts/embedded_gain.py acflow --set max_steps=60 batch_size=4 sample_steps=8 learning_rate=1e-3
    python scripts/embedded_gain.py grpo --set max_steps=40 batch_size=4 guidance_scale=1 learning_rate=1e-3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml

from mmalign.config import coerce_values
from mmalign.diffusion import acflow, dpo, flow_dpo, grpo, inpo, latents, seppo, world
from mmalign.diffusion.data import collate_pairs, write_pickapic
from mmalign.diffusion.demo import embedded_config
from mmalign.diffusion.evaluate import paired_gain
from mmalign.diffusion.models import denoiser_of, load_pipeline, sampling_pipeline
from mmalign.diffusion.pairwise import pair_noising
from mmalign.diffusion.scoring import encode_prompts, predict
from mmalign.stats import mean_ci

ASSETS = Path(__file__).resolve().parents[1] / "assets"
METHODS = {"dpo": dpo, "inpo": inpo, "seppo": seppo, "flow-dpo": flow_dpo, "acflow": acflow, "grpo": grpo}
ONLINE = (acflow, grpo)  # trained on the world's captions and reward instead of pairs
FLOW_TWIN = ASSETS / "tiny-sd3"


@torch.no_grad()
def winner_error(pipe, count: int = 192) -> torch.Tensor:
    """Denoising (flow: velocity) MSE [count] of the held-out winners at fixed noise and timesteps."""
    winners = seppo.Winners(ASSETS / "tiny-sd-prefs" / "test.parquet", resolution=32)
    batch = collate_pairs([winners[i] for i in range(min(count, len(winners)))])
    generator = torch.Generator().manual_seed(0)
    mean, std = latents.encode(pipe.vae, batch["pixel_values"][:, 0], torch.float32)
    x0 = latents.to_latents(mean, std, generator, pipe.vae)
    noisy, timesteps, target = (x[:len(x0)] for x in pair_noising(pipe.scheduler, x0.repeat(2, 1, 1, 1), generator))
    condition = encode_prompts(pipe, batch["caption"], 32, x0.device)
    return (predict(denoiser_of(pipe), noisy, timesteps, condition) - target).pow(2).flatten(1).mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (YAML values)")
    parser.add_argument("--model-winners", nargs=2, type=int, metavar=("K", "N"))
    parser.add_argument("--eval-seed", type=int, default=4000)
    parser.add_argument("--eval-per-prompt", type=int, default=4, help="fixed-seed samples per caption (12 captions)")
    args = parser.parse_args()
    method = METHODS[args.method]
    overrides = coerce_values(method.Config, {key: yaml.safe_load(value) for key, value in
                                              (item.split("=", 1) for item in args.set)}, "--set")
    if method.Config.schedule == "flow" or method is grpo:
        overrides = {"model": str(FLOW_TWIN), **overrides}
    with tempfile.TemporaryDirectory() as folder:
        base = load_pipeline(overrides.get("model", ASSETS / "tiny-sd"))
        base.set_progress_bar_config(disable=True)
        data = (write_pickapic(world.model_pairs(base, *args.model_winners), Path(folder) / "winners.parquet")
                if args.model_winners else ASSETS / "tiny-sd-prefs" / "train.parquet")
        output = Path(folder) / "run"
        config = (method.Config(prompts=str(ASSETS / "tiny-sd-prompts.txt"), output=output, num_samples=0,
                                report_to="none", checkpoint_every=0, **overrides) if method in ONLINE
                  else embedded_config(method, output, data=str(data), **overrides))
        history = method.run(config)
        tuned = (load_pipeline(config.output) if config.full
                 else sampling_pipeline(str(config.model), lora=config.output))
        tuned.set_progress_bar_config(disable=True)
        gain, _ = paired_gain(base, tuned, list(world.CAPTIONS), world.reward, per_prompt=args.eval_per_prompt,
                                 seed=args.eval_seed)
        error = mean_ci(winner_error(tuned) - winner_error(base))
    accuracy = ([sum(r["implicit_acc"] for r in rows) / len(rows) for rows in (history[:30], history[-50:])]
                if "implicit_acc" in history[0] else None)
    print(json.dumps({"method": args.method, "overrides": overrides, "model_winners": args.model_winners,
                      "placement_gain": gain, "held_out_winner_error_change": error,
                      "implicit_acc_first30_last50": accuracy}, indent=1))


if __name__ == "__main__":
    main()
