"""DPO-family preference fine-tuning of a LLaVA-style vision-language model on TRL-compatible rows.

With sequence scores s(y | v, x) (summed completion log-probs, see `scoring`) of the policy and the
reference, the log-ratios r(y) = s_theta(y | v, x) - s_ref(y | v, x) of chosen y_w and rejected y_l go
through the core `preference_loss` of any pairwise kind (`--loss`; DPO: -log sigmoid(beta (r_w - r_l))).
Two image-conditioned terms can be added, each weighted and logged on its own:

    visual  -log sigmoid(beta * [r(y_w | v) - r(y_w | v')])     rDPO (Re-Align) with v' a retrieved image
                                                                  (`retrieved_images`), mDPO with v' the image
                                                                  corrupted by RandomResizedCrop(scale 0.01-0.2)
    anchor  -log sigmoid(beta * r(y_w | v))                       mDPO's anchor on the chosen reward

Each image is encoded once per step and shared by its rows, and each prompt runs once per pair with the
chosen and rejected completions on its key/value cache (`scoring`); when the vision tower and projector do
not train (LoRA on the language model, or --full with them frozen) the same features serve the reference
too. Reference: the adapter disabled (LoRA), a frozen copy (--full), or scores precomputed once per row
(`--reference cached`, written to reference_scores.safetensors and reused on resume).

`--online-bdhs` replaces the rejected responses every step by BDHS samples of the current policy (`online`).
`--token-objective tdpo|rrpo` puts a token-level objective (`token_level`: TDPO2, RRPO) in place of `--loss`.

Logged per step: loss, dpo_loss, visual_loss, anchor_loss, implicit_acc, reward_margin, chosen_reward,
rejected_reward, logps_chosen, logps_rejected (with a token-level objective also kl_chosen), lr.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torchvision.transforms.v2 import functional as TF

from mmalign.config import option
from mmalign.data import ALLOW_OUTSIDE_PATHS, read_once
from mmalign.errors import ConfigError
from mmalign.files import write_atomically
from mmalign.objectives import PAIRWISE_KINDS, preference_loss, preference_metrics
from mmalign.plots import plot_metrics
from mmalign.reference import AdapterDisabled, CachedScores, FrozenCopy
from mmalign.stream import Stream, StreamOptions
from mmalign.trainer import TrainConfig, Trainer

from . import models, online, token_level
from .data import CHOSEN, REJECTED, VISUAL, VisionPairs, collate_pairs, stack_images
from .eval import held_out_accuracy, qa_rows
from .evaluate import PROMPT
from .scoring import image_features, rope_index, sequence_scores, token_log_probs

LossKind = Literal[PAIRWISE_KINDS]  # type: ignore[valid-type]
CACHE_FILE = "reference_scores.safetensors"


@dataclass
class Config(TrainConfig, StreamOptions):
    """Vision-language DPO settings (plus the shared training-loop settings)."""

    model: str = option(None, "transformers LLaVA-style model folder or hub id (with its processor)")
    data: str = option(None, "TRL preference rows (prompt, chosen, rejected, images): .parquet/.jsonl, folder, hub id")
    split: str = option("train", "split to read from a dataset folder or hub id")
    allow_outside_paths: bool = option(False, ALLOW_OUTSIDE_PATHS)
    max_length: int | None = option(None, "longest prompt+completion in tokens; completions are cut to fit, a prompt "
                                          "whose image tokens would be cut is an error naming the row")
    lora_rank: int = option(8, "LoRA rank of the language model's projections")
    lora_alpha: int | None = option(None, "LoRA alpha (default: the rank)")
    lora_targets: list[str] = option(list(models.LORA_TARGETS), "language-model module names the LoRA adapts")
    full: bool = option(False, "fine-tune the language model and projector against a frozen copy instead of a LoRA")
    train_vision: bool = option(False, "--full: train the vision tower and projector too (default: projector only "
                                       "frozen with the tower, so image features are shared with the reference)")
    beta: float = option(0.1, "KL strength beta")
    loss: LossKind = option("sigmoid", "pairwise preference objective (mmalign.objectives)")
    label_smoothing: float = option(0.0, "label smoothing for the robust/conservative/exo_pair objectives")
    reference: Literal["auto", "adapter", "frozen", "cached"] = option(
        "auto", "reference scores: adapter disabled (LoRA), frozen copy (--full), or precomputed once per row "
                "(auto: adapter for LoRA, frozen for --full)")
    token_objective: Literal["none", "tdpo", "rrpo"] = option(
        "none", "token-level objective in place of --loss: TDPO2 (sequence KL term) or RRPO (differing sub-sequences "
                "plus token-wise KL on the chosen response); needs a live reference (not cached)")
    token_alpha: float | None = option(None, "alpha of the token-level objective (default: TDPO 0.5, RRPO 0.01)")
    visual_term: Literal["none", "retrieved", "corrupted"] = option(
        "none", "image-conditioned term: rDPO (v' = the row's retrieved_images) or mDPO (v' = a random crop of "
                "0.01-0.2 of the area)")
    dpo_weight: float = option(1.0, "weight of the pairwise preference term (0: the image-conditioned terms only)")
    visual_weight: float = option(1.0, "weight of the visual term")
    anchor_weight: float = option(0.0, "weight of mDPO's anchor -log sigmoid(beta r_w) (mDPO: 1)")
    online_bdhs: bool = option(False, "replace each rejected response, every step, by a BDHS sample of the current "
                                      "policy (image tokens mostly masked, continuing the chosen answer from a random "
                                      "cut point); the data's rejected responses are then not used")
    bdhs_keep_prob: float = option(0.01, "online BDHS: probability that an image token stays visible")
    bdhs_max_new_tokens: int = option(32, "online BDHS: longest sampled continuation")
    bdhs_threshold: float = option(0.97, "online BDHS: a sample whose bag-of-words cosine with the chosen response "
                                          "reaches this is drawn again (up to 5 times)")
    gradient_checkpointing: bool = option(False, "trade compute for memory in the language model")
    learning_rate: float = option(1e-5, "peak learning rate")
    eval_data: str | None = option(None, "--eval-every: held-out QA rows (images (one), question, one-word answer; "
                                         "Parquet/JSONL, folder or hub id) answered greedily, logged as eval/accuracy "
                                         "(as `mmalign vision eval` measures it)")
    eval_template: str = option(PROMPT, "--eval-every: the prompt of the held-out questions, {question} where the "
                                        "question goes")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("--model (a LLaVA-style model folder or hub id) is required")
        if not self.data:
            raise ValueError("--data (TRL preference rows with images) is required")
        if not 0 < self.beta < math.inf:
            raise ValueError(f"beta must be a positive finite number, got {self.beta}")
        if not 0 <= self.bdhs_threshold <= 1:
            raise ValueError(f"bdhs_threshold must be in [0, 1], got {self.bdhs_threshold}")
        if not 0 <= self.bdhs_keep_prob <= 1 or self.bdhs_max_new_tokens < 1:
            raise ValueError(f"bdhs_keep_prob must be in [0, 1] and bdhs_max_new_tokens at least 1, got "
                             f"{self.bdhs_keep_prob} and {self.bdhs_max_new_tokens}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if not self.full and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1 (or pass --full), got {self.lora_rank}")
        if min(self.dpo_weight, self.visual_weight, self.anchor_weight) < 0:
            raise ValueError("dpo_weight, visual_weight and anchor_weight must not be negative")
        if self.dpo_weight == 0 and self.visual_term == "none" and self.anchor_weight == 0:
            raise ValueError("with dpo_weight 0, a visual term or an anchor is needed: nothing would be trained")
        if self.reference == "adapter" and self.full:
            raise ValueError("--reference adapter needs a LoRA; --full trains the weights themselves (use frozen)")
        if self.reference == "frozen" and not self.full:
            raise ValueError("--reference frozen is for --full; a LoRA's reference is the model with its adapter off")
        if bool(self.eval_every) != bool(self.eval_data):
            raise ValueError("--eval-every and --eval-data go together: the held-out QA rows are scored every N steps")
        if "{question}" not in self.eval_template:
            raise ValueError(f"--eval-template {self.eval_template!r} has no {{question}}")
        if self.reference == "cached" and self.visual_term == "corrupted":
            raise ValueError("--reference cached needs fixed images; the corrupted visual term draws new crops each "
                             "step")
        if self.streaming and self.reference == "cached":
            raise ValueError("--reference cached scores every row before training, --streaming reads them as training "
                             "goes: use one or the other")
        if self.online_bdhs and self.reference == "cached":
            raise ValueError("--online-bdhs samples new rejected responses every step; their reference scores cannot "
                             "be cached")
        if self.token_objective != "none" and (self.reference == "cached" or self.loss != "sigmoid"):
            raise ValueError("--token-objective needs the reference's token distributions (not --reference cached) and "
                             "replaces --loss (leave it at sigmoid)")
        if self.token_alpha is None:
            self.token_alpha = {"tdpo": 0.5, "rrpo": 0.01}.get(self.token_objective, 0.0)
        if self.train_vision and not self.full:
            raise ValueError("--train-vision applies to --full (the LoRA adapts the language model only)")


@dataclass
class Parts:
    """What the step needs besides the policy."""

    reference: Any
    config: Config
    share_features: bool
    processor: Any = None


def vision_dpo_loss(policy: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor, config: Config,
                    pairwise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss [B] = w_d preference_loss(r_w, r_l) + w_v (-log s(beta (r_w - r'_w))) + w_a (-log s(beta r_w)) from
    scores [B, k] (columns chosen, rejected[, chosen under v']) and completion lengths [B, k]; plus metrics. A given
    `pairwise` [B] (a token-level objective) takes the place of preference_loss."""
    logratio = policy - ref.detach().to(policy.dtype)  # [B, k]
    chosen, rejected = logratio[:, CHOSEN], logratio[:, REJECTED]
    if config.loss == "ipo":  # TRL's IPO: per-token averages
        chosen, rejected = chosen / lengths[:, CHOSEN].clamp(min=1), rejected / lengths[:, REJECTED].clamp(min=1)
    dpo = pairwise if pairwise is not None else preference_loss(
        chosen, rejected, kind=config.loss, beta=config.beta, label_smoothing=config.label_smoothing)
    metrics = {"dpo_loss": dpo.detach().mean(),
               **preference_metrics(logratio[:, CHOSEN], logratio[:, REJECTED], config.beta),
               "logps_chosen": policy[:, CHOSEN].detach().mean(), "logps_rejected": policy[:, REJECTED].detach().mean()}
    loss = config.dpo_weight * dpo
    if config.visual_term != "none":
        visual = -F.logsigmoid(config.beta * (logratio[:, CHOSEN] - logratio[:, VISUAL]))
        loss = loss + config.visual_weight * visual
        metrics["visual_loss"] = visual.detach().mean()
    if config.anchor_weight > 0:
        anchor = -F.logsigmoid(config.beta * logratio[:, CHOSEN])
        loss = loss + config.anchor_weight * anchor
        metrics["anchor_loss"] = anchor.detach().mean()
    return loss, metrics


