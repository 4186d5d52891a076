"""Diffusion-DPO (Wallace et al. 2023): preference fine-tuning of a Stable Diffusion (1.x, 2.x, XL, 3) denoiser.

Winner w and loser l share ONE noise eps and ONE timestep t. With per-sample denoising errors
e = mean_(C,H,W) (model(x_t, t, c) - target)^2 of the policy (e_w, e_l) and the reference (e'_w, e'_l):

    loss = -log sigmoid(-0.5 * beta * ((e_w - e_l) - (e'_w - e'_l)))

This is the core DPO objective with the score s(x) = -0.5 * e(x) (the constant T of the paper's
bound is absorbed into beta), so any `mmalign.objectives` kind applies (`--loss`). beta = 5000 is
the paper's value for SD 1.5 and SDXL in this -0.5*beta form; diffusers' example script writes
-beta * (...) with beta = 2500, the same objective. One concatenated policy forward over [w; l] with
gradients, one no-grad reference forward per step: the denoiser with its LoRA disabled (no second
copy) or, with --full, a frozen copy. The target follows the scheduler (eps, v, or the flow velocity
eps - x0 for SD3-style flow models, see `flow`). 20% of prompts are replaced by "" (the paper's default), which
keeps the unconditional branch used by classifier-free guidance aligned too.

Logged per step: loss, implicit_acc (share of pairs with beta*(r_w - r_l) > 0, ties count 1/2),
model_mse, ref_mse, model_diff (e_w - e_l), ref_diff, reward_margin (beta*(r_w - r_l)), lr.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from mmalign.config import option
from mmalign.errors import ConfigError
from mmalign.objectives import PAIRWISE_KINDS, preference_loss
from mmalign.plots import plot_metrics
from mmalign.reference import AdapterDisabled, FrozenCopy
from mmalign.trainer import TrainConfig, Trainer

from .data import CachedLatents, PreferencePairs, collate_pairs, read_prompts
from .flow import flow_noising
from .models import (LORA_TARGETS, VIDEO_PIPELINES, add_lora, denoiser_of, enable_xformers, load_pipeline,
                     save_full, save_lora)
from .sample import generate, image_grid
from .scoring import PREDICTION_TYPES, Condition, denoising_error, encode_prompts, is_flow, training_target

LossKind = Literal[PAIRWISE_KINDS]  # type: ignore[valid-type]


@dataclass
class Config(TrainConfig):
    """Diffusion-DPO settings (plus the shared training-loop settings)."""

    model: str = option(None, "diffusers SD/SDXL/SD3 folder, hub id, or single-file checkpoint")
    data: str = option(None, "Pick-a-Pic style preference data: .parquet/.jsonl file, folder, or hub id")
    split: str = option("train", "split to read from a dataset folder or hub id")
    allow_outside_paths: bool = option(False, "let data files name images/videos by absolute paths or paths outside "
                                              "their folder")
    lora_rank: int = option(8, "LoRA rank of the denoiser's attention projections")
    lora_alpha: int | None = option(None, "LoRA alpha (default: the rank)")
    lora_targets: list[str] = option(list(LORA_TARGETS), "module names the LoRA adapts (diffusers' default: "
                                     "attention projections; add conv1 conv2 to adapt the ResNet convolutions)")
    full: bool = option(False, "fine-tune the whole denoiser against a frozen copy instead of a LoRA")
    beta: float = option(5000.0, "KL strength in the -0.5*beta form (paper: 5000 for SD 1.5 and SDXL)")
    loss: LossKind = option("sigmoid", "preference objective applied to the -0.5*error scores")
    label_smoothing: float = option(0.0, "label smoothing for the robust/conservative/exo_pair objectives")
    prompt_dropout: float = option(0.2, "share of prompts replaced by the empty prompt")
    resolution: int | None = option(None, "training resolution (default: the model's native size)")
    random_flip: bool = option(False, "flip each pair horizontally at random (off: flips change layouts)")
    timestep_sampling: Literal["uniform", "logit_normal"] = option(
        "uniform", "flow models: how the training sigma is drawn (SD3 uses logit_normal)")
    reference_in_training_dtype: bool = option(True, "--full: keep the frozen reference in the mixed-precision dtype")
    offload_reference: bool = option(False, "--full: keep the frozen reference on the CPU, streamed per forward")
    cache_latents: bool = option(False, "encode every image once before training and reuse its VAE posterior "
                                        "(saves the VAE each step; costs RAM: small datasets, many epochs)")
    channels_last: bool = option(True, "channels-last memory format for the UNet (faster convolutions)")
    gradient_checkpointing: bool = option(False, "trade compute for memory in the denoiser")
    compile: bool = option(False, "torch.compile the policy denoiser in place (inductor): a slower start "
                                  "(minutes on a CPU), faster steps")
    xformers: bool = option(False, "xformers attention (GPU and the [gpu] extra); default PyTorch SDPA")
    sample_prompts: str | None = option(None, "text file of prompts for the before/after grids (default: from data)")
    num_samples: int = option(4, "images per prompt in the before/after grids (0: no grids)")
    sample_steps: int = option(25, "sampler steps for the grids")
    guidance_scale: float = option(5.0, "classifier-free guidance for the grids")
    learning_rate: float = option(1e-5, "peak learning rate (diffusers' LoRA rank-8 default)")
    warmup_steps: int = option(0, "linear warm-up steps")
    checkpoint_every: int = option(500, "checkpoint every N optimizer steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("--model (a pipeline folder, hub id or checkpoint file) is required")
        if not self.data:
            raise ValueError("--data (Pick-a-Pic style preference pairs) is required")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if not self.full and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1 (or pass --full), got {self.lora_rank}")
        if self.cache_latents and self.random_flip:
            raise ValueError("cache_latents and random_flip exclude each other: a flip must happen before encoding")


@dataclass
class Parts:
    """What the step needs besides the policy denoiser."""

    pipe: Any
    noise_scheduler: Any
    reference: Any
    config: Config
    resolution: int
    vae_dtype: torch.dtype


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
    inside = beta * (chosen - rejected).detach()
    metrics = {
        "implicit_acc": ((inside > 0).float() + 0.5 * (inside == 0).float()).mean(),
        "model_mse": model_err.detach().mean(), "ref_mse": ref_err.detach().mean(),
        "model_diff": (model_w - model_l).detach().mean(), "ref_diff": (ref_w - ref_l).mean(),
        "reward_margin": inside.mean(),
    }
    if loser_sign is not None:
        metrics["flip_rate"] = (loser_sign < 0).float().mean()
    return losses, metrics


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std: images [N,3,R,R] -> [N,C,h,w]; videos [N,F,3,R,R] -> [N,C,F,h,w], frame by frame."""
    posterior = vae.encode(pixels.flatten(0, pixels.dim() - 4).to(dtype)).latent_dist
    if pixels.dim() == 4:
        return posterior.mean, posterior.std
    frames = pixels.shape[1]
    return tuple(x.unflatten(0, (-1, frames)).transpose(1, 2) for x in (posterior.mean, posterior.std))


