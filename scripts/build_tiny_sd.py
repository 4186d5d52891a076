"""Pretrain the embedded tiny Stable-Diffusion-architecture model on the synthetic shapes world, and write its data.

Writes, under --output (default `assets/`):
  tiny-sd/             a diffusers StableDiffusionPipeline directory (safetensors), loadable with from_pretrained
  tiny-sd-prefs/       Pick-a-Pic v2 style preference pairs (train.parquet, test.parquet) labelled by the
                       world's placement reward (object on the left is preferred)
  tiny-sd-prompts.txt  the held-out evaluation prompts
  tiny-sd-base.png     a grid of the base model's samples, one row per caption
  tiny-sd3/            with --kind sd3: the same world learnt by an SD3-architecture flow-matching model

The VAE is trained first (reconstruction + a small KL term), then the denoiser on its latents (the
UNet with the epsilon objective, or the SD3 transformer with the flow-matching velocity objective),
10% empty captions (for classifier-free guidance) and an EMA of its weights. The CLIP text encoders
stay at their random initialisation, frozen, as SD's text encoders are frozen.

    python scripts/build_tiny_sd.py                      # about 25 minutes on 2 CPU cores
    python scripts/build_tiny_sd.py --kind sd3 --vae-from assets/tiny-sd   # the flow twin, reusing the VAE: about an
        # hour on one CPU thread (3842 s beside other jobs); base samples: placement reward 0.481, colour match 0.948
    python scripts/build_tiny_sd.py --vae-steps 5 --denoiser-steps 5 --pairs 8 --output /tmp/x   # smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from mmalign.diffusion import world
from mmalign.diffusion.data import write_pickapic
from mmalign.diffusion.flow import flow_interpolate, sample_u
from mmalign.diffusion.models import denoiser_of, load_pipeline
from mmalign.diffusion.sample import generate, image_grid
from mmalign.diffusion.scoring import Condition, encode_prompts, is_flow, predict, training_target
from mmalign.diffusion.tiny import tiny_pipeline


def scene_batch(rng: np.random.Generator, n: int) -> tuple[list[str], torch.Tensor]:
    """n random captions and their renderings in [-1, 1]."""
    captions, images = zip(*(world.random_scene(rng) for _ in range(n)))
    return list(captions), torch.stack([world.pil_to_tensor(im) for im in images]) * 2 - 1


def train_vae(vae, rng, steps: int, batch: int, lr: float, kl_weight: float = 1e-6) -> None:
    """Fit the VAE to reconstruct world images: MSE + kl_weight * KL(q(z|x) || N(0, I))."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, 50, max(steps, 1))
    vae.train()
    for step in range(steps):
        _, images = scene_batch(rng, batch)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, images) + kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step} loss {loss.item():.5f}", flush=True)
    vae.eval()