def corrupt_images(pixels: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.01, 0.2),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """mDPO's corrupted images: each image [N,3,H,W] cropped to a random area share in `scale` (aspect in `ratio`)
    at a random place and resized back (torchvision's RandomResizedCrop with the step's generator)."""
    n, _, h, w = pixels.shape
    draws = torch.rand(n, 4, generator=generator, device=pixels.device).cpu()
    out = []
    for image, (u_area, u_ratio, u_top, u_left) in zip(pixels, draws.tolist()):
        area = h * w * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = ratio[0] ** (1 - u_ratio) * ratio[1] ** u_ratio
        ch = max(1, min(h, round((area / aspect) ** 0.5)))
        cw = max(1, min(w, round((area * aspect) ** 0.5)))
        top, left = int(u_top * (h - ch + 1)), int(u_left * (w - cw + 1))
        out.append(TF.resized_crop(image, top, left, ch, cw, [h, w], antialias=True))
    return torch.stack(out)


def with_visual_images(batch: dict[str, Any], generator: torch.Generator, config: Config) -> dict[str, Any]:
    """The batch with v' (retrieved or corrupted images) appended after the real images in every image input."""
    if config.visual_term == "none":
        return batch
    real = batch["images"]
    alt = batch.pop("retrieved_images") if config.visual_term == "retrieved" else \
        {**real, "pixel_values": corrupt_images(real["pixel_values"], generator)}
    return {**batch, "images": stack_images([real, alt])}