def encode_pairs(vae, pixels: torch.Tensor, dtype: torch.dtype, flip_generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode` of pairs [B,2,...] as [2B,...] ordered [w; l]; a flip generator flips each pair (all its frames)
    horizontally at random first."""
    if flip_generator is not None:
        flip = torch.rand(pixels.shape[0], generator=flip_generator, device=pixels.device) < 0.5
        pixels = torch.where(flip.view(-1, *[1] * (pixels.dim() - 1)), pixels.flip(-1), pixels)
    return encode(vae, torch.cat([pixels[:, 0], pixels[:, 1]]), dtype)


def cache_pair_latents(vae, pairs: PreferencePairs, dtype: torch.dtype, device, batch_size: int = 32) -> CachedLatents:
    """Encode every pair once: the dataset of posterior statistics the step samples latents from."""
    means, stds = [], []
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size, collate_fn=collate_pairs)
    for batch in tqdm(loader, desc="cache latents", leave=False):
        mean, std = encode_pairs(vae, batch["pixel_values"].to(device), dtype)
        means.append(torch.stack(mean.chunk(2), dim=1).cpu())
        stds.append(torch.stack(std.chunk(2), dim=1).cpu())
    return CachedLatents(pairs, torch.cat(means), torch.cat(stds))


def to_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, parts: Parts) -> torch.Tensor:
    """Training latents x0 = (z - shift) * scale with z drawn from the VAE posterior N(mean, std^2)."""
    z = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (z - vae_shift(parts.pipe.vae)) * parts.pipe.vae.config.scaling_factor


def from_latents(x0: torch.Tensor, vae) -> torch.Tensor:
    """Images in [0, 1] from training latents: decode(z) with z = x0 / scale + shift (the inverse of `to_latents`)."""
    z = x0 / vae.config.scaling_factor + vae_shift(vae)
    return (vae.decode(z.to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)


def vae_shift(vae) -> float:
    """The VAE's latent shift (SD3's shift_factor; 0 where it has none)."""
    return getattr(vae.config, "shift_factor", None) or 0.0


def pair_latents(batch: dict[str, Any], generator: torch.Generator, parts: Parts) -> torch.Tensor:
    """Training latents of the batch's pairs, [2B,...] ordered [w; l], from cached or freshly encoded posteriors."""
    if "latent_mean" in batch:
        mean, std = (torch.cat([x[:, 0], x[:, 1]]) for x in (batch["latent_mean"], batch["latent_std"]))
    else:
        mean, std = encode_pairs(parts.pipe.vae, batch["pixel_values"], parts.vae_dtype,
                                 generator if parts.config.random_flip else None)
    return to_latents(mean, std, generator, parts)


def pair_condition(batch: dict[str, Any], generator: torch.Generator, parts: Parts, device) -> Condition:
    """Text conditioning for [w; l], with `prompt_dropout` of the pairs' prompts replaced by the empty prompt."""
    dropped = torch.rand(len(batch["caption"]), generator=generator, device=device) < parts.config.prompt_dropout
    prompts = ["" if d else p for d, p in zip(dropped.tolist(), batch["caption"])]
    return encode_prompts(parts.pipe, prompts, parts.resolution, device).repeat(2)


def pair_loss(model, batch: dict[str, Any], noisy: torch.Tensor, timesteps: torch.Tensor, condition: Condition,
              target: torch.Tensor, parts: Parts, loser_sign: Callable | None = None) -> tuple[torch.Tensor, dict]:
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


def dpo_step(model, batch: dict[str, Any], generator: torch.Generator, parts: Parts) -> tuple[torch.Tensor, dict]:
    """One Diffusion-DPO micro-step: winner and loser share one noise and one timestep per pair."""
    latents = pair_latents(batch, generator, parts)
    noisy, timesteps, target = pair_noising(parts.noise_scheduler, latents, generator, parts.config.timestep_sampling)
    condition = pair_condition(batch, generator, parts, latents.device)
    return pair_loss(model, batch, noisy, timesteps, condition, target, parts)


def native_resolution(pipe) -> int:
    """The pixel size the denoiser was built for: sample_size x VAE scale factor."""
    return denoiser_of(pipe).config.sample_size * pipe.vae_scale_factor


def _sample_grid(trainer: Trainer, pipe, prompts: list[str], config: Config, name: str) -> None:
    if config.num_samples < 1 or not trainer.is_main:
        return
    expanded = [p for p in prompts for _ in range(config.num_samples)]
    frames = {"num_frames": config.num_frames} if hasattr(config, "num_frames") else {}
    with trainer.accelerator.autocast():
        images = generate(pipe, expanded, seed=config.seed, steps=config.sample_steps,
                          guidance_scale=config.guidance_scale, **frames)
    columns = config.num_samples
    if images.dim() == 5:  # videos [N,F,3,H,W]: one row of frames per video
        columns, images = images.shape[1], images.flatten(0, 1)
    image_grid(images, columns=columns, scale=max(1, 256 // images.shape[-1])).save(config.output / name)


def _place(module, device, dtype) -> None:
    """Move to the device; cast only when the dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if module.dtype != dtype:
        module.to(dtype)


def check_pipeline(pipe, config: Config) -> None:
    """Refuse a model this command cannot train: a scheduler target other than eps, v or flow matching, or a video
    pipeline given to an image command (or the reverse; video configs have `num_frames`)."""
    prediction = pipe.scheduler.config.get("prediction_type")
    if not is_flow(pipe.scheduler) and prediction not in PREDICTION_TYPES:
        raise ConfigError(f"--model {config.model}: its scheduler predicts {prediction!r}; training supports "
                          f"{' and '.join(PREDICTION_TYPES)} (or flow matching)")
    name = type(pipe).__name__
    if name in VIDEO_PIPELINES and not hasattr(config, "num_frames"):
        raise ConfigError(f"--model {config.model}: {name} is a text-to-video pipeline; train it on video pairs "
                          "with `mmalign diffusion video-dpo`")
    if name not in VIDEO_PIPELINES and hasattr(config, "num_frames"):
        raise ConfigError(f"--model {config.model}: {name} is an image pipeline; video-dpo trains text-to-video "
                          f"pipelines ({', '.join(VIDEO_PIPELINES)})")


def prepare(config: Config, trainer: Trainer, reference_factory: Callable | None = None) -> tuple[Any, Parts]:
    """Load the pipeline, freeze and cast its parts, attach the LoRA and the reference (a frozen copy for --full, the
    adapter switched off for LoRA, or `reference_factory(denoiser)`) to its denoiser."""
    from diffusers import DDPMScheduler

    pipe = load_pipeline(config.model)
    check_pipeline(pipe, config)
    pipe.set_progress_bar_config(disable=True)
    resolution = config.resolution or native_resolution(pipe)
    dtype, device = trainer.weight_dtype, trainer.device
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        part = getattr(pipe, name, None)
        if part is not None:
            _place(part.requires_grad_(False), device, dtype)
    model = denoiser_of(pipe)
    _place(model, device, torch.float32 if config.full else dtype)
    if config.channels_last and type(model).__name__ == "UNet2DConditionModel":
        model.to(memory_format=torch.channels_last)
    if config.xformers:
        enable_xformers(model)
    if config.full:
        model.requires_grad_(True)
    else:
        add_lora(model, config.lora_rank, config.lora_alpha, tuple(config.lora_targets))
    reference_dtype = dtype if config.reference_in_training_dtype else None
    if reference_factory is not None:
        reference = reference_factory(model, reference_dtype)
    elif config.full:
        reference = FrozenCopy(model, dtype=reference_dtype, offload=config.offload_reference, device=device)
    else:
        reference = AdapterDisabled()
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if config.compile:
        model.compile()
    scheduler = pipe.scheduler
    noise_scheduler = type(scheduler).from_config(scheduler.config) if is_flow(scheduler) else \
        DDPMScheduler.from_config(scheduler.config)
    return pipe, Parts(pipe, noise_scheduler, reference, config, resolution, vae_dtype=dtype)


StepFactory = Callable[[Parts], Callable[[Any, dict, torch.Generator], "tuple[torch.Tensor, dict]"]]


def train(config: Config, make_step: StepFactory, title: str, pairs_class=PreferencePairs,
          reference_factory: Callable | None = None, curves: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """Train with the step `make_step(parts)` on `pairs_class(config.data, resolution, split)` (and the reference of
    `reference_factory`, see `prepare`), then write the LoRA (or full pipeline), grids and curves."""
    trainer = Trainer(config)
    chosen_prompts = read_prompts(config.sample_prompts) if config.sample_prompts else None
    pipe, parts = prepare(config, trainer, reference_factory)
    step = make_step(parts)
    pairs = pairs_class(config.data, resolution=parts.resolution, split=config.split,
                        allow_outside_paths=config.allow_outside_paths)
    trainer.accelerator.print(f"{len(pairs)} preference pairs from {config.data} ({pairs.ties} ties dropped)")
    prompts = chosen_prompts or list(dict.fromkeys(pairs.caption(i) for i in range(min(len(pairs), 64))))[:4]
    dataset = cache_pair_latents(pipe.vae, pairs, parts.vae_dtype, trainer.device) if config.cache_latents else pairs
    trainer.begin()  # everything is checked: the run folder is created here, before the first grid is written
    if trainer.resume_from is None:
        _sample_grid(trainer, pipe, prompts, config, "samples_before.png")

    def save(model, output: Path) -> None:
        if config.full:
            save_full(config.model, model, output)
        else:
            save_lora(pipe, model, output)

    stateful = tuple(x for x in (parts.reference,) if hasattr(x, "state_dict"))
    history = trainer.fit(denoiser_of(pipe), dataset, collate_pairs, step, save_model=save,
                          stateful=stateful)
    _sample_grid(trainer, pipe, prompts, config, "samples_after.png")
    if trainer.is_main:
        plot_metrics(history, ["loss", "implicit_acc", "reward_margin", "model_mse", *curves, "lr"],
                     config.output / "curves.png", title=title)
    return history


def run(config: Config) -> list[dict[str, float]]:
    """`mmalign diffusion dpo`: Diffusion-DPO training into config.output."""
    return train(config, lambda parts: functools.partial(dpo_step, parts=parts), "Diffusion-DPO")
