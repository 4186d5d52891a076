"""What every pair builder shares: the model, source rows and output folder settings, and writing its results."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
from PIL import Image

from mmalign.config import option
from mmalign.data import ALLOW_OUTSIDE_PATHS, DataError, Schema, listed
from mmalign.files import write_atomically

from ..data import data_root, load_rows, open_image, write_rows


@dataclass
class BuilderConfig:
    """Settings every builder reads: the model that answers, the source rows, the output folder."""

    model: str = option(None, "the LLaVA-style model whose own answers become the rejected responses")
    data: str = option(None, "source rows: .parquet/.jsonl, a dataset folder or hub id")
    output: Path = option(None, "folder for train.parquet and report.json")
    split: str = option("train", "split to read from a dataset folder or hub id")
    allow_outside_paths: bool = option(False, ALLOW_OUTSIDE_PATHS)

    def __post_init__(self) -> None:
        if not self.model or not self.data or self.output is None:
            raise ValueError("--model, --data and --output are required")
        self.output = Path(self.output)

    @property
    def root(self) -> Path:
        """The folder that image paths in the source rows are relative to."""
        return data_root(self.data)

    def rows(self, schema: Schema) -> datasets.Dataset:
        """The source rows, every one checked up front against `schema` (`vision.data.load_rows`)."""
        return load_rows(self.data, schema, self.split, self.allow_outside_paths)

    def opened(self, records: datasets.Dataset) -> list[dict]:
        """The source rows with their images read (RGB PIL images, see `image`), every one before anything is built:
        a DataError lists each row with an image that cannot be read (record, field), and nothing is written."""
        rows, problems = [], []
        for index, record in enumerate(records):
            try:
                images = [open_image(value, self.root, self.allow_outside_paths, f"image {i + 1}")
                          for i, value in enumerate(record["images"] or [])]
            except DataError as err:
                problems.append((index, "images", str(err)))
                continue
            rows.append({**record, "images": images})
        if problems:
            raise DataError(f"{self.data}: {len(problems)} row(s) with an image that cannot be read; nothing was "
                            f"built or written\n{listed(problems)}")
        return rows

    def image(self, value, where: str = "image") -> Image.Image:
        """An RGB image from a source row's entry, a path read inside the data's folder (`vision.data.open_image`);
        errors name the data file and `where` (e.g. 'record 3, image 1')."""
        return open_image(value, self.root, self.allow_outside_paths, f"{self.data}: {where}")

    def write(self, rows: list[dict], report: dict) -> dict:
        """train.parquet (TRL rows) and report.json into `output`, each written atomically; prints the report
        without its examples and returns it."""
        write_rows(rows, self.output / "train.parquet")
        write_atomically(self.output / "report.json", lambda path: path.write_text(json.dumps(report, indent=1)))
        print(json.dumps({k: v for k, v in report.items() if k != "examples"}))
        return report