@torch.no_grad()
def encode_pool(pipe, rng, n: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Captions and the VAE posterior (mean, std) of n random scenes, to draw latents from in denoiser training."""
    captions, means, stds = [], [], []
    for start in range(0, n, 256):
        caps, images = scene_batch(rng, min(256, n - start))
        dist = pipe.vae.encode(images).latent_dist
        captions += caps
        means.append(dist.mean)
        stds.append(dist.std)
    return captions, torch.cat(means), torch.cat(stds)


def train_denoiser(pipe, pool, steps: int, batch: int, lr: float, drop_prob: float = 0.1) -> None:
    """Denoising on pooled latents (epsilon for SD, velocity with logit-normal sigmas for SD3), 10% empty captions,
    EMA weights copied in at the end."""
    captions, means, stds = pool
    vocabulary = list(world.CAPTIONS) + [""]
    table = encode_prompts(pipe, vocabulary, world.IMAGE_SIZE, torch.device("cpu")).kwargs
    index = torch.tensor([vocabulary.index(c) for c in captions])
    model, scheduler = denoiser_of(pipe), pipe.scheduler
    vae = pipe.vae.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, 200, max(steps, 1))
    ema = EMAModel(model.parameters(), decay=0.999)
    model.train()
    for step in range(steps):
        pick = torch.randint(len(captions), (batch,))
        sample = means[pick] + stds[pick] * torch.randn_like(means[pick])
        latents = (sample - (vae.shift_factor or 0.0)) * vae.scaling_factor
        noise = torch.randn_like(latents)
        if is_flow(scheduler):
            noisy, t, target = flow_interpolate(scheduler, latents, noise, sample_u(batch, None, "cpu", "logit_normal"))
        else:
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
            noisy, target = scheduler.add_noise(latents, noise, t), training_target(scheduler, latents, noise, t)
        rows = torch.where(torch.rand(batch) < drop_prob, len(vocabulary) - 1, index[pick])
        condition = Condition({k: v[rows] for k, v in table.items()},
                              "hidden_states" if is_flow(scheduler) else "sample")
        loss = F.mse_loss(predict(model, noisy, t, condition), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        if step % 200 == 0 or step == steps - 1:
            print(f"denoiser step {step} loss {loss.item():.5f}", flush=True)
    ema.copy_to(model.parameters())
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "assets")
    parser.add_argument("--kind", choices=["sd", "sd3"], default="sd", help="UNet + DDIM, or SD3 transformer + flow")
    parser.add_argument("--vae-from", type=Path, default=None, help="reuse the VAE of this pipeline folder")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--denoiser-steps", type=int, default=None, help="default: 8000 (sd), 4000 (sd3)")
    parser.add_argument("--sd3-layers", type=int, default=4, help="--kind sd3: transformer blocks")
    parser.add_argument("--sd3-heads", type=int, default=8, help="--kind sd3: attention heads of width 8")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=20000, help="scenes encoded once for denoiser training")
    parser.add_argument("--pairs", type=int, default=2000, help="training preference pairs (test gets a quarter)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.time()
    pipe = tiny_pipeline(kind=args.kind, seed=args.seed, sd3_layers=args.sd3_layers, sd3_heads=args.sd3_heads)
    name = "tiny-sd" if args.kind == "sd" else "tiny-sd3"
    if args.vae_from:
        pipe.vae.load_state_dict(load_pipeline(args.vae_from).vae.state_dict())
    else:
        train_vae(pipe.vae, rng, args.vae_steps, args.batch, lr=1e-3)
    pool = encode_pool(pipe, rng, args.pool)
    shift = float(pool[1].mean()) if args.kind == "sd3" else None  # SD3 convention: z -> (z - shift) * scale
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=float(1.0 / (pool[1] - (shift or 0.0)).std()))
    print(f"latent shift {shift}, scaling factor {pipe.vae.config.scaling_factor:.4f}", flush=True)
    steps = args.denoiser_steps or (8000 if args.kind == "sd" else 4000)
    train_denoiser(pipe, pool, steps, args.batch, lr=1e-3)

    args.output.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.output / name, safe_serialization=True)
    if args.kind == "sd":
        prefs = args.output / "tiny-sd-prefs"
        prefs.mkdir(exist_ok=True)
        write_pickapic(world.preference_pairs(args.pairs, seed=args.seed + 1), prefs / "train.parquet")
        write_pickapic(world.preference_pairs(max(args.pairs // 4, 1), seed=args.seed + 2), prefs / "test.parquet")
        (args.output / "tiny-sd-prompts.txt").write_text("\n".join(world.CAPTIONS) + "\n")

    prompts = [c for c in world.CAPTIONS for _ in range(8)]
    images = generate(pipe, prompts, seed=1000)
    image_grid(images, columns=8, scale=2).save(args.output / f"{name}-base.png")
    print(f"base placement reward {world.placement_reward(images).mean():.3f}, "
          f"colour match {world.colour_match(images, prompts).mean():.3f}, {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
