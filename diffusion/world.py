"""The embedded synthetic image world: one coloured shape on a plain canvas, and its measurable reward.

A caption names a colour and a shape ("a red circle"); the renderer draws that shape at a random
place and size. The world's ground-truth preference is *placement*: people here prefer the object
on the left, `placement_reward = 1 - x_centroid / (W - 1)` in [0, 1], measured from pixels alone, so
it scores any generated image the same way it scores a rendered one.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (225, 190, 30)}
SHAPES = ("circle", "square", "triangle")
CAPTIONS = tuple(f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES)
BACKGROUND = (235, 235, 235)
IMAGE_SIZE = 32
SUPERSAMPLE = 4
OBJECT_THRESHOLD = 60.0
"""A pixel belongs to the object when its largest channel difference from the background exceeds this."""


def render(caption: str, cx: float, cy: float, radius: float, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the caption's shape centred at (cx, cy) with the given radius, anti-aliased."""
    colour, shape = parse_caption(caption)
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x, y, r = cx * s, cy * s, radius * s
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=COLOURS[colour])
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([x - h, y - h, x + h, y + h], fill=COLOURS[colour])
    else:
        draw.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=COLOURS[colour])
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def random_scene(rng: np.random.Generator, caption: str | None = None,
                 size: int = IMAGE_SIZE) -> tuple[str, Image.Image]:
    """A caption (drawn uniformly unless given) and its rendering at a uniformly random place and size."""
    caption = caption if caption is not None else CAPTIONS[rng.integers(len(CAPTIONS))]
    radius = rng.uniform(0.15, 0.25) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    return caption, render(caption, cx, cy, radius, size)


def placement_reward(images: torch.Tensor) -> torch.Tensor:
    """r(x) = 1 - x_centroid/(W-1) of the object's pixels, images [B,3,H,W] in [0,1]; 0 when no object is drawn."""
    background = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device).view(1, 3, 1, 1) / 255.0
    distance = (images - background).abs().amax(dim=1) * 255.0
    weight = torch.where(distance > OBJECT_THRESHOLD, distance, torch.zeros_like(distance))
    columns = torch.arange(images.shape[-1], dtype=images.dtype, device=images.device)
    mass = weight.sum(dim=(1, 2))
    centroid = (weight.sum(dim=1) * columns).sum(dim=1) / mass.clamp_min(1e-6)
    return torch.where(mass > 0, 1.0 - centroid / (images.shape[-1] - 1), torch.zeros_like(mass))


def object_area(images: torch.Tensor) -> torch.Tensor:
    """r(x) = (object pixels) / (H * W), the share of the image the object covers; images [B,3,H,W] in [0,1]."""
    background = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device).view(1, 3, 1, 1) / 255.0
    return ((images - background).abs().amax(dim=1) * 255.0 > OBJECT_THRESHOLD).to(images.dtype).mean(dim=(1, 2))


def placement_agreement(pairs) -> float:
    """Share of pairs ({'pixel_values': [2,3,H,W] in [-1, 1], winner first}) whose winner placement_reward prefers."""
    agree = [bool(placement_reward((pairs[i]["pixel_values"] + 1) / 2).diff() < 0) for i in range(len(pairs))]
    return sum(agree) / len(agree)


def preference_pairs(n: int, seed: int, tie_margin: float = 0.03,
                     reward: Callable[[torch.Tensor], torch.Tensor] = placement_reward) -> list[dict]:
    """`n` Pick-a-Pic rows (caption, jpg_0, jpg_1 as PNG bytes, label_0) labelled by `reward` (placement_reward),
    a tie when the two rewards differ by less than `tie_margin`."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        caption, first = random_scene(rng)
        _, second = random_scene(rng, caption)
        rewards = reward(torch.stack([pil_to_tensor(first), pil_to_tensor(second)]))
        gap = float(rewards[0] - rewards[1])
        label = 0.5 if abs(gap) < tie_margin else float(gap > 0)
        rows.append({"caption": caption, "jpg_0": png_bytes(first), "jpg_1": png_bytes(second), "label_0": label})
    return rows


def model_pairs(pipe, k: int, keep: int, seed: int = 100_000) -> list[dict]:
    """Pick-a-Pic rows from a pipeline's own samples: per caption, of `k` fixed-seed samples (20 steps) ranked by
    placement_reward, the i-th best beats the i-th worst for i < `keep` (winners drawn by the model, as
    Pick-a-Pic's)."""
    from .sample import generate, to_pil

    rows = []
    for i, caption in enumerate(CAPTIONS):
        images = generate(pipe, [caption] * k, seed=seed + i * k, steps=20)
        order = placement_reward(images).argsort(descending=True)
        for j in range(keep):
            best, worst = to_pil(images[torch.stack([order[j], order[-1 - j]])])
            rows.append({"caption": caption, "jpg_0": png_bytes(best), "jpg_1": png_bytes(worst), "label_0": 1.0})
    return rows


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float tensor [3,H,W] in [0,1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def png_bytes(image: Image.Image) -> bytes:
    """The image encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def parse_caption(caption: str) -> tuple[str, str]:
    """(colour, shape) of a world caption 'a <colour> <shape>'; any other text raises ValueError."""
    words = caption.split()
    if len(words) != 3 or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f"caption {caption!r} is not of the form 'a <colour> <shape>' with colour in "
                         f"{list(COLOURS)} and shape in {list(SHAPES)}")
    return words[1], words[2]


def colour_match(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """1 where the object's mean colour is nearest the caption's among COLOURS, else 0; images [B,3,H,W] in [0,1]."""
    palette = torch.tensor(list(COLOURS.values()), dtype=images.dtype, device=images.device) / 255.0
    background = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device).view(1, 3, 1, 1) / 255.0
    mask = ((images - background).abs().amax(dim=1) * 255.0 > OBJECT_THRESHOLD).to(images.dtype)
    mean_colour = (images * mask[:, None]).sum(dim=(2, 3)) / mask.sum(dim=(1, 2)).clamp_min(1.0)[:, None]
    nearest = torch.cdist(mean_colour, palette).argmin(dim=1)
    wanted = torch.tensor([list(COLOURS).index(parse_caption(c)[0]) for c in captions], device=images.device)
    return ((nearest == wanted) & (mask.sum(dim=(1, 2)) > 0)).to(images.dtype)


def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The world's reward callable, `reward(images [B,3,H,W] in [0,1], prompts) -> [B]`: placement_reward."""
    return placement_reward(images)
