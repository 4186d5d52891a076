"""The pairwise preference step that Diffusion-DPO, InPO, SePPO, Flow-DPO and video DPO share.

Winner w and loser l share ONE noise eps and ONE timestep t. With per-sample denoising errors
e = mean_(C,H,W) (model(x_t, t, c) - target)^2 of the policy (e_w, e_l) and the reference (e'_w, e'_l), the scores
are s = -0.5 * e and the log-ratios r = s - s_ref, so

    loss = -log sigmoid(-0.5 * beta * ((e_w - e_l) - (e'_w - e'_l)))

for the default objective; any `mmalign.objectives` kind applies to (r_w, r_l) (`--loss`). The target follows
the scheduler (eps, v, or the flow velocity eps - x0). A method supplies its step (how x_t, t and the target
are made, e.g. by DDIM inversion) and its data; `train` does the rest (see `base` for the set-up).

Logged per step: loss, implicit_acc (share of pairs with beta*(r_w - r_l) > 0, ties count 1/2),
reward_margin (beta*(r_w - r_l)), chosen_reward, rejected_reward, model_mse, ref_mse, model_diff
(e_w - e_l), ref_diff, lr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from mmalign.config import option
from mmalign.data import ALLOW_OUTSIDE_PATHS, DataError, read_once
from mmalign.objectives import PAIRWISE_KINDS, preference_loss, preference_metrics
from mmalign.plots import plot_metrics
from mmalign.reference import Stateful
from mmalign.stream import Stream, StreamOptions
from mmalign.trainer import Trainer

from .base import (
    CAPTIONS_SCANNED,
    DenoiserConfig,
    Parts,
    ReferenceFactory,
    first_prompts,
    given_grid_prompts,
    held_out_evaluation,
    prepare,
    read_held_out,
    sample_grid,
    save_result,
)
from .data import CachedLatents, PreferencePairs, collate_pairs
from .flow import flow_noising
from .latents import encode, to_latents
from .models import denoiser_of
from .scoring import Condition, denoising_error, encode_prompts, is_flow, training_target

LossKind = Literal[PAIRWISE_KINDS]  # type: ignore[valid-type]
PairParts = Parts["PairwiseConfig"]
Step = Callable[[Any, dict, torch.Generator], "tuple[torch.Tensor, dict]"]
LoserSign = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PairConfigT = TypeVar("PairConfigT", bound="PairwiseConfig")


@dataclass
class PairwiseConfig(DenoiserConfig, StreamOptions):
    """Preference pairs and the pairwise objective (plus the denoiser's and the training loop's settings)."""

    data: str = option(None, "Pick-a-Pic style preference data: .parquet/.jsonl file, folder, or hub id")
    split: str = option("train", "split to read from a dataset folder or hub id")
    allow_outside_paths: bool = option(False, ALLOW_OUTSIDE_PATHS)
    beta: float = option(5000.0, "KL strength in the -0.5*beta form (paper: 5000 for SD 1.5 and SDXL)")
    loss: LossKind = option("sigmoid", "preference objective applied to the -0.5*error scores")
    label_smoothing: float = option(0.0, "label smoothing for the robust/conservative/exo_pair objectives")
    prompt_dropout: float = option(0.2, "share of prompts replaced by the empty prompt")
    random_flip: bool = option(False, "flip each pair horizontally at random (off: flips change layouts)")
    timestep_sampling: Literal["uniform", "logit_normal"] = option(
        "uniform", "flow models: how the training sigma is drawn (SD3 uses logit_normal)")
    learning_rate: float = option(1e-5, "peak learning rate (diffusers' LoRA rank-8 default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ValueError("--data (Pick-a-Pic style preference pairs) is required")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.streaming and getattr(self, "cache_latents", False):
            raise ValueError("--cache-latents reads every pair before training, --streaming reads them as training "
                             "goes: use one or the other")


def dpo_loss(model_err: torch.Tensor, ref_err: torch.Tensor, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0, loser_sign: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [B] and metrics from errors [2B] ordered [w; l]: scores s = -0.5*e, log-ratio s - s_ref.

    `loser_sign` (+1/-1 per pair, SePPO's flipper) multiplies the loser's log-ratio: -1 turns the loser into a
    second winner."""
    model_w, model_l = model_err.chunk(2)
    ref_w, ref_l = ref_err.detach().chunk(2)
    chosen, rejected = -0.5 * (model_w - ref_w), -0.5 * (model_l - ref_l)
    if loser_sign is not None:
        rejected = loser_sign * rejected
    losses = preference_loss(chosen, rejected, kind=kind, beta=beta, label_smoothing=label_smoothing)
    metrics = {
        **preference_metrics(chosen, rejected, beta),
        "model_mse": model_err.detach().mean(), "ref_mse": ref_err.detach().mean(),
        "model_diff": (model_w - model_l).detach().mean(), "ref_diff": (ref_w - ref_l).mean(),
    }
    if loser_sign is not None:
        metrics["flip_rate"] = (loser_sign < 0).float().mean()
    return losses, metrics


