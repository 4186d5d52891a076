"""Fixed-seed sampling from a diffusers pipeline, image grids, and the `mmalign diffusion sample` command."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from mmalign import run_folder
from mmalign.config import option

from .data import read_prompts


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 20, guidance_scale: float = 5.0,
             batch_size: int = 64, **pipe_kwargs) -> torch.Tensor:
    """Images [N,3,H,W] (videos [N,F,3,H,W]) in [0,1]; sample i uses generator seed `seed + i`, so any batch split
    gives the same images."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                   output_type="pt", **pipe_kwargs)
        images.append((out.frames if hasattr(out, "frames") else out.images).float().cpu())
    return torch.cat(images).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images [N,3,H,W] in [0,1] as 8-bit RGB PIL images."""
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(tile) for tile in pixels]


def image_grid(images: torch.Tensor, columns: int | None = None, scale: int = 1) -> Image.Image:
    """Tile images [N,3,H,W] in [0,1] into one PIL image, `columns` wide (default: square)."""
    n, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, tile in enumerate(to_pil(images)):
        grid.paste(tile, ((i % columns) * w, (i // columns) * h))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST) if scale > 1 else grid


def save_images(images: torch.Tensor, output: str | Path, prefix: str = "sample") -> list[Path]:
    """Write each image of [N,3,H,W] as `<prefix>_<i>.png` under `output`; returns the paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, tile in enumerate(to_pil(images)):
        paths.append(output / f"{prefix}_{i:04d}.png")
        tile.save(paths[-1])
    return paths


@dataclass
class Config:
    """Settings of `mmalign diffusion sample`."""

    model: str = option(None, "diffusers SD/SDXL folder, hub id, or single-file checkpoint")
    prompts: str = option(None, "text file, one prompt per line")
    output: Path = option(None, "folder for the images and grid.png: a new or empty one")
    lora: str | None = option(None, "folder or file of LoRA weights to load (e.g. a Diffusion-DPO run directory)")
    num: int = option(4, "images per prompt")
    seed: int = option(0, "image i of the run uses generator seed `seed + i`")
    steps: int = option(25, "sampler steps")
    guidance_scale: float = option(5.0, "classifier-free guidance scale (FLUX.1-dev: the value of its guidance "
                                        "embedding; 3.5 is its default)")
    resolution: int | None = option(None, "image height and width in pixels (default: the pipeline's own)")
    batch_size: int = option(16, "images per pipeline call")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "weight dtype of the pipeline")
    cpu: bool = option(False, "sample on the CPU even when a GPU is present")

    def __post_init__(self) -> None:
        for name in ("model", "prompts", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.num < 1 or self.batch_size < 1 or (self.resolution is not None and self.resolution < 1):
            raise ValueError("num, batch_size and resolution must be at least 1")
        self.output = Path(self.output)


def load(config: Config):
    """The pipeline of `config.model` on the GPU when there is one (or the CPU), with `config.lora` loaded."""
    from .models import sampling_pipeline

    return sampling_pipeline(config.model, config.lora, config.mixed_precision, config.cpu)


def write(pipe, prompts: list[str], config: Config) -> torch.Tensor:
    """Sample `num` images per prompt, write them as PNG files plus grid.png into config.output; returns them."""
    expanded = [p for p in prompts for _ in range(config.num)]
    size = {"height": config.resolution, "width": config.resolution} if config.resolution else {}
    images = generate(pipe, expanded, seed=config.seed, steps=config.steps, guidance_scale=config.guidance_scale,
                      batch_size=config.batch_size, **size)
    save_images(images, config.output)
    image_grid(images, columns=config.num, scale=max(1, 256 // images.shape[-1])).save(config.output / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {config.output}")
    return images


def run(config: Config) -> torch.Tensor:
    """`mmalign diffusion sample`: fixed-seed images of each prompt, in a folder of their own (new or empty)."""
    prompts = read_prompts(config.prompts)
    with run_folder.claim(config.output, resuming=False):
        return write(load(config), prompts, config)
