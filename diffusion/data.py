"""Pick-a-Pic v2 preference pairs: rows `caption, jpg_0, jpg_1, label_0`, images as bytes or file paths.

label_0 = 1 means jpg_0 is preferred, 0 means jpg_1 is, 0.5 is a tie (dropped and counted). Image
paths are resolved against the data file's folder and must lie inside it, unless allowed
(`mmalign.data.resolve_path`, --allow-outside-paths). Every row's caption, label and image fields (image paths
included) are checked, vectorised, before training starts (`pickapic_schema`); an image is read and decoded when
its row is loaded, and one that cannot be raises `BadRow` naming its row and field (`--bad-rows`); `mmalign data
check` reads every image up front.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image, UnidentifiedImageError

from mmalign.data import (
    DataError,
    Field,
    Mask,
    Schema,
    any_of,
    is_text_type,
    leaving_root,
    load_preferences,
    read_utf8,
    resolve_path,
)
from mmalign.errors import BadRow, MissingDependencyError
from mmalign.files import write_atomically
from mmalign.stream import Stream

LABELS = (0.0, 0.5, 1.0)
PICKAPIC_FIELDS = ("caption", "jpg_0", "jpg_1", "label_0")


def _data_root(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def image_file(path: Path) -> bytes:
    """The bytes of an image file; a folder or a missing file raises DataError naming it."""
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise DataError(f"image file {path} does not exist")
    return path.read_bytes()


def image_bytes(value: Any, root: Path, allow_outside: bool = False) -> bytes:
    """The encoded bytes of an image given as bytes, a datasets Image dict ({'bytes', 'path'}), or a path inside the
    data folder `root` (anywhere with `allow_outside`, see `mmalign.data.resolve_path`)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return image_file(resolve_path(value, root, allow_outside, where="image path"))
    raise DataError(f"expected image bytes or a file path, got {type(value).__name__}")


def decode_image(data: bytes) -> Image.Image:
    """A PIL image (decoded lazily) from encoded bytes; bytes of no image format raise DataError."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DataError("not an image: PIL recognises no image format in it") from None


def open_image(value: Any, root: Path, allow_outside: bool = False) -> Image.Image:
    """A PIL image from PNG/JPEG bytes, a datasets Image dict ({'bytes', 'path'}), or a path (see `image_bytes`)."""
    return decode_image(image_bytes(value, root, allow_outside))


def unset_media(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """Rows of a column of image bytes or paths (or `datasets` {'bytes', 'path'} structs) holding neither; None for a
    column of another type."""
    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or is_text_type(kind):
        return pc.is_null(column)
    if pa.types.is_struct(kind) and {"bytes", "path"} <= {f.name for f in kind}:
        return pc.or_kleene(pc.is_null(column), pc.and_kleene(pc.is_null(pc.struct_field(column, "bytes")),
                                                              pc.is_null(pc.struct_field(column, "path"))))
    return None


def label_suspects(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """Rows of a numeric label column that are not 0, 0.5 or 1; None for a column of another type."""
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        return None
    return pc.invert(pc.is_in(pc.cast(column, pa.float64()), value_set=pa.array(LABELS)))


def pickapic_schema(fields: tuple[str, str], inside: Path | None = None, media: str = "image") -> Schema:
    """Pick-a-Pic rows: a caption, two media fields holding bytes or a path (inside the folder `inside` unless it is
    None, see `mmalign.data.resolve_path`), label_0 in {0, 0.5, 1}. Whether the media can be read is checked when a
    row is loaded."""
    def media_check(value: Any, record: dict) -> str | None:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if not isinstance(value, (bytes, str)):
            return f"cannot be read (expected image bytes or a file path, got {type(value).__name__})"
        if isinstance(value, str) and inside is not None:
            try:
                resolve_path(value, inside, where=f"{media} path")
            except DataError as err:
                return f"cannot be read ({err})"
        return None

    def media_suspects(column: pa.ChunkedArray) -> Mask | None:
        return any_of(unset_media(column), *([] if inside is None else [leaving_root(column)]))

    def caption(value: Any, record: dict) -> str | None:
        return None if isinstance(value, str) else f"expected text, got {type(value).__name__}"

    def label(value: Any, record: dict) -> str | None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number and float(value) in LABELS else f"must be 0, 0.5 or 1, got {value!r}"

    def not_text(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
        return pc.is_null(column) if is_text_type(column.type) else None

    return Schema("Pick-a-Pic", (Field("caption", caption, suspects=not_text),
                                 *(Field(name, media_check, suspects=media_suspects) for name in fields),
                                 Field("label_0", label, suspects=label_suspects)),
                  settings=f"paths inside {inside}" if inside else "")


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 prompts file; a missing, non-UTF-8 or empty file raises DataError naming it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"prompts file {path} is a folder; give a text file of one prompt per line")
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in read_utf8(path).splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"prompts file {path} has no prompts")
    return prompts


class PreferencePairs(torch.utils.data.Dataset):
    """Non-tie Pick-a-Pic pairs as {'pixel_values': [2,3,R,R] winner first in [-1,1], 'caption', 'index'}.

    With as_stored=True every pair is kept, ties too, in its stored order (jpg_0 first), and each item
    also carries 'label_0' (P(jpg_0 preferred): 1, 0 or 0.5): what a reward model trains and is judged on.
    Subclasses change the media: `fields` names the two columns, `media` what they hold, `load` turns one value into
    model pixels (raising on media that cannot be read, which `__getitem__` reports as a `BadRow`).
    """

    fields = ("jpg_0", "jpg_1")
    media = "image"

    def __init__(self, path: str | Path, resolution: int, split: str = "train", as_stored: bool = False,
                 allow_outside_paths: bool = False, streaming: bool = False, shuffle_buffer: int = 1000):
        self.source, self.root, self.resolution = str(path), _data_root(path), resolution
        self.allow_outside_paths, self.as_stored = allow_outside_paths, as_stored
        schema = pickapic_schema(self.fields, None if allow_outside_paths else self.root, self.media)
        if streaming:  # read as training goes: the pairs are `self.stream`'s, and this object only loads them
            self.stream = Stream(path, schema, self.item, lambda record: as_stored or record.get("label_0") != 0.5,
                                 split, shuffle_buffer)
            return
        records = load_preferences(path, schema, split)
        self.labels = records.with_format("arrow")[:]["label_0"].to_numpy().astype(np.float64)
        self.ties = int((self.labels == 0.5).sum())
        if self.ties == len(records):
            raise DataError(f"{path}: all {len(records)} pairs are ties (label_0 = 0.5); nothing to learn from")
        self.rows = np.arange(len(records)) if as_stored else np.flatnonzero(self.labels != 0.5)
        self.records = records

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, value: Any) -> torch.Tensor:
        """Model pixels [3,R,R] in [-1, 1]."""
        return to_model_pixels(open_image(value, self.root, self.allow_outside_paths).convert("RGB"), self.resolution)

    def _pixels(self, value: Any, row: int, field: str) -> torch.Tensor:
        try:
            return self.load(value)
        except MissingDependencyError:
            raise
        except Exception as err:  # noqa: BLE001
            raise BadRow(self.source, row, field, f"cannot be read ({err})") from err

    def winner_first(self, record: dict) -> bool:
        """Whether the record's first media is the one to put first: the winner (label_0 = 1), or as stored."""
        return self.as_stored or record["label_0"] == 1.0

    def item(self, record: dict, row: int) -> dict[str, Any]:
        """The training item of record `row`."""
        first, second = (self._pixels(record[name], row, name) for name in self.fields)
        pair = (first, second) if self.winner_first(record) else (second, first)
        item = {"pixel_values": torch.stack(pair), "caption": record["caption"], "index": row}
        if self.as_stored:
            item["label_0"] = torch.tensor(float(record["label_0"]), dtype=torch.float32)
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.rows[i])
        return self.item(self.records[row], row)

    def caption(self, i: int) -> str:
        """The caption of pair i, without decoding its images."""
        return self.records[int(self.rows[i])]["caption"]

    def captions(self, count: int) -> list[str]:
        """The captions of the first `count` pairs, read as one column slice (no image is read)."""
        captions = self.records.with_format("arrow", columns=["caption"])
        return captions[self.rows[:count].tolist()]["caption"].to_pylist()


