"""RLG, Reinforcement Learning Guidance (Jin et al. 2025): inference-time mixing of a base and a fine-tuned model.

At every denoising step both models predict (each with classifier-free guidance), and the sampler
follows

    v = (1 - w) * v_base + w * v_tuned        (= v_base + w * (v_tuned - v_base))

the geometric mixture p_base^(1-w) p_tuned^w: w = 0 is the base model, w = 1 the tuned one, w > 1
extrapolates past it (the paper advises 1-3). CFG is linear in the predictions, so mixing the
CFG-batched predictions inside the denoiser equals mixing after CFG on both. The base prediction
comes from the tuned denoiser with its LoRA adapter disabled, or from a separate base denoiser
(for a full fine-tune). Works for UNet (SD, SDXL) and transformer (SD3) pipelines alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mmalign import run_folder
from mmalign.config import option
from mmalign.reference import adapters_disabled

from . import sample
from .data import read_prompts
from .models import denoiser_of


def _mix(base: Any, tuned: Any, weight: float) -> Any:
    """(1-w)*base + w*tuned on a denoiser output: a tensor, a tuple whose first item is one, or an output dataclass."""
    if torch.is_tensor(tuned):
        return (1 - weight) * base + weight * tuned
    if isinstance(tuned, tuple):
        return (_mix(base[0], tuned[0], weight), *tuned[1:])
    return dataclasses.replace(tuned, sample=_mix(base.sample, tuned.sample, weight))


@contextlib.contextmanager
def reinforcement_guidance(pipe, weight: float, base=None):
    """Within this block, `pipe(...)` samples with RLG at `weight`; base = the adapter disabled unless given."""
    denoiser = denoiser_of(pipe)
    original = denoiser.forward

    def guided_forward(*args, **kwargs):
        tuned = original(*args, **kwargs)
        if base is not None:
            return _mix(base(*args, **kwargs), tuned, weight)
        with adapters_disabled(denoiser):
            return _mix(original(*args, **kwargs), tuned, weight)

    denoiser.forward = guided_forward
    try:
        yield pipe
    finally:
        del denoiser.forward  # the class's own forward shows through again


@dataclass
class Config(sample.Config):
    """Settings of `mmalign diffusion rlg`: sampling with Reinforcement Learning Guidance."""

    weight: float = option(1.5, "guidance weight w: 0 base, 1 tuned, > 1 extrapolates (1-3 advised)")
    base_model: str | None = option(None, "base pipeline for a fully fine-tuned --model (default: the --lora "
                                         "adapter switched off)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora is None and self.base_model is None:
            raise ValueError("RLG needs a tuned model and its base: pass --lora (the base is the adapter switched "
                             "off) or --base-model (the tuned model is --model)")


def run(config: Config) -> torch.Tensor:
    """Sample `num` images per prompt with RLG; writes PNG files and grid.png into a folder of their own."""
    prompts = read_prompts(config.prompts)
    with run_folder.claim(config.output, resuming=False):
        pipe = sample.load(config)
        base = None
        if config.base_model:
            base = denoiser_of(sample.load(dataclasses.replace(config, model=config.base_model, lora=None)))
        with reinforcement_guidance(pipe, config.weight, base=base):
            return sample.write(pipe, prompts, config)