def dpo_step(model, batch: dict[str, Any], generator: torch.Generator, parts: Parts) -> tuple[torch.Tensor, dict]:
    """One micro-step: policy scores with gradients and reference scores without, from one image encoding."""
    c = parts.config
    if c.online_bdhs:
        batch = online.online_rejected(model, batch, generator, parts.processor, c.bdhs_keep_prob,
                                       c.bdhs_max_new_tokens, c.max_length, c.bdhs_threshold)
    batch = with_visual_images(batch, generator, c)
    features = None
    if parts.share_features:
        with torch.no_grad():
            features = image_features(model, batch)
    if c.token_objective != "none":
        return token_step(model, batch, features, parts)
    score = functools.partial(sequence_scores, features=features)
    policy = score(model, batch)
    ref = parts.reference.scores(score, model, batch)
    losses, metrics = vision_dpo_loss(policy, ref, batch["completion_lengths"], c)
    return losses.mean(), metrics


def token_step(model, batch: dict[str, Any], features, parts: Parts) -> tuple[torch.Tensor, dict]:
    """The micro-step with a token-level objective (TDPO2 or RRPO, see `token_level`) in place of --loss."""
    c, pairs = parts.config, batch["index"].shape[0]
    score = functools.partial(token_log_probs, features=features)
    logps, mask, log_dist = score(model, batch)
    ref_logps, _, ref_log_dist = parts.reference.scores(score, model, batch)
    ratio = (logps - ref_logps) * mask
    kl = token_level.token_kl(ref_log_dist, log_dist) * mask
    rows = lambda x: x.sum(1).view(-1, pairs).T  # noqa: E731 - [R, T] -> [B, k]
    alpha = c.token_alpha
    assert alpha is not None  # Config.__post_init__ resolves the default
    if c.token_objective == "tdpo":
        pairwise = token_level.tdpo_loss(rows(ratio)[:, CHOSEN], rows(ratio)[:, REJECTED], rows(kl)[:, CHOSEN],
                                         rows(kl)[:, REJECTED], c.beta, alpha)
    else:
        diff = token_level.differing_tokens(batch["input_ids"][:, -logps.shape[1]:], mask, pairs)
        pairwise = token_level.rrpo_loss(rows(ratio * diff)[:, CHOSEN], rows(ratio * diff)[:, REJECTED],
                                         rows(kl)[:, CHOSEN], c.beta, alpha)
    losses, metrics = vision_dpo_loss(rows(logps * mask), rows(ref_logps * mask), batch["completion_lengths"], c,
                                      pairwise=pairwise)
    metrics["kl_chosen"] = rows(kl)[:, CHOSEN].detach().mean()
    return losses.mean(), metrics


