"""Fixed-seed sampling from a diffusers pipeline, image grids, and the `mmalign diffusion sample` command."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 20, guidance_scale: float = 5.0,
             batch_size: int = 64, **pipe_kwargs) -> torch.Tensor:
    """Images [N,3,H,W] in [0,1]; sample i uses generator seed `seed + i`, so any batch split gives the same images."""
    device = pipe.unet.device if hasattr(pipe, "unet") else pipe.device
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                   output_type="pt", **pipe_kwargs)
        images.append(out.images.float().to(device).cpu())
    return torch.cat(images).clamp(0, 1)


def image_grid(images: torch.Tensor, columns: int | None = None, scale: int = 1) -> Image.Image:
    """Tile images [N,3,H,W] in [0,1] into one PIL image, `columns` wide (default: square)."""
    n, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, tile in enumerate(pixels):
        grid.paste(Image.fromarray(tile), ((i % columns) * w, (i // columns) * h))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST) if scale > 1 else grid


def save_images(images: torch.Tensor, output: str | Path, prefix: str = "sample") -> list[Path]:
    """Write each image of [N,3,H,W] as `<prefix>_<i>.png` under `output`; returns the paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, tile in enumerate(pixels):
        paths.append(output / f"{prefix}_{i:04d}.png")
        Image.fromarray(tile).save(paths[-1])
    return paths
