"""`mmalign data check PATH`: read every row of a dataset as training would, in parallel, and list each bad one.

Training checks fields, types and labels up front and reads each image only when its row is loaded (`--bad-rows`);
this command is for those who want every row read before a run. Pick-a-Pic pairs (`--kind pickapic`) and video pairs
(`video`) are loaded as `PreferencePairs`/`VideoPairs` load them, every image (or frame) decoded; TRL vision rows
(`trl`) have each of their images decoded. Problems are printed with file, record, field and reason (and with
--report written as JSON Lines), and the command exits with code 1.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from mmalign.config import option
from mmalign.data import ALLOW_OUTSIDE_PATHS, listed, read_once
from mmalign.errors import BadRow, DataError
from mmalign.files import write_atomically

CHECK_RESOLUTION = 16
"""The size media are brought to: every pixel is decoded, little time is spent resizing."""


@dataclass
class Config:
    """What to check and how."""

    positional: ClassVar[str] = "path"

    path: str = option(None, "the data: a .parquet/.jsonl file or folder of them, a saved `datasets` folder, a hub id")
    kind: Literal["pickapic", "video", "trl"] = option(
        "pickapic", "pickapic: caption/jpg_0/jpg_1/label_0 pairs; video: caption/video_0/video_1/label_0; trl: TRL "
        "rows with images")
    workers: int = option(2, "worker processes reading rows (0: read in this process)")
    split: str = option("train", "split of a saved or hub dataset")
    num_frames: int = option(8, "frames every video must have (--kind video)")
    allow_outside_paths: bool = option(False, ALLOW_OUTSIDE_PATHS)
    report: Path | None = option(None, "also write every bad row (file, index, field, reason) as JSON Lines here")

    def __post_init__(self) -> None:
        if self.path is None:
            raise ValueError("path (the data to check) is required")
        if self.workers < 0:
            raise ValueError(f"workers must not be negative, got {self.workers}")


class TrlImages(torch.utils.data.Dataset):
    """The images of TRL vision rows, each decoded (`vision.data.open_image`); one that cannot be raises `BadRow`."""

    def __init__(self, path: str, split: str, allow_outside: bool):
        from mmalign.vision.data import VISION_ROW, data_root, load_rows

        self.records, self.source = load_rows(path, VISION_ROW, split, allow_outside), path
        self.root, self.allow_outside = data_root(path), allow_outside

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> int:
        from mmalign.vision.data import IMAGE_ERRORS, IMAGE_FIELDS, open_image, unreadable

        record = self.records[index]
        for field in IMAGE_FIELDS:
            for i, entry in enumerate(record.get(field) or []):
                try:
                    open_image(entry, self.root, self.allow_outside, f"image {i + 1}")
                except (DataError, *IMAGE_ERRORS) as err:
                    raise BadRow(self.source, index, field, unreadable(err)) from None
        return index


def rows_of(config: Config) -> Any:
    """The dataset whose every item is read: each row loaded as training loads it."""
    if config.kind == "trl":
        return TrlImages(config.path, config.split, config.allow_outside_paths)
    from mmalign.diffusion.data import PreferencePairs
    from mmalign.diffusion.video import VideoPairs

    pairs = functools.partial(VideoPairs, num_frames=config.num_frames) if config.kind == "video" else PreferencePairs
    return pairs(config.path, CHECK_RESOLUTION, config.split, as_stored=True,
                 allow_outside_paths=config.allow_outside_paths)


def scan(rows: Any, workers: int, batch_size: int = 32) -> list[BadRow]:
    """Load every item of `rows` in `workers` processes, with a progress bar; the bad rows met, in row order."""
    return [row for _, found in read_once(rows, len, batch_size, workers, desc="check") for row in found]


def run(config: Config) -> list[BadRow]:
    """`mmalign data check`: raise a DataError listing every bad row (written to --report too); else say all is well."""
    rows = rows_of(config)
    bad = scan(rows, config.workers)
    if config.report is not None:
        write_atomically(config.report, lambda tmp: tmp.write_text(
            "".join(json.dumps(row.to_dict()) + "\n" for row in bad)))
    if bad:
        raise DataError(f"{config.path}: {len(bad)} of {len(rows)} rows cannot be read\n"
                        + listed([(row.index, row.field, row.reason) for row in bad])
                        + (f"\n(all of them listed in {config.report})" if config.report else ""))
    print(f"{config.path}: all {len(rows)} rows read; none has a problem")
    return bad
