"""SePPO (Zhang et al. 2024, arXiv 2410.05255): preference optimisation from winning images alone.

No losers are read. At each step the reference is an earlier state of the policy, drawn uniformly
from the last K = 7 snapshots, one taken every 30 updates (Algorithm 1; `mmalign.reference.Snapshots`).
The reference's own sample x_ref for the same prompt (sampled with its weights, `reference_steps` DDIM
steps, no gradients) takes the loser slot. With one eps and one t shared by the winner (anchor) w and
x_ref, and errors e of the policy and e' of the reference,

    d_w = e(w) - e'(w),   d_r = e(x_ref) - e'(x_ref)
    sign = -1 if e'(w) < e(w) else +1          (Anchor-based Adaptive Flipper)
    loss = -log sigmoid(-0.5 * beta * (d_w - sign * d_r))

AAF: when the reference fits the anchor better than the policy does, its own sample is likely good
too, and both are pushed up (sign -1, SFT-like); otherwise x_ref is treated as a loser (sign +1, DPO).
The paper's T * w_t is absorbed into beta (w_t = 1); beta, lr and the sampling steps of x_ref are not
public: the defaults here are Diffusion-DPO's beta 5000 and 20 sampler steps. Any core objective applies
to the signed log-ratios (`--loss`). Logged besides the Diffusion-DPO metrics: flip_rate (share of
sign = -1) and reference_index (which snapshot was used).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmalign.config import option
from mmalign.reference import Snapshots

from .base import Parts
from .data import PreferencePairs
from .flux import latent_grid
from .latents import encode, to_latents
from .models import denoiser_name
from .pairwise import PairwiseConfig, pair_condition, pair_loss, pair_noising, random_flip, train


@dataclass
class Config(PairwiseConfig):
    """SePPO settings (plus the pairs', the denoiser's and the training loop's); data: Pick-a-Pic rows, winners only
    are read."""

    snapshots: int = option(7, "how many earlier policy snapshots the reference is drawn from (K)")
    snapshot_every: int = option(30, "optimizer steps between snapshots")
    reference_selection: Literal["uniform", "latest"] = option("uniform", "how the step's reference snapshot is chosen")
    reference_steps: int = option(20, "sampler steps for the reference's own sample x_ref")
    adaptive_flipper: bool = option(True, "AAF; off: x_ref is always the loser (the paper's ablation)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.snapshots < 1 or self.snapshot_every < 1 or self.reference_steps < 1:
            raise ValueError("snapshots, snapshot_every and reference_steps must be at least 1")


SeppoParts = Parts[Config]


class Winners(PreferencePairs):
    """The preferred image of each non-tie Pick-a-Pic pair: {'pixel_values': [1,3,R,R], 'caption', 'index'}."""

    def item(self, record: dict, row: int) -> dict[str, Any]:
        field = self.fields[0] if self.winner_first(record) else self.fields[1]
        return {"pixel_values": self._pixels(record[field], row, field)[None], "caption": record["caption"],
                "index": row}


@torch.no_grad()
def reference_samples(parts: SeppoParts, reference: Snapshots, captions: list[str], generator: torch.Generator
                      ) -> torch.Tensor:
    """x_ref: the reference model's own latents for the captions (the pipeline's sampler, output_type="latent")."""
    pipe, c = parts.pipe, parts.config
    sampler = type(pipe)(**{**pipe.components, denoiser_name(pipe): reference.model})
    sampler.set_progress_bar_config(disable=True)
    latents = sampler(prompt=captions, num_inference_steps=c.reference_steps, height=parts.resolution,
                      width=parts.resolution, guidance_scale=c.sampler_guidance(pipe, c.guidance_scale),
                      generator=generator, output_type="latent").images
    return latent_grid(pipe, latents, parts.resolution)


def adaptive_flipper(model_err: torch.Tensor, ref_err: torch.Tensor) -> torch.Tensor:
    """AAF: -1 where the reference fits the anchor (winner) better than the policy, e'(w) < e(w), else +1."""
    return torch.where(ref_err.chunk(2)[0] < model_err.chunk(2)[0], -1.0, 1.0)


def always_loser(model_err: torch.Tensor, ref_err: torch.Tensor) -> torch.Tensor:
    """+1 for every pair: x_ref is always the loser (SePPO without AAF)."""
    return torch.ones_like(model_err.chunk(2)[0])


def seppo_step(model, batch: dict[str, Any], generator: torch.Generator,
               parts: SeppoParts) -> tuple[torch.Tensor, dict]:
    """One SePPO micro-step on a batch of winners [B,1,3,R,R]: x_ref from the chosen snapshot takes the loser slot."""
    reference = parts.reference
    assert isinstance(reference, Snapshots)  # the reference `snapshots(config)` made
    reference.tick(model)
    index = reference.select(generator)
    pixels = batch["pixel_values"][:, 0]
    if parts.config.random_flip:
        pixels = random_flip(pixels, generator)
    winners = to_latents(*encode(parts.pipe.vae, pixels, parts.vae_dtype), generator, parts.pipe.vae)
    latents = torch.cat([winners, reference_samples(parts, reference, batch["caption"], generator).to(winners.dtype)])
    noisy, timesteps, target = pair_noising(parts.noise_scheduler, latents, generator, parts.config.timestep_sampling)
    condition = pair_condition(batch, generator, parts, latents.device)
    loss, metrics = pair_loss(model, batch, noisy, timesteps, condition, target, parts,
                              loser_sign=adaptive_flipper if parts.config.adaptive_flipper else always_loser)
    return loss, {**metrics, "reference_index": torch.tensor(float(index))}


def snapshots(config: Config):
    """The reference factory: snapshots of the policy every `snapshot_every` optimizer steps."""
    every = config.snapshot_every * config.gradient_accumulation_steps
    return lambda model, dtype: Snapshots(model, keep=config.snapshots, every=every,
                                          selection=config.reference_selection, dtype=dtype)


def run(config: Config) -> list[dict[str, float]]:
    """`mmalign diffusion seppo`: SePPO training from the winners of Pick-a-Pic pairs into config.output."""
    return train(config, lambda parts: functools.partial(seppo_step, parts=parts), "SePPO", pairs_class=Winners,
                 reference_factory=snapshots(config), curves=("flip_rate",))
