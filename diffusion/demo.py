"""The embedded demo: Diffusion-DPO on the tiny shapes model in assets/, judged by the world's own reward.

The tiny SD-architecture model (`scripts/build_tiny_sd.py`) draws the shape a caption names at a
random place. Its preference pairs prefer the object on the LEFT. The demo measures the held-out
placement reward (1 - x_centroid/(W-1)) of the base model over fixed-seed samples, fine-tunes it
with Diffusion-DPO (beta 5000, the paper's value), loads the result back through diffusers
(`from_pretrained`, or `load_lora_weights` for a `--no-full` LoRA run), measures the aligned model on
the same seeds, and reports both means with 95% confidence intervals, the paired gain, and the
colour-match rate as a check that the images still show what the caption asks for.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign import run_folder
from mmalign.config import option
from mmalign.data import DataError
from mmalign.stats import comparison_lines, mean_ci

from . import dpo, world
from .data import read_prompts
from .evaluate import evaluate_reward
from .models import load_lora, load_pipeline
from .sample import image_grid

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FLOW_TWIN = ASSETS / "tiny-sd3"  # the same world learnt by an SD3-architecture flow-matching model


@dataclass
class Config(dpo.Config):
    """Demo settings: Diffusion-DPO defaults tuned for the tiny model, plus the evaluation."""

    model: str = option(str(ASSETS / "tiny-sd"), "the embedded tiny pipeline")
    data: str = option(str(ASSETS / "tiny-sd-prefs" / "train.parquet"), "the embedded preference pairs")
    output: Path = option(None, "run directory (default: runs/demo-<date-time>)")
    sample_prompts: str = option(str(ASSETS / "tiny-sd-prompts.txt"), "prompts of the grids and evaluation")
    eval_per_prompt: int = option(8, "fixed-seed samples per held-out prompt (12 prompts)")
    eval_steps: int = option(20, "sampler steps of the evaluation")
    eval_seed: int = option(1000, "first evaluation seed")
    max_steps: int = option(300, "optimizer steps")
    batch_size: int = option(16, "pairs per step")
    full: bool = option(True, "full fine-tune against a frozen copy (the tiny UNet's attention-only LoRA is too "
                              "small to move placement, which its convolutions decide)")
    learning_rate: float = option(1e-4, "peak learning rate")
    warmup_steps: int = option(10, "linear warm-up steps")
    num_samples: int = option(4, "images per prompt in the before/after grids")
    sample_steps: int = option(20, "sampler steps of the grids")
    checkpoint_every: int = option(100, "checkpoint every N steps")

    def __post_init__(self) -> None:
        if self.output is None:
            self.output = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
        super().__post_init__()


TRAINING = ("model", "data", "full", "beta", "learning_rate", "warmup_steps", "max_steps", "batch_size")


def embedded_config(method, output: str | Path, **overrides):
    """`method.Config` with the demo's training settings (`TRAINING`: the embedded model and pairs, full fine-tune,
    beta 5000, lr 1e-4, 300 steps of 16), no grids, trackers or checkpoints; `overrides` win."""
    demo = Config(output=Path(output))
    settings = {name: getattr(demo, name) for name in TRAINING}
    return method.Config(**{**settings, "output": Path(output), "num_samples": 0, "report_to": "none",
                            "checkpoint_every": 0, **overrides})


def read_captions(path: str | Path) -> list[str]:
    """The evaluation prompts: captions of the tiny world ('a <colour> <shape>'); others raise DataError naming them."""
    prompts = read_prompts(path)
    for prompt in prompts:
        try:
            world.parse_caption(prompt)
        except ValueError as err:
            raise DataError(f"--sample-prompts {path}: {err}; the demo judges its samples by the tiny world's "
                            "captions") from None
    return prompts


def run(config: Config) -> dict:
    """Evaluate the base model, train, evaluate the aligned model; print and save the comparison. The output folder
    is claimed for the whole run (`mmalign.run_folder`): training and the results share it."""
    prompts = read_captions(config.sample_prompts)
    with run_folder.claim(config.output, resuming=config.resume is not None):
        return compare(config, prompts)


def compare(config: Config, prompts: list[str]) -> dict:
    """The body of `run`, in the claimed output folder."""
    start = time.time()
    kwargs: dict[str, Any] = dict(per_prompt=config.eval_per_prompt, seed=config.eval_seed, steps=config.eval_steps,
                                  guidance_scale=config.guidance_scale)
    base_pipe = load_pipeline(config.model)
    base_pipe.set_progress_bar_config(disable=True)
    base, base_rewards, base_images = evaluate_reward(base_pipe, prompts, world.reward, **kwargs)

    dpo.run(config)

    aligned_pipe = load_pipeline(config.output if config.full else config.model)
    aligned_pipe.set_progress_bar_config(disable=True)
    if not config.full:
        load_lora(aligned_pipe, config.output)
    aligned, aligned_rewards, aligned_images = evaluate_reward(aligned_pipe, prompts, world.reward, **kwargs)

    captions = [p for p in prompts for _ in range(config.eval_per_prompt)]
    result = {
        "reward": "placement (1 = object at the far left)",
        "samples": len(captions),
        "base": base, "aligned": aligned, "gain": mean_ci(aligned_rewards - base_rewards),
        "colour_match": {"base": world.colour_match(base_images, captions).mean().item(),
                         "aligned": world.colour_match(aligned_images, captions).mean().item()},
        "seconds": round(time.time() - start, 1),
    }
    (config.output / "demo_result.json").write_text(json.dumps(result, indent=2))
    image_grid(base_images, columns=config.eval_per_prompt, scale=2).save(config.output / "demo_base.png")
    image_grid(aligned_images, columns=config.eval_per_prompt, scale=2).save(config.output / "demo_aligned.png")
    print(report(result, config.output))
    return result


def report(result: dict, output: Path) -> str:
    """A few lines a person reads: both rewards with their CIs, the paired gain, colour match, where the files are."""
    return "\n".join([
        f"held-out placement reward over {result['samples']} fixed-seed samples (higher = further left):",
        *comparison_lines(result["base"], result["aligned"], result["gain"]),
        f"  colour match: base {result['colour_match']['base']:.2f}, aligned {result['colour_match']['aligned']:.2f}",
        f"  {result['seconds']:.0f}s; results, grids and curves in {output}",
    ])
