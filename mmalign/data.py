"""Preference records: loading from JSONL, Parquet or a `datasets` directory, and up-front validation.

A record kind is a `Schema`: named fields, each with a check that returns a problem or None, plus
row checks across fields. `load_preferences(path, schema)` loads every record and checks all of
them before anything trains; every bad record is reported with its index and field, then the run
stops with a `DataError`. The core kinds:

    PAIR      prompt, chosen, rejected                    one preference pair
    LIST      prompt, responses [K], labels [K]           a ranked list (LiPO)
    TRL_ROW   prompt, chosen, rejected, images (optional) TRL's preference row, plain or conversational
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Callable, Iterable

import datasets

from mmalign.errors import DataError

MAX_REPORTED = 50


@dataclass(frozen=True)
class Field:
    """A record field and its check: `check(value, record)` returns a problem description or None."""

    name: str
    check: Callable[[Any, dict], str | None]
    required: bool = True


@dataclass(frozen=True)
class Schema:
    """A kind of record: its fields, and checks across fields returning (field, problem) pairs."""

    name: str
    fields: tuple[Field, ...]
    row_checks: tuple[Callable[[dict], Iterable[tuple[str, str]]], ...] = ()


def text(value: Any, record: dict) -> str | None:
    """A non-empty string."""
    if not isinstance(value, str):
        return f"expected text, got {type(value).__name__}"
    return None if value.strip() else "is empty"


def text_or_messages(value: Any, record: dict) -> str | None:
    """Plain text, or a conversation: a list of {'role', 'content'} messages."""
    if isinstance(value, str):
        return text(value, record)
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return None
    return "expected text or a list of {'role', 'content'} messages"


def present(value: Any, record: dict) -> str | None:
    """Any value but None."""
    return None if value is not None else "is missing"


def number_list(value: Any, record: dict) -> str | None:
    """A non-empty list of numbers."""
    if not isinstance(value, list) or not value or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value):
        return "expected a non-empty list of numbers"
    return None


def _same_length(record: dict) -> Iterable[tuple[str, str]]:
    responses, labels = record.get("responses"), record.get("labels")
    if isinstance(responses, list) and isinstance(labels, list) and len(responses) != len(labels):
        yield "labels", f"has {len(labels)} entries for {len(responses)} responses"


def _image_list(value: Any, record: dict) -> str | None:
    if value is None or isinstance(value, list):
        return None
    return f"expected a list of images, got {type(value).__name__}"


PAIR = Schema("pair", (Field("prompt", text_or_messages), Field("chosen", present), Field("rejected", present)))
LIST = Schema("list", (Field("prompt", text_or_messages), Field("responses", present), Field("labels", number_list)),
              (_same_length,))
TRL_ROW = Schema("TRL preference row", (
    Field("prompt", text_or_messages), Field("chosen", text_or_messages), Field("rejected", text_or_messages),
    Field("images", _image_list, required=False)))


def resolve_path(value: str | Path, root: Path, allow_outside: bool = False, where: str = "") -> Path:
    """A path named in a data file, resolved against the data's folder `root`; an absolute path, or one that leads
    out of `root` (`..`, a link), raises DataError naming `where` unless `allow_outside` (--allow-outside-paths)."""
    path = Path(value)
    resolved = path if path.is_absolute() else root / path
    if not allow_outside:
        inside = not path.is_absolute() and (resolved.resolve() == root.resolve()
                                             or root.resolve() in resolved.resolve().parents)
        if not inside:
            kind = "an absolute path, not one inside" if path.is_absolute() else "outside"
            raise DataError(f"{where}: {str(value)!r} is {kind} the data folder {root}; data files name their images "
                            "relative to their folder "
                            "(pass --allow-outside-paths to read it anyway)")
    return resolved


def load_records(path: str | Path, split: str = "train") -> datasets.Dataset:
    """Records from a .jsonl/.json/.parquet file, a folder of them, a `save_to_disk` folder, or a hub dataset id."""
    path_str = str(path)
    path = Path(path)
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        if any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path}: no split {split!r}; it has {', '.join(loaded)}")
                loaded = loaded[split]
            return loaded
        for pattern in (f"*{split}*.parquet", "*.parquet", f"*{split}*.jsonl", "*.jsonl"):
            files = sorted(path.rglob(pattern))
            if files:
                return datasets.concatenate_datasets([_load_file(f) for f in files])
        raise DataError(f"{path}: folder holds no .parquet or .jsonl files and is not a saved `datasets` folder")
    if path_str.count("/") == 1 and not path_str.startswith((".", "/")):
        return datasets.load_dataset(path_str, split=split)
    raise DataError(f"{path}: no such file or folder")


def _load_file(path: Path) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return datasets.Dataset.from_json(str(path))
    if suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def validate(records: datasets.Dataset, schema: Schema, source: str) -> None:
    """Check every record against `schema`; raise DataError listing each bad record's index and field."""
    columns = set(records.column_names)
    missing = [f.name for f in schema.fields if f.required and f.name not in columns]
    if missing:
        raise DataError(f"{source}: {schema.name} records need field(s) {', '.join(missing)}; "
                        f"the data has {', '.join(sorted(columns)) or 'no fields'}")
    if len(records) == 0:
        raise DataError(f"{source}: no records")
    problems = []
    for index, record in enumerate(records):
        problems += [(index, f.name, problem) for f in schema.fields if f.name in record
                     for problem in [f.check(record[f.name], record)] if problem]
        for check in schema.row_checks:
            problems += [(index, field, problem) for field, problem in check(record)]
    if problems:
        lines = [f"  record {i}, field '{name}': {problem}" for i, name, problem in problems[:MAX_REPORTED]]
        more = len(problems) - MAX_REPORTED
        raise DataError(f"{source}: {len(problems)} problem(s) in {schema.name} records; nothing was trained\n"
                        + "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else ""))


def load_preferences(path: str | Path, schema: Schema, split: str = "train") -> datasets.Dataset:
    """Load records and validate all of them up front (see `validate`)."""
    records = load_records(path, split)
    validate(records, schema, source=str(path))
    return records
