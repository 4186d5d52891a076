"""What every diffusion method shares: the denoiser it fine-tunes and how it is set up, shown and saved.

A method's Config extends `DenoiserConfig` (the model, LoRA or full fine-tune, the reference, memory and speed
options, the before/after grids). Its run:

    trainer = Trainer(config)
    held_out = read_held_out(config, trainer.device)  # --eval-prompts and --eval-reward, checked
    pipe, parts = prepare(config, trainer)         # frozen parts placed and cast, LoRA attached, reference built
    ...                                            # the method's data, checked
    trainer.begin()                                # the run folder is written from here on
    sample_grid(trainer, parts, prompts, "samples_before.png")
    trainer.fit(denoiser_of(pipe), data, collate, step, save_model=lambda m, out: save_result(parts, m, out),
                finish=lambda: sample_grid(trainer, parts, prompts, "samples_after.png", config.max_steps),
                evaluation=held_out_evaluation(parts, held_out))

What a method needs of the model is stated on its Config class: `schedule` ("flow" or "diffusion" when it
works with one kind only) and `video` (a text-to-video pipeline instead of an image one; None: either).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch

from mmalign.config import option
from mmalign.errors import ConfigError, DataError
from mmalign.heldout import Evaluation
from mmalign.reference import AdapterDisabled, FrozenCopy, Reference
from mmalign.sharding import runs_collective
from mmalign.stats import mean_ci
from mmalign.trainer import TrainConfig, Trainer

from .data import read_prompts
from .evaluate import RewardFn, checked_rewards, fixed_seed_samples, reward_on_device
from .flux import DISTILLED_GUIDANCE
from .models import (
    LORA_TARGETS,
    VIDEO_PIPELINES,
    add_lora,
    denoiser_of,
    enable_xformers,
    load_pipeline,
    save_full,
    save_lora,
)
from .sample import generate, image_grid
from .scoring import PREDICTION_TYPES, is_flow, sampler_default

FROZEN_PARTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
GRID_PROMPTS = 4  # prompts in the before/after grids when no --sample-prompts file is given
CAPTIONS_SCANNED = 10_000  # training captions `first_prompts` looks through for GRID_PROMPTS distinct ones


@dataclass
class DenoiserConfig(TrainConfig):
    """The denoiser being fine-tuned and how (plus the training loop's settings)."""

    schedule: ClassVar[Literal["flow", "diffusion"] | None] = None  # the one kind of model a method trains, if any
    video: ClassVar[bool | None] = False  # a text-to-video pipeline (frames) instead of an image one (None: either)
    # why the step cannot run on a sharded model (every process must run every forward of it), if it cannot
    unsharded_because: ClassVar[str | None] = None

    model: str = option(None, "diffusers pipeline folder, hub id, or single-file checkpoint")
    lora_rank: int = option(8, "LoRA rank of the denoiser's attention projections")
    lora_alpha: int | None = option(None, "LoRA alpha (default: the rank)")
    lora_targets: list[str] = option(list(LORA_TARGETS), "module names the LoRA adapts (diffusers' default: "
                                     "attention projections; add conv1 conv2 to adapt the ResNet convolutions)")
    full: bool = option(False, "fine-tune the whole denoiser against a frozen copy instead of a LoRA")
    resolution: int | None = option(None, "training resolution (default: the model's native size)")
    reference_in_training_dtype: bool = option(True, "--full: keep the frozen reference in the mixed-precision dtype")
    offload_reference: bool = option(False, "--full: keep the frozen reference on the CPU, streamed per forward")
    channels_last: bool = option(True, "channels-last memory format for the UNet (faster convolutions; not under FSDP "
                                       "or ZeRO, which shard contiguous parameters only)")
    gradient_checkpointing: bool = option(False, "trade compute for memory in the denoiser")
    compile: bool = option(False, "torch.compile the policy denoiser in place (inductor): a slower start "
                                  "(minutes on a CPU), faster steps")
    xformers: bool = option(False, "xformers attention (GPU and the [gpu] extra); default PyTorch SDPA")
    sample_prompts: str | None = option(None, "text file of prompts for the before/after grids (default: the "
                                              "first prompts of the training data)")
    num_samples: int = option(4, "images per prompt in the before/after grids (0: no grids)")
    sample_steps: int = option(25, "sampler steps for the grids")
    guidance_scale: float = option(5.0, "classifier-free guidance for the grids")
    distilled_guidance: float = option(DISTILLED_GUIDANCE, "guidance-distilled models (FLUX.1-dev): the value of "
                                       "their guidance embedding in training and in every sample, in place of "
                                       "--guidance-scale (see mmalign.diffusion.flux)")
    eval_prompts: str | None = option(None, "--eval-every: text file of held-out prompts (one a line), sampled with "
                                            "fixed seeds and scored by --eval-reward")
    eval_reward: str | RewardFn | None = option(
        None, "--eval-every: the held-out gold reward, scorers not used for training: module:function, a reward-model "
        "folder, a reward spec (pickscore:1.0,aesthetic=FILE:0.2), or from Python the callable itself; called as "
        "reward(images, prompts) -> [N], logged as eval/reward")
    eval_per_prompt: int = option(4, "--eval-every: fixed-seed samples per held-out prompt")
    eval_seed: int = option(1000, "--eval-every: seed of the first held-out sample (sample i uses seed + i)")
    eval_steps: int = option(20, "--eval-every: sampler steps of the held-out samples")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("--model (a pipeline folder, hub id or checkpoint file) is required")
        if not self.full and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1 (or pass --full), got {self.lora_rank}")
        if self.eval_every and not (self.eval_prompts and self.eval_reward):
            raise ValueError("--eval-every needs --eval-prompts (held-out prompts) and --eval-reward (their reward)")
        if (self.eval_prompts or self.eval_reward) and not self.eval_every:
            raise ValueError("--eval-prompts and --eval-reward are scored every --eval-every N steps; pass it")
        if self.eval_per_prompt < 1 or self.eval_steps < 1:
            raise ValueError(f"eval_per_prompt and eval_steps must be at least 1, got {self.eval_per_prompt} and "
                             f"{self.eval_steps}")

    def sampler_guidance(self, pipe, guidance_scale: float) -> float:
        """The pipeline's `guidance_scale` argument: `distilled_guidance` for a guidance-embedded denoiser (FLUX.1-dev),
        else the classifier-free `guidance_scale`."""
        return self.distilled_guidance if getattr(denoiser_of(pipe).config, "guidance_embeds", False) \
            else guidance_scale

    def sampling_kwargs(self) -> dict[str, Any]:
        """What the pipeline's sampler needs besides prompts, steps and guidance (a video's frame count)."""
        return {}


ConfigT = TypeVar("ConfigT", bound=DenoiserConfig)
ConfigT_co = TypeVar("ConfigT_co", bound=DenoiserConfig, covariant=True)


@dataclass(frozen=True)
class Parts(Generic[ConfigT_co]):
    """What a training step needs besides the policy denoiser."""

    pipe: Any
    noise_scheduler: Any
    reference: Reference
    config: ConfigT_co
    resolution: int
    vae_dtype: torch.dtype


ReferenceFactory = Callable[[torch.nn.Module, "torch.dtype | None"], Reference]


def place(module, device, dtype) -> None:
    """Move to the device; cast only when the dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if module.dtype != dtype:
        module.to(dtype)


def native_resolution(pipe) -> int:
    """The pixel size the denoiser was built for: its sample_size (else the pipeline's default, FLUX) x VAE scale, else
    the default height of the pipeline's sampler (Wan: 480)."""
    size = denoiser_of(pipe).config.get("sample_size") or getattr(pipe, "default_sample_size", None)
    if size is not None:
        return size * pipe.vae_scale_factor
    return sampler_default(pipe, "height")


def check_pipeline(pipe, config: DenoiserConfig) -> None:
    """Refuse a model the method cannot train: a scheduler target other than eps, v or flow matching, a diffusion
    model for a flow method (or the reverse), a video pipeline for an image method (or the reverse)."""
    flow, prediction = is_flow(pipe.scheduler), pipe.scheduler.config.get("prediction_type")
    if not flow and prediction not in PREDICTION_TYPES:
        raise ConfigError(f"--model {config.model}: its scheduler predicts {prediction!r}; training supports "
                          f"{' and '.join(PREDICTION_TYPES)} (or flow matching)")
    scheduler = type(pipe.scheduler).__name__
    if config.schedule == "flow" and not flow:
        raise ConfigError(f"--model {config.model}: its scheduler {scheduler} is not a flow-matching one; this method "
                          "needs a flow-matching pipeline (SD3-style); use `mmalign diffusion dpo` for "
                          "diffusion models")
    if config.schedule == "diffusion" and flow:
        raise ConfigError(f"--model {config.model}: its scheduler {scheduler} is a flow-matching one; this method "
                          "needs a DDPM-style diffusion pipeline; use `mmalign diffusion dpo` or `flow-dpo` for "
                          "flow-matching models")
    name = type(pipe).__name__
    if config.video is not None and (name in VIDEO_PIPELINES) != config.video:
        raise ConfigError(f"--model {config.model}: {name} is "
                          + ("a text-to-video pipeline; train it on video pairs with `mmalign diffusion video-dpo`, "
                             "or from a reward with `mmalign diffusion grpo`"
                             if name in VIDEO_PIPELINES else
                             f"an image pipeline; video-dpo trains text-to-video pipelines "
                             f"({', '.join(VIDEO_PIPELINES)})"))


def training_scheduler(pipe):
    """The scheduler that noises training latents: the pipeline's own FlowMatch one; for a sampler on flow sigmas
    (Wan's UniPC) FlowMatchEuler at its `flow_shift`: the same shifted sigmas, the timestep sigma * 1000 (the sampler
    rounds it down to an integer; training keeps it exact); else DDPM on its config."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    scheduler = pipe.scheduler
    if scheduler.config.get("prediction_type") == "flow_prediction":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=scheduler.config.num_train_timesteps,
                                               shift=scheduler.config.flow_shift)
    return type(scheduler).from_config(scheduler.config) if is_flow(scheduler) else \
        DDPMScheduler.from_config(scheduler.config)


def prepare(config: ConfigT, trainer: Trainer, reference_factory: ReferenceFactory | None = None
            ) -> tuple[Any, Parts[ConfigT]]:
    """Load and check the pipeline, freeze and cast its other parts, make its denoiser trainable (a LoRA, or every
    weight with --full) and build the reference: the adapter switched off (LoRA), a frozen copy (--full), or
    `reference_factory(denoiser, dtype)`."""
    if trainer.sharding and config.unsharded_because:
        raise ConfigError(f"this method cannot train under {trainer.sharding}: {config.unsharded_because}; launch it "
                          "with DDP (mmalign/accelerate_configs/ddp.yaml)")
    pipe = load_pipeline(config.model)
    check_pipeline(pipe, config)
    pipe.set_progress_bar_config(disable=True)
    dtype, device = trainer.weight_dtype, trainer.device
    for name in FROZEN_PARTS:
        part = getattr(pipe, name, None)
        if part is not None:
            place(part.requires_grad_(False), device, dtype)
    model = denoiser_of(pipe)
    place(model, device, torch.float32 if config.full else dtype)
    if config.channels_last and type(model).__name__ == "UNet2DConditionModel" and not trainer.sharding:
        model.to(memory_format=torch.channels_last)
    if config.xformers:
        enable_xformers(model)
    if config.full:
        model.requires_grad_(True)
    else:
        add_lora(model, config.lora_rank, config.lora_alpha, tuple(config.lora_targets))
    reference_dtype = dtype if config.reference_in_training_dtype else None
    reference: Reference
    if trainer.sharding and reference_factory is not None:
        raise ConfigError(f"this method's reference (SePPO's snapshots) loads whole copies of the trained weights, "
                          f"which a sharded launch ({trainer.sharding}) spreads across the processes; launch it with "
                          "DDP (mmalign/accelerate_configs/ddp.yaml)")
    if runs_collective(trainer.sharding) and config.offload_reference:  # ZeRO-1/2 keep it whole, as DDP
        raise ConfigError(f"--offload-reference: under {trainer.sharding} the frozen reference is sharded across the "
                          "processes like the policy instead; drop --offload-reference (or offload both with "
                          "fsdp_offload_params: true, or ZeRO-3's offload_param_device: cpu, in the accelerate "
                          "config)")
    if reference_factory is not None:
        reference = reference_factory(model, reference_dtype)
    elif config.full:
        reference = FrozenCopy(model, dtype=reference_dtype, offload=config.offload_reference, device=device,
                               shard=trainer.shard_frozen)
    else:
        reference = AdapterDisabled()
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if config.compile:
        model.compile()
    resolution = config.resolution or native_resolution(pipe)
    return pipe, Parts(pipe, training_scheduler(pipe), reference, config, resolution, vae_dtype=dtype)


HeldOutReward = tuple[list[str], RewardFn]


def read_held_out(config: DenoiserConfig, device: torch.device) -> HeldOutReward | None:
    """With --eval-every, the --eval-prompts and the --eval-reward callable on `device`, read and checked before the
    model loads; else None."""
    if not config.eval_every or config.eval_prompts is None or config.eval_reward is None:
        return None
    try:
        prompts = read_prompts(config.eval_prompts)
    except DataError as err:
        raise DataError(f"--eval-prompts: {err}") from None
    if len(prompts) * config.eval_per_prompt < 2:
        raise ConfigError(f"--eval-prompts {config.eval_prompts}: 1 prompt x --eval-per-prompt 1 is one sample; a "
                          "confidence interval needs at least 2")
    return prompts, reward_on_device(config.eval_reward, device, where="--eval-reward")


def held_out_evaluation(parts: Parts, held_out: HeldOutReward | None) -> Evaluation | None:
    """The trainer's evaluation: the current denoiser's fixed-seed samples of the held-out prompts (sample i seeded
    eval_seed + i) scored by the gold reward: eval/reward = mean r with its 95% CI (eval/reward_ci_low, _high)."""
    if held_out is None:
        return None
    prompts, reward_fn = held_out
    config = parts.config

    def run(_model: torch.nn.Module) -> dict[str, float]:
        expanded, images = fixed_seed_samples(
            parts.pipe, prompts, config.eval_per_prompt, config.eval_seed, config.eval_steps,
            config.sampler_guidance(parts.pipe, config.guidance_scale), height=parts.resolution,
            width=parts.resolution, **config.sampling_kwargs())
        device = denoiser_of(parts.pipe).device
        summary = mean_ci(checked_rewards(reward_fn, images.to(device), expanded, config.eval_reward, "--eval-reward"))
        return {"reward": summary["mean"], "reward_ci_low": summary["ci_low"], "reward_ci_high": summary["ci_high"]}

    return Evaluation(run, "reward")


def given_grid_prompts(config: DenoiserConfig) -> list[str] | None:
    """The --sample-prompts file, read and checked (a method reads it before anything slower), or None."""
    return read_prompts(config.sample_prompts) if config.sample_prompts else None


def first_prompts(candidates: Iterable[str]) -> list[str]:
    """The grids' default prompts: the first GRID_PROMPTS distinct `candidates` (training prompts)."""
    distinct: list[str] = []
    for prompt in candidates:
        if prompt not in distinct:
            distinct.append(prompt)
        if len(distinct) == GRID_PROMPTS:
            break
    return distinct


def sample_grid(trainer: Trainer, parts: Parts, prompts: list[str], name: str, step: int = 0) -> None:
    """Fixed-seed samples of the current denoiser, `num_samples` per prompt (one row of frames per video), saved as
    config.output/name and shown in the run's tracker at `step` by the main process."""
    config = parts.config
    if config.num_samples < 1 or not trainer.runs_model:
        return
    expanded = [p for p in prompts for _ in range(config.num_samples)]
    with trainer.autocast():
        images = generate(parts.pipe, expanded, seed=config.seed, steps=config.sample_steps,
                          guidance_scale=config.sampler_guidance(parts.pipe, config.guidance_scale),
                          height=parts.resolution, width=parts.resolution, **config.sampling_kwargs())
    columns = config.num_samples
    if images.dim() == 5:  # videos [N,F,3,H,W]: one row of frames per video
        columns, images = images.shape[1], images.flatten(0, 1)
    if not trainer.is_main:
        return
    grid = image_grid(images, columns=columns, scale=max(1, 256 // images.shape[-1]))
    grid.save(config.output / name)
    trainer.log_image(Path(name).stem, grid, step)


def save_result(parts: Parts, model, output: Path) -> None:
    """The trained denoiser: its LoRA in the family's format, or with --full the whole pipeline."""
    if parts.config.full:
        save_full(parts.config.model, model, output)
    else:
        save_lora(parts.pipe, model, output)