def random_flip(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each example of [B,...] (a pair, an image, all frames of a video) flipped horizontally with probability 1/2."""
    flip = torch.rand(pixels.shape[0], generator=generator, device=pixels.device) < 0.5
    return torch.where(flip.view(-1, *[1] * (pixels.dim() - 1)), pixels.flip(-1), pixels)


def encode_pairs(vae, pixels: torch.Tensor, dtype: torch.dtype, flip_generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`latents.encode` of pairs [B,2,...] as [2B,...] ordered [w; l]; a flip generator flips each pair at random
    first (`random_flip`)."""
    if flip_generator is not None:
        pixels = random_flip(pixels, flip_generator)
    return encode(vae, torch.cat([pixels[:, 0], pixels[:, 1]]), dtype)


def cache_pair_latents(vae, pairs: PreferencePairs, dtype: torch.dtype, device, batch_size: int = 32,
                       bad_rows: str = "error", workers: int = 0) -> CachedLatents:
    """Encode every pair once: the dataset of posterior statistics the step samples latents from. A pair that cannot
    be loaded stops the run naming it (`bad_rows` 'error'), or is left out and raises its `BadRow` again when training
    meets it ('skip'), as an uncached pair would."""
    positions, means, stds, bad = [], [], [], []
    for batch, found in read_once(pairs, collate_pairs, batch_size, workers, "caching latents", bad_rows == "error"):
        bad += found
        if batch is not None:
            mean, std = encode_pairs(vae, batch["pixel_values"].to(device), dtype)
            positions.append(torch.as_tensor(np.searchsorted(pairs.rows, batch["index"].numpy())))
            means.append(torch.stack(mean.chunk(2), dim=1).cpu())
            stds.append(torch.stack(std.chunk(2), dim=1).cpu())
    if not means:
        raise DataError(f"{pairs.source}: none of its {len(pairs)} pairs can be loaded; the first: {bad[0]}")
    if bad:
        print(f"{pairs.source}: {len(bad)} pair(s) cannot be loaded; training skips them (--bad-rows skip) and lists "
              "them in bad_rows.jsonl", file=sys.stderr)
    return CachedLatents(pairs, torch.cat(positions), torch.cat(means), torch.cat(stds), bad)


def pair_latents(batch: dict[str, Any], generator: torch.Generator, parts: PairParts) -> torch.Tensor:
    """Training latents of the batch's pairs, [2B,...] ordered [w; l], from cached or freshly encoded posteriors."""
    if "latent_mean" in batch:
        mean, std = (torch.cat([x[:, 0], x[:, 1]]) for x in (batch["latent_mean"], batch["latent_std"]))
    else:
        mean, std = encode_pairs(parts.pipe.vae, batch["pixel_values"], parts.vae_dtype,
                                 generator if parts.config.random_flip else None)
    return to_latents(mean, std, generator, parts.pipe.vae)


def pair_condition(batch: dict[str, Any], generator: torch.Generator, parts: PairParts, device) -> Condition:
    """Text conditioning for [w; l], with `prompt_dropout` of the pairs' prompts replaced by the empty prompt."""
    dropped = torch.rand(len(batch["caption"]), generator=generator, device=device) < parts.config.prompt_dropout
    prompts = ["" if d else p for d, p in zip(dropped.tolist(), batch["caption"])]
    return encode_prompts(parts.pipe, prompts, parts.resolution, device, parts.config.distilled_guidance).repeat(2)


def pair_noising(scheduler, latents: torch.Tensor, generator: torch.Generator, sampling: str = "uniform"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, timesteps, target) for pairs [2B] ordered [w; l]: each pair shares one noise and one timestep."""
    if is_flow(scheduler):
        return flow_noising(scheduler, latents, generator, sampling)
    n, device = latents.shape[0] // 2, latents.device
    noise = torch.randn(latents[:n].shape, generator=generator, device=device, dtype=latents.dtype)
    noise = noise.repeat(2, *[1] * (latents.dim() - 1))
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device=device)
    timesteps = timesteps.repeat(2)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return noisy, timesteps, training_target(scheduler, latents, noise, timesteps)


def pair_loss(model, batch: dict[str, Any], noisy: torch.Tensor, timesteps: torch.Tensor, condition: Condition,
              target: torch.Tensor, parts: PairParts, loser_sign: LoserSign | None = None
              ) -> tuple[torch.Tensor, dict]:
    """The preference loss at given noisy latents: one policy forward with gradients, one reference forward without.
    `loser_sign(model_err, ref_err)` optionally gives each pair's loser sign (see `dpo_loss`)."""
    if parts.config.channels_last and noisy.dim() == 4:
        noisy = noisy.contiguous(memory_format=torch.channels_last)

    def errors(m, _batch):
        return denoising_error(m, noisy, timesteps, condition, target)

    c = parts.config
    model_err, ref_err = errors(model, batch), parts.reference.scores(errors, model, batch)
    sign = loser_sign(model_err.detach(), ref_err) if loser_sign is not None else None
    losses, metrics = dpo_loss(model_err, ref_err, beta=c.beta, kind=c.loss, label_smoothing=c.label_smoothing,
                               loser_sign=sign)
    return losses.mean(), metrics


def train(config: PairConfigT, make_step: Callable[[Parts[PairConfigT]], Step], title: str,
          pairs_class: Callable[..., PreferencePairs] = PreferencePairs,
          reference_factory: ReferenceFactory | None = None, cache_latents: bool = False,
          curves: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """Train with the step `make_step(parts)` on `pairs_class(config.data, ...)` (its posteriors cached first with
    `cache_latents`; the reference of `reference_factory`, see `base.prepare`), then write the LoRA (or full
    pipeline), grids and curves."""
    trainer = Trainer(config)
    given = given_grid_prompts(config)
    held_out = read_held_out(config, trainer.device)
    pipe, parts = prepare(config, trainer, reference_factory)
    step = make_step(parts)
    pairs = pairs_class(config.data, resolution=parts.resolution, split=config.split,
                        allow_outside_paths=config.allow_outside_paths, streaming=config.streaming,
                        shuffle_buffer=config.shuffle_buffer)
    dataset: Dataset | Stream
    if config.streaming:
        trainer.accelerator.print(f"streaming preference pairs from {config.data} (ties dropped)")
        prompts = given or first_prompts([r["caption"] for r in pairs.stream.first(CAPTIONS_SCANNED)])
        dataset = pairs.stream
    else:
        trainer.accelerator.print(f"{len(pairs)} preference pairs from {config.data} ({pairs.ties} ties dropped)")
        prompts = given or first_prompts(pairs.captions(CAPTIONS_SCANNED))
        dataset = cache_pair_latents(pipe.vae, pairs, parts.vae_dtype, trainer.device, bad_rows=config.bad_rows,
                                     workers=config.num_workers) if cache_latents else pairs
    trainer.begin()  # everything is checked: the run folder is created here, before the first grid is written
    if trainer.resume_from is None:
        sample_grid(trainer, parts, prompts, "samples_before.png")
    stateful = (parts.reference,) if isinstance(parts.reference, Stateful) else ()
    history = trainer.fit(denoiser_of(pipe), dataset, collate_pairs, step, stateful=stateful,
                          save_model=lambda model, output: save_result(parts, model, output),
                          finish=lambda: sample_grid(trainer, parts, prompts, "samples_after.png", config.max_steps),
                          evaluation=held_out_evaluation(parts, held_out))
    if trainer.is_main:
        plot_metrics(history, ["loss", "implicit_acc", "reward_margin", "model_mse", *curves, "lr"],
                     config.output / "curves.png", title=title)
    return history
