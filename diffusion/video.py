"""Video Diffusion-DPO: the shared-noise preference loss on text-to-video models (UNet3DConditionModel).

Winner and loser videos are encoded frame by frame into latents [C, F, h, w]; both get ONE noise
over (C, F, h, w) and ONE timestep, and the per-video error e is the mean over all of them, so the
loss is Diffusion-DPO's -log sigmoid(-0.5 beta ((e_w - e_l) - (e'_w - e'_l))) unchanged. Data: rows
`caption, video_0, video_1, label_0`, each video a folder of frame images (sorted by name) or a
video file read with imageio (.gif, or .mp4 with imageio-ffmpeg), relative to the data file; every
video must have exactly `num_frames` frames (checked for every row before training).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmalign.config import option

from . import dpo
from .data import PreferencePairs, to_model_pixels

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_video(value: Any, root: Path) -> list[Image.Image]:
    """The frames of a video given as a folder of images or a video file, path relative to `root`."""
    if not isinstance(value, str):
        raise TypeError(f"expected a path to a frame folder or a video file, got {type(value).__name__}")
    path = Path(value) if Path(value).is_absolute() else root / value
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"frame folder {path} holds no images")
        return [Image.open(f).convert("RGB") for f in files]
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    import imageio.v3 as iio

    return [Image.fromarray(np.asarray(frame)[..., :3]) for frame in iio.imiter(path)]


class VideoPairs(PreferencePairs):
    """Non-tie video pairs as {'pixel_values': [2,F,3,R,R] winner first in [-1,1], 'caption', 'index'}."""

    fields = ("video_0", "video_1")

    def __init__(self, path: str | Path, resolution: int, split: str = "train", num_frames: int = 8):
        self.num_frames = num_frames
        super().__init__(path, resolution, split)

    def _frames(self, value: Any) -> list[Image.Image]:
        frames = read_video(value, self.root)
        if len(frames) != self.num_frames:
            raise ValueError(f"has {len(frames)} frames, expected {self.num_frames} (--num-frames)")
        return frames

    def check(self, value: Any) -> None:
        self._frames(value)

    def load(self, value: Any) -> torch.Tensor:
        return torch.stack([to_model_pixels(frame, self.resolution) for frame in self._frames(value)])


@dataclass
class Config(dpo.Config):
    """Video Diffusion-DPO settings (plus Diffusion-DPO's and the training loop's)."""

    num_frames: int = option(8, "frames per video; every training video must have exactly this many")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}")
        if self.cache_latents:
            raise ValueError("cache_latents is for image pairs; video latents are encoded each step")


def run(config: Config) -> list[dict[str, float]]:
    """`mmalign diffusion video-dpo`: Diffusion-DPO of a text-to-video pipeline on video preference pairs."""
    return dpo.train(config, lambda parts: functools.partial(dpo.dpo_step, parts=parts), "Video Diffusion-DPO",
                     pairs_class=functools.partial(VideoPairs, num_frames=config.num_frames))