def collate_for(processor, config: Config):
    """The collate function of a run: pairs padded with the tokenizer's pad (or EOS) token, v' rows when needed."""
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return functools.partial(collate_pairs, pad_token_id=pad, visual=config.visual_term != "none")


def load_pairs(config: Config, processor) -> VisionPairs | Stream:
    """The run's preference rows, each checked up front (fields, images, rendering, lengths; `VisionPairs.load`), and
    for the corrupted visual term that the processor gives whole images to crop (`check_croppable`)."""
    where = dict(retrieved=config.visual_term == "retrieved", allow_outside=config.allow_outside_paths)
    pairs = VisionPairs.stream(config.data, processor, config.max_length, config.split,
                               shuffle_buffer=config.shuffle_buffer, **where) if config.streaming else \
        VisionPairs.load(config.data, processor, config.max_length, config.split, **where)
    if config.visual_term == "corrupted":
        check_croppable(pairs.load(pairs.first(1)[0], 0) if isinstance(pairs, Stream) else pairs[0], config.model)
    return pairs


def check_croppable(first: dict[str, Any], model: str) -> None:
    """mDPO's crops (`corrupt_images`) take pixel_values [N,3,H,W], one whole image each; a ConfigError naming the model
    when its processor gives another layout (any-resolution tiles, flattened patches), read from the `first` row."""
    images = first["images"]
    if images is not None and images["pixel_values"].dim() != 4:
        raise ConfigError(f"--visual-term corrupted: {model}'s processor gives pixel_values of shape "
                          f"{tuple(images['pixel_values'].shape)} per row (image tiles or patches), not whole images "
                          "[N,3,H,W] to crop; use --visual-term retrieved")