class CachedLatents(torch.utils.data.Dataset):
    """Pairs as VAE posterior statistics {'latent_mean', 'latent_std': [2,C,h,w] winner first, 'caption', 'index'}:
    `mean[k]`, `std[k]` those of pair `positions[k]`; a pair that could not be loaded raises its `BadRow` again."""

    def __init__(self, pairs: PreferencePairs, positions: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 bad: Sequence[BadRow] = ()):
        self.pairs, self.mean, self.std = pairs, mean, std
        self.slot = torch.full((len(pairs),), -1, dtype=torch.long)
        self.slot[positions] = torch.arange(len(positions))
        self.bad = {row.index: row for row in bad}

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row, slot = int(self.pairs.rows[i]), int(self.slot[i])
        if slot < 0:
            raise self.bad[row]
        return {"latent_mean": self.mean[slot], "latent_std": self.std[slot], "caption": self.pairs.caption(i),
                "index": row}


def to_model_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution`, centre-crop, scale to [-1, 1]; returns [3,R,R]."""
    w, h = image.size
    scale = resolution / min(w, h)
    if scale != 1:
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch: tensors along a new first axis ([B,2,...]), captions as a list, indices as a tensor [B]."""
    batch: dict[str, Any] = {}
    for key, first in items[0].items():
        values = [it[key] for it in items]
        batch[key] = torch.stack(values) if torch.is_tensor(first) else values if isinstance(first, str) \
            else torch.tensor(values)
    return batch


def write_pickapic(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows of caption/jpg_0/jpg_1 (bytes)/label_0, plus any further fields all rows share, as a Pick-a-Pic
    Parquet file; written to a temporary file first and renamed, so a reader never sees half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    extra = [k for k in rows[0] if k not in PICKAPIC_FIELDS] if rows else []
    table = pa.table({
        "caption": [r["caption"] for r in rows],
        "jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
        "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
        "label_0": [float(r["label_0"]) for r in rows],
        **{k: [r[k] for r in rows] for k in extra},
    })
    return write_atomically(path, lambda tmp: pq.write_table(table, str(tmp)))
