"""Label segment pairs with a scripted teacher: `mmalign robotics label --data push.npz --teacher noisy --output DIR`.

Fragments the trajectories into `--segments` random segments of `--segment-length` steps, draws
`--pairs` random pairs of distinct segments and labels them with a B-Pref teacher (oracle, noisy,
mistake, skip, equal, myopic; see `teachers.py`). Writes DIR/segments.npz, DIR/pairs.jsonl (the
core's pair records plus `label`) and DIR/labels.json (counts, and agreement with the oracle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mmalign import run_folder
from mmalign.config import option
from mmalign.errors import ConfigError, DataError

from .pairs import Pairs, label_pairs
from .teachers import TEACHERS, teacher
from .trajectories import Trajectories

TEACHER_NAMES = tuple(TEACHERS)
TeacherName = Literal[TEACHER_NAMES]  # type: ignore[valid-type]


@dataclass
class Config:
    """Settings of `mmalign robotics label`."""

    data: str = option(None, "trajectory file (.npz) to fragment and label", reads="file")
    output: Path = option(None, "folder for segments.npz, pairs.jsonl and labels.json")
    teacher: TeacherName = option("oracle", "B-Pref scripted teacher")
    segment_length: int = option(50, "steps per segment")
    segments: int = option(1000, "segments to cut")
    pairs: int = option(2000, "pairs to draw (skipped pairs are left out)")
    seed: int = option(0, "seed of the fragments, the pairs and the teacher's randomness")

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data (a trajectory file) is required")
        if self.output is None:
            raise ValueError("--output (a folder) is required")
        self.output = Path(self.output)
        for name, least in (("segment_length", 1), ("segments", 2), ("pairs", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}")
        teacher(self.teacher)


def agreement(pairs: Pairs, segments: Trajectories) -> float:
    """Share of strictly labelled pairs whose chosen segment has the higher true return."""
    returns = segments.returns()
    strict = pairs.label != 0.5
    if not strict.any():
        return float("nan")
    return float(np.mean(returns[pairs.chosen[strict]] > returns[pairs.rejected[strict]]))


def run(config: Config) -> Pairs:
    """Fragment, label, and write the labelled folder (claimed for this run: `run_folder.claim`)."""
    with run_folder.claim(config.output, resuming=False):
        trajs = Trajectories.load(config.data)
        if config.segment_length > trajs.horizon:
            raise ConfigError(f"--segment-length {config.segment_length} is longer than the trajectories of "
                              f"{config.data} ({trajs.horizon} steps)")
        segments = trajs.fragment(config.segment_length, config.segments, seed=config.seed)
        pairs = label_pairs(segments, config.pairs, teacher(config.teacher), seed=config.seed, name=config.teacher)
        if not len(pairs):
            raise DataError(f"{config.data}: the {config.teacher} teacher skipped all {config.pairs} pairs (no segment "
                            "returned enough); nothing was written")
        segments.save(config.output / "segments.npz")
        pairs.save(config.output / "pairs.jsonl")
        summary = {"teacher": config.teacher, "pairs": len(pairs), "skipped": config.pairs - len(pairs),
                   "equal": int((pairs.label == 0.5).sum()), "agreement_with_true_return": agreement(pairs, segments)}
        (config.output / "labels.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return pairs