def prepare(config: Config, trainer: Trainer, processor):
    """(policy, parts): the model loaded and placed, its LoRA (or trainable full weights) and reference."""
    if config.online_bdhs and trainer.sharding:
        raise ConfigError(f"--online-bdhs under {trainer.sharding}: each process samples its own rejected answers, of "
                          "its own lengths, while a sharded model needs every process in every forward; launch it "
                          "with DDP (mmalign/accelerate_configs/ddp.yaml)")
    model = models.load_model(config.model, torch.float32 if config.full else trainer.weight_dtype)
    if config.online_bdhs and rope_index(model) is not None:
        raise ConfigError(f"--online-bdhs: {config.model} places tokens by multi-axis rotary positions (M-RoPE) "
                          "read from the attention mask, which BDHS uses to hide image tokens; train on offline pairs "
                          "(without --online-bdhs)")
    model.requires_grad_(False).to(trainer.device)
    if config.full:
        for name, param in model.named_parameters():
            param.requires_grad_(config.train_vision or not any(p in name for p in models.VISION_PARTS))
    else:
        model = models.add_lora(model, config.lora_rank, config.lora_alpha, tuple(config.lora_targets))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    reference = (FrozenCopy(model, dtype=trainer.weight_dtype, device=trainer.device) if config.full
                 else AdapterDisabled())
    return model, Parts(reference, config, models.vision_is_frozen(model), processor)


def cached_reference(parts: Parts, model, pairs: VisionPairs, collate, trainer: Trainer) -> CachedScores:
    """Reference scores of every row, computed once (or read back from the run directory on resume); a row that cannot
    be loaded stops the run (--bad-rows error) or is left unscored, for training skips it too (skip)."""
    path = parts.config.output / CACHE_FILE
    if path.is_file():
        return CachedScores.load(str(path))
    config, skipped = parts.config, []

    def batches():
        for batch, bad in read_once(pairs, collate, config.batch_size, config.num_workers, "caching reference scores",
                                    stop=config.bad_rows == "error"):
            skipped.extend(row.index for row in bad)
            if batch is not None:
                yield with_visual_images(send_to_device(batch, trainer.device), None, config)

    with trainer.autocast():
        cache = CachedScores.build(parts.reference, sequence_scores, model, batches(), len(pairs), skipped)
    if skipped:
        trainer.accelerator.print(f"{config.data}: {len(skipped)} row(s) cannot be loaded; training skips them "
                                  "(--bad-rows skip) and lists them in bad_rows.jsonl")
    if trainer.is_main:
        write_atomically(path, lambda tmp: cache.save(str(tmp)))
    return cache


def run(config: Config) -> list[dict[str, float]]:
    """`mmalign vision dpo`: train into config.output; writes the adapter (or model), processor and curves.

    The model (its config and processor) and every row of the data are checked before the weights are loaded, and
    the run folder is begun only after that."""
    trainer = Trainer(config)
    processor = models.load_processor(config.model)
    pairs = load_pairs(config, processor)
    trainer.accelerator.print(f"streaming preference rows from {config.data}" if isinstance(pairs, Stream) else
                              f"{len(pairs)} preference rows from {config.data}")
    held_out = qa_rows(config.eval_data, allow_outside_paths=config.allow_outside_paths) if config.eval_data else None
    model, parts = prepare(config, trainer, processor)
    collate = collate_for(processor, config)
    trainer.begin()
    if config.reference == "cached":
        assert isinstance(pairs, VisionPairs)  # Config refuses --streaming with --reference cached
        parts.reference = cached_reference(parts, model, pairs, collate, trainer)
    history = trainer.fit(model, pairs, collate, functools.partial(dpo_step, parts=parts),
                          save_model=lambda m, out: models.save(m, processor, Path(out)),
                          evaluation=held_out_accuracy(processor, held_out, config.batch_size, config.eval_template)
                          if held_out is not None else None, forward_methods=("get_image_features",))
    if trainer.is_main:
        plot_metrics(history, ["loss", "dpo_loss", "visual_loss", "anchor_loss", "implicit_acc", "reward_margin", "lr"],
                     config.output / "curves.png", title="vision DPO")
    return history
