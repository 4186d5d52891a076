"""Video Diffusion-DPO: the shared-noise preference loss on text-to-video models (UNet3DConditionModel's
TextToVideoSDPipeline, Wan 2.1's WanPipeline).

Winner and loser videos are encoded into latents [C, F', h, w]: frame by frame by an image VAE (F' = F), whole by
Wan's causal 3D VAE (F' = 1 + (F-1)/4, so F must be 4k+1: 81, 49, 17, ...). Both get ONE noise over (C, F', h, w)
and ONE timestep (a flow model: one sigma, the velocity target), and the per-video error e is the mean over all of
them, so the loss is Diffusion-DPO's -log sigmoid(-0.5 beta ((e_w - e_l) - (e'_w - e'_l))) unchanged. Data: rows
`caption, video_0, video_1, label_0`, each video a folder of frame images (sorted by name) or a
video file read with imageio (.gif, or .mp4 with imageio-ffmpeg), inside the data file's folder; every
video must have exactly `num_frames` frames (checked when its row is loaded; `mmalign data check --kind video` checks
every row up front).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from mmalign.config import option
from mmalign.data import DataError, resolve_path
from mmalign.errors import ConfigError, MissingDependencyError

from .base import Parts
from .data import PreferencePairs, to_model_pixels
from .dpo import dpo_step
from .models import denoiser_of
from .pairwise import PairwiseConfig, train

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_video(value: Any, root: Path, allow_outside: bool = False) -> list[Image.Image]:
    """The frames of a video given as a folder of images or a video file, by a path inside the data folder `root`
    (anywhere with `allow_outside`, see `mmalign.data.resolve_path`)."""
    if not isinstance(value, str):
        raise DataError(f"expected a path to a frame folder or a video file, got {type(value).__name__}")
    path = resolve_path(value, root, allow_outside, where="video path")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"frame folder {path} holds no {'/'.join(FRAME_SUFFIXES)} image files")
        return [Image.open(f).convert("RGB") for f in files]
    if not path.is_file():
        raise DataError(f"video {path} does not exist")
    if path.suffix.lower() in FRAME_SUFFIXES:
        raise DataError(f"{path} is one image, not a video: give a folder of frame images or a video file "
                        "(.gif, .mp4)")
    try:
        import imageio.v3 as iio
    except ImportError as err:
        raise MissingDependencyError("video files are read with imageio: pip install 'mmalign[diffusion]'") from err
    return [Image.fromarray(np.asarray(frame)[..., :3]) for frame in iio.imiter(path)]


class VideoPairs(PreferencePairs):
    """Non-tie video pairs as {'pixel_values': [2,F,3,R,R] winner first in [-1,1], 'caption', 'index'}."""

    fields = ("video_0", "video_1")
    media = "video"

    def __init__(self, path: str | Path, resolution: int, split: str = "train", num_frames: int = 8, **options: Any):
        self.num_frames = num_frames
        super().__init__(path, resolution, split, **options)

    def _frames(self, value: Any) -> list[Image.Image]:
        frames = read_video(value, self.root, self.allow_outside_paths)
        if len(frames) != self.num_frames:
            raise DataError(f"has {len(frames)} frames, expected {self.num_frames} (--num-frames)")
        return frames

    def load(self, value: Any) -> torch.Tensor:
        return torch.stack([to_model_pixels(frame, self.resolution) for frame in self._frames(value)])


@dataclass
class Config(PairwiseConfig):
    """Video Diffusion-DPO settings (plus the pairs', the denoiser's and the training loop's)."""

    video: ClassVar[bool] = True

    num_frames: int = option(8, "frames per video; every training video must have exactly this many")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}")

    def sampling_kwargs(self) -> dict[str, Any]:
        return {"num_frames": self.num_frames}


def check_video_shape(pipe, num_frames: int, resolution: int) -> None:
    """Refuse a video the pipeline cannot encode whole: its VAE maps 1 + kT frames to 1 + k latent frames (Wan: T =
    4; a per-frame VAE: T = 1), and the training resolution must be a multiple of VAE scale x denoiser patch."""
    temporal = getattr(pipe, "vae_scale_factor_temporal", 1)
    if (num_frames - 1) % temporal:
        below = (num_frames - 1) // temporal * temporal + 1
        raise ConfigError(f"--num-frames {num_frames}: {type(pipe).__name__}'s VAE encodes 1 + {temporal}k frames "
                          f"(1 + k latent frames); use {below} or {below + temporal}")
    patch = denoiser_of(pipe).config.get("patch_size") or (1,)
    spatial = getattr(pipe, "vae_scale_factor_spatial", 1) * patch[-1]
    if resolution % spatial:
        raise ConfigError(f"--resolution {resolution}: {type(pipe).__name__} takes sizes that are multiples of "
                          f"{spatial} (VAE scale x patch size)")


def checked_step(parts: Parts[Config]):
    """`dpo.dpo_step` bound to `parts`, once the frame count and resolution fit the pipeline (`check_video_shape`)."""
    check_video_shape(parts.pipe, parts.config.num_frames, parts.resolution)
    return functools.partial(dpo_step, parts=parts)


def run(config: Config) -> list[dict[str, float]]:
    """`mmalign diffusion video-dpo`: Diffusion-DPO of a text-to-video pipeline on video preference pairs."""
    return train(config, checked_step, "Video Diffusion-DPO",
                 pairs_class=functools.partial(VideoPairs, num_frames=config.num_frames))
