"""Preference records: loading from JSONL, Parquet or a `datasets` directory, and cheap up-front validation.

A record kind is a `Schema`: named fields, each with a check that returns a problem or None, plus
row checks across fields. `load_preferences(path, schema)` loads the records and checks all of
them before anything trains; every bad record is reported with its index and field, then the run
stops with a `DataError`. The checks are vectorised: each field's `suspects` reads its whole Arrow
column at once (types, labels, empty text, list lengths) and only the rows it flags are checked one
by one, so the messages stay those of the per-value checks. What is expensive to check (that an
image decodes) is checked when its row is loaded (`mmalign.errors.BadRow`, `--bad-rows`). A dataset
that passed is remembered by its fingerprint, so other processes of a run, and later runs, skip the
checks. The core kinds:

    PAIR      prompt, chosen, rejected                    one preference pair
    LIST      prompt, responses [K], labels [K]           a ranked list (LiPO)
    TRL_ROW   prompt, chosen, rejected, images (optional) TRL's preference row, plain or conversational
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from mmalign import __version__
from mmalign.errors import BadRow, DataError
from mmalign.files import write_atomically
from mmalign.hub import is_repo_id, unreachable

MAX_REPORTED = 50
ALLOW_OUTSIDE_PATHS = "let data files name images/videos by absolute paths or paths outside their folder"
Mask = Any
"""A boolean Arrow array (or chunked array) over the rows; null counts as True."""


@dataclass(frozen=True)
class Field:
    """A record field and its check: `check(value, record)` returns a problem description or None; `suspects(column)`,
    a vectorised pre-check of the field's Arrow column, masks the rows `check` may flag (None from it, or no
    `suspects`: every row is checked)."""

    name: str
    check: Callable[[Any, dict], str | None]
    required: bool = True
    suspects: Callable[[pa.ChunkedArray], Mask | None] | None = None


@dataclass(frozen=True)
class RowCheck:
    """A check across fields returning (field, problem) pairs; `suspects(table)` as `Field.suspects`, over the table."""

    check: Callable[[dict], Iterable[tuple[str, str]]]
    suspects: Callable[[pa.Table], Mask | None] | None = None


@dataclass(frozen=True)
class Schema:
    """A kind of record: its fields, and checks across fields (`RowCheck`s, or plain checks run on every row)."""

    name: str
    fields: tuple[Field, ...]
    row_checks: tuple[RowCheck | Callable[[dict], Iterable[tuple[str, str]]], ...] = ()
    settings: str = ""
    """What else the checks depend on (the folder image paths must stay in), so `checked_marker` tells them apart."""


def is_text_type(kind: pa.DataType) -> bool:
    """An Arrow string type."""
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def list_lengths(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """The length of each row's list (0 for null), or None when the column is not a list column."""
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return None
    return pc.list_value_length(column).fill_null(0)


def missing(column: pa.ChunkedArray) -> Mask:
    """Rows whose value is null."""
    return pc.is_null(column)


def blank_text(column: pa.ChunkedArray) -> Mask | None:
    """Rows of a text column that are null or only whitespace; None for a column of another type."""
    if not is_text_type(column.type):
        return None
    return pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_trim_whitespace(column), ""))


def bad_messages(column: pa.ChunkedArray, content_must_be_text: bool = False) -> Mask | None:
    """Rows of a text column that are blank, or of a column of {'role', 'content'} message lists that are null, empty
    or hold a null message or role; None for columns of other types (or, with `content_must_be_text`, whose content
    is not text)."""
    if is_text_type(column.type):
        return blank_text(column)
    lengths = list_lengths(column)
    kind = column.type.value_type if lengths is not None else None
    if kind is None or not pa.types.is_struct(kind) or {"role", "content"} - {f.name for f in kind}:
        return None
    if content_must_be_text and not is_text_type(kind.field("content").type):
        return None
    messages = pc.list_flatten(column)
    bad = pc.or_kleene(pc.is_null(messages), pc.is_null(pc.struct_field(messages, "role")))
    if content_must_be_text:
        bad = pc.or_kleene(bad, blank_text(pc.struct_field(messages, "content")))
    return pc.or_kleene(pc.or_kleene(pc.is_null(column), pc.equal(lengths, 0)), rows_holding(column, bad))


def rows_holding(column: pa.ChunkedArray, elements: Mask) -> pa.Array:
    """The rows of a list column holding an element that `elements` (a mask over the flattened lists) marks."""
    rows = np.zeros(len(column), dtype=bool)
    marked = pc.fill_null(elements, True).to_numpy(zero_copy_only=False)
    rows[pc.list_parent_indices(column).to_numpy()[marked]] = True
    return pa.array(rows)


def any_of(*masks: Mask | None) -> Mask | None:
    """Rows any of `masks` flags; None (every row a suspect) when one of them is None."""
    return None if any(mask is None for mask in masks) else functools.reduce(pc.or_kleene, masks)

def not_number_list(column: pa.ChunkedArray) -> Mask | None:
    """Rows of a list-of-numbers column that are null, empty or hold a null; None for columns of other types."""
    lengths = list_lengths(column)
    if lengths is None or not (pa.types.is_integer(column.type.value_type)
                               or pa.types.is_floating(column.type.value_type)):
        return None
    return pc.or_kleene(pc.or_kleene(pc.is_null(column), pc.equal(lengths, 0)),
                        rows_holding(column, pc.is_null(pc.list_flatten(column))))


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
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value)):
        return "expected a non-empty list of numbers"
    return None


def _same_length(record: dict) -> Iterable[tuple[str, str]]:
    responses, labels = record.get("responses"), record.get("labels")
    if isinstance(responses, list) and isinstance(labels, list) and len(responses) != len(labels):
        yield "labels", f"has {len(labels)} entries for {len(responses)} responses"


def _unequal_lengths(table: pa.Table) -> Mask | None:
    responses, labels = (list_lengths(table.column(name)) for name in ("responses", "labels"))
    return None if responses is None or labels is None else pc.not_equal(responses, labels)


def _image_list(value: Any, record: dict) -> str | None:
    if value is None or isinstance(value, list):
        return None
    return f"expected a list of images, got {type(value).__name__}"


def not_list(column: pa.ChunkedArray) -> Mask | None:
    """No row of a list column (null or a list, as `_image_list` takes); None for columns of other types."""
    return None if list_lengths(column) is None else pa.array(np.zeros(len(column), dtype=bool))


PROMPT = Field("prompt", text_or_messages, suspects=bad_messages)
PAIR = Schema("pair", (PROMPT, Field("chosen", present, suspects=missing),
                       Field("rejected", present, suspects=missing)))
LIST = Schema("list", (PROMPT, Field("responses", present, suspects=missing),
                       Field("labels", number_list, suspects=not_number_list)),
              (RowCheck(_same_length, _unequal_lengths),))
TRL_ROW = Schema("TRL preference row", (
    PROMPT, Field("chosen", text_or_messages, suspects=bad_messages),
    Field("rejected", text_or_messages, suspects=bad_messages),
    Field("images", _image_list, required=False, suspects=not_list)))


def resolve_path(value: str | Path, root: Path, allow_outside: bool = False, where: str = "") -> Path:
    """A path named in a data file, resolved against the data's folder `root`; an absolute path, or one that leads
    out of `root` (`..`, a link), raises DataError naming `where` unless `allow_outside` (--allow-outside-paths)."""
    path = Path(value)
    resolved = path if path.is_absolute() else root / path
    if not allow_outside:
        inside = not path.is_absolute() and (resolved.resolve() == root.resolve()
                                             or root.resolve() in resolved.resolve().parents)
        if not inside:
            problem = "is an absolute path" if path.is_absolute() else f"is outside the data folder {root}"
            raise DataError(f"{where}: {str(value)!r} {problem}; data files name their images and videos by paths "
                            f"relative to their own folder ({root}); pass --allow-outside-paths to read it anyway")
    return resolved



def leaving_root(column: pa.ChunkedArray) -> Mask | None:
    """Rows of a column of media entries (paths, {'bytes', 'path'} structs, or lists of either) naming a path that is
    absolute or has a '..' part: those `resolve_path` may refuse (a link leading out is refused when it is read); None
    for a column of other types."""
    lists = list_lengths(column) is not None
    entries = pc.list_flatten(column) if lists else column
    kind = entries.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return pa.array(np.zeros(len(column), dtype=bool))
    if pa.types.is_struct(kind) and {"bytes", "path"} <= {f.name for f in kind}:
        data = pc.struct_field(entries, "bytes")
        paths = pc.if_else(pc.fill_null(pc.equal(pc.binary_length(data), 0), True), pc.struct_field(entries, "path"),
                           None)
    elif is_text_type(kind):
        paths = entries
    else:
        return None
    marked = pc.fill_null(pc.or_kleene(pc.starts_with(paths, "/"), pc.match_substring_regex(paths, r"(^|/)\.\.(/|$)")),
                          False)
    return rows_holding(column, marked) if lists else marked

def load_records(path: str | Path, split: str = "train") -> datasets.Dataset:
    """Records from a .jsonl/.json/.parquet file, a folder of them, a `save_to_disk` folder, or a hub dataset id."""
    path_str = str(path)
    path = Path(path)
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        if any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return _load_saved(path, split)
        for pattern in (f"*{split}*.parquet", "*.parquet", f"*{split}*.jsonl", "*.jsonl"):
            files = sorted(path.rglob(pattern))
            if files:
                return _concatenate(path, [_load_file(f) for f in files])
        raise DataError(f"{path}: folder holds no .parquet or .jsonl files and is not a saved `datasets` folder")
    if is_repo_id(path_str):
        return _load_hub(path_str, split)
    raise DataError(f"{path}: no such file or folder")


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    """A folder written by `save_to_disk`, or its `split` when it holds a DatasetDict."""
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as a saved `datasets` folder ({one_line(err)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; it has {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


def _concatenate(folder: Path, parts: list[datasets.Dataset]) -> datasets.Dataset:
    """The files of a folder as one dataset; files with different fields raise DataError."""
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as err:
        raise DataError(f"{folder}: its data files do not share the same fields ({one_line(err)})") from None


def _load_hub(repo_id: str, split: str) -> datasets.Dataset:
    """A split of a hub dataset; fails at once, with the reason, when the hub cannot provide it (`mmalign.hub`)."""
    from huggingface_hub import constants

    # offline, `datasets` looks in its own cache at once; online, ask the hub once instead of retrying for a minute
    problem = None if constants.HF_HUB_OFFLINE else unreachable(repo_id, "dataset", cached=("README.md",))
    if problem is None:
        try:
            return datasets.load_dataset(repo_id, split=split)
        except (OSError, ValueError) as err:
            problem = one_line(err)
    raise DataError(f"{repo_id}: no such file or folder here, and the hub dataset of that name cannot be loaded: "
                    f"{problem}")


def _load_file(path: Path) -> datasets.Dataset:
    """One .jsonl/.json or .parquet file; a file that cannot be read raises DataError naming it (and the line)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error log would repeat ours
    try:
        if suffix == ".parquet":
            records = datasets.Dataset.from_parquet(str(path))
        else:
            records = datasets.Dataset.from_json(str(path))
            records.data.validate(full=True)  # text that is not UTF-8 loads, and fails only when read
    except Exception as err:  # noqa: BLE001 - the readers fail in many types; the file is then diagnosed
        raise DataError(f"{path}: {_file_problem(path, err)}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    return records


def _file_problem(path: Path, err: BaseException) -> str:
    """What is wrong with a data file its reader failed on: its first bad line, emptiness, or the reader's error."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as parquet_err:  # noqa: BLE001 - pyarrow's error says what is wrong with the file
            return f"not a Parquet file ({one_line(parquet_err)})"
        return "holds no records" if rows == 0 else f"cannot be read ({one_line(err)})"
    return _json_problem(path) or f"cannot be read as JSON ({one_line(err)})"


def _json_problem(path: Path) -> str | None:
    """The first line of a JSON Lines (or JSON) file that is not a JSON object, or 'holds no records' when it holds
    only blank lines; None when every line parses. A file that is not UTF-8 raises DataError (`read_utf8`)."""
    text = read_utf8(path)
    if not text.strip():
        return "holds no records (it is empty or holds only blank lines)"
    if text.lstrip().startswith("["):  # one JSON document: a list of records
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}, column {err.colno}: not valid JSON ({err.msg})"
        if not isinstance(value, dict):
            return f"line {number}: expected a JSON object of fields, got {type(value).__name__}"
    return None


def read_utf8(path: Path) -> str:
    """The text of a file; one that is not UTF-8 raises DataError naming the file and the first bad line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte {raw[err.start]:#04x}); save the file as UTF-8 "
                        "(e.g. `iconv -f latin1 -t utf-8`)") from None


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened to `limit` characters (its type when it has no message)."""
    return " ".join(str(err).split())[:limit] or type(err).__name__


def listed(problems: list[tuple[int, str, str]]) -> str:
    """The lines "  record i, field 'name': problem" of the first MAX_REPORTED (record, field, problem), and how many
    more there are."""
    lines = [f"  record {i}, field '{name}': {problem}" for i, name, problem in problems[:MAX_REPORTED]]
    more = len(problems) - MAX_REPORTED
    return "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else "")

def validate(records: datasets.Dataset, schema: Schema, source: str) -> None:
    """Check every record against `schema`; raise DataError listing each bad record's index and field.

    Only the rows the vectorised pre-checks flag (`Field.suspects`, `RowCheck.suspects`) are checked one by one. In a
    run of several processes the main process checks first; a dataset that passed is marked by its fingerprint
    (`check_once`), and the others, or a later run, skip the checks."""
    columns = set(records.column_names)
    missing_fields = [f.name for f in schema.fields if f.required and f.name not in columns]
    if missing_fields:
        raise DataError(f"{source}: {schema.name} records need field(s) {', '.join(missing_fields)}; "
                        f"the data has {', '.join(sorted(columns)) or 'no fields'}")
    if len(records) == 0:
        raise DataError(f"{source}: no records")
    def check() -> None:
        start = time.perf_counter()
        problems = _problems(records, schema)
        if problems:
            raise DataError(f"{source}: {len(problems)} problem(s) in {schema.name} records; nothing was trained\n"
                            + listed(problems))
        print(f"{source}: {len(records)} {schema.name} records checked in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)

    checks = [(f.name, f.required, f.check.__qualname__) for f in schema.fields]
    checks += [("row", True, c.check.__qualname__) for c in row_checks(schema)]
    check_once(records, [schema.name, schema.settings, checks], check, source)


def check_once(records: datasets.Dataset, key: list, check: Callable[[], None], source: str) -> None:
    """Run `check` (which raises on a problem) on the main process first; records that passed it under `key` are
    marked (`checked_marker`), so that the other processes of a run, and later runs, do not run it again. Before the
    launch's processes have joined (no Trainer yet) every process checks for itself: joining here would fix the
    launch's state without the run's --cpu."""
    from accelerate.state import PartialState, is_initialized

    marker = checked_marker(records, key)
    with PartialState().main_process_first() if is_initialized() else contextlib.nullcontext():
        if marker is not None and marker.exists():
            return
        check()
        if marker is not None:
            write_atomically(marker, lambda tmp: tmp.write_text(json.dumps({"source": source,
                                                                            "records": len(records)})))


def _problems(records: datasets.Dataset, schema: Schema) -> list[tuple[int, str, str]]:
    """(record, field, problem) of every bad record: the suspects' rows checked one by one, in record order."""
    table = records.with_format("arrow")[:]
    checks = row_checks(schema)
    masks = [f.suspects(table.column(f.name)) if f.suspects else None for f in schema.fields
             if f.name in table.column_names]
    masks += [c.suspects(table) if c.suspects else None for c in checks]
    suspect = np.zeros(len(table), dtype=bool)
    for mask in masks:
        suspect |= True if mask is None else pc.fill_null(mask, True).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(suspect)
    return [(index, field, problem) for index, record in zip(rows.tolist(), records.select(rows))
            for field, problem in record_problems(record, schema, checks)]


def record_problems(record: dict, schema: Schema, checks: list[RowCheck]) -> list[tuple[str, str]]:
    """(field, problem) of each check of `schema` (its fields', then the row `checks`) that one record fails."""
    problems = [(f.name, "is missing") for f in schema.fields if f.required and f.name not in record]
    problems += [(f.name, problem) for f in schema.fields if f.name in record
                 for problem in [f.check(record[f.name], record)] if problem]
    return problems + [found for check in checks for found in check.check(record)]


def row_checks(schema: Schema) -> list[RowCheck]:
    """The schema's row checks, each as a `RowCheck` (a plain check has no suspects: it checks every row)."""
    return [c if isinstance(c, RowCheck) else RowCheck(c) for c in schema.row_checks]


def checked_marker(records: datasets.Dataset, key: list) -> Path | None:
    """The file beside the records' cache that says they passed the checks `key` names (e.g. a schema's fields,
    checks and settings): named by the records' fingerprint, `key` and this mmalign's version; None for records without
    a cache file (in memory)."""
    if not records.cache_files:
        return None
    digest = hashlib.sha256(json.dumps([records._fingerprint, key, __version__], default=str).encode())
    return Path(records.cache_files[0]["filename"]).parent / f"mmalign-checked-{digest.hexdigest()[:20]}.json"

SKIP_LIMIT = 100
"""Rows in a row that `Guarded` tries under --bad-rows skip: when none of them loads, the data is broken, not a row."""


class Guarded(torch.utils.data.Dataset):
    """`dataset[i]` as (item, the `BadRow`s met loading it): a bad row is returned, not raised, so that it reaches the
    training loop from a worker process too. With `skip` the rows after it are tried in turn until one loads (a batch
    keeps its size, and the choice is the same on resume), SKIP_LIMIT rows at most; without, or when none of them
    loads, the item is None."""

    def __init__(self, dataset: Any, skip: bool):
        self.dataset, self.skip = dataset, skip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, list[BadRow]]:
        bad: list[BadRow] = []
        for offset in range(min(len(self.dataset), SKIP_LIMIT) if self.skip else 1):
            try:
                return self.dataset[(index + offset) % len(self.dataset)], bad
            except BadRow as err:
                bad.append(err)
        return None, bad


def collate_guarded(collate: Callable[[list], Any], items: list[tuple[Any, list[BadRow]]], drop: bool = False
                    ) -> tuple[Any, list[BadRow]]:
    """A batch of `Guarded` items as (`collate` of the items, or None when one is missing, or with `drop` when all
    are, the missing ones left out; the bad rows met)."""
    loaded = [item for item, _ in items if item is not None or not drop]
    bad = [row for _, rows in items for row in rows]
    return (None if not loaded or any(item is None for item in loaded) else collate(loaded)), bad


def read_once(dataset: Any, collate: Callable[[list], Any], batch_size: int, workers: int = 0, desc: str = "read",
              stop: bool = False) -> Iterator[tuple[Any, list[BadRow]]]:
    """Every row of `dataset` once, in order, read in `workers` processes with a progress bar: per `batch_size` rows,
    (`collate` of those that load, None when none does; the `BadRow`s met). With `stop` (--bad-rows error, in a pass
    before training such as a cache) the first bad row raises a DataError naming it."""
    loader = torch.utils.data.DataLoader(Guarded(dataset, skip=False), batch_size=batch_size, num_workers=workers,
                                         collate_fn=functools.partial(collate_guarded, collate, drop=True))
    with tqdm(total=len(dataset), desc=desc, unit="row", leave=False) as progress:
        for batch, bad in loader:
            if stop and bad:
                raise DataError(f"{bad[0]}; met while {desc}, before training: nothing was trained. Fix or remove "
                                "the row (`mmalign data check` lists every bad row), or pass --bad-rows skip to train "
                                "without it")
            progress.update(min(batch_size, progress.total - progress.n))
            yield batch, bad


def load_preferences(path: str | Path, schema: Schema, split: str = "train") -> datasets.Dataset:
    """Load records and validate all of them up front (see `validate`)."""
    records = load_records(path, split)
    validate(records, schema, source=str(path))
    return records
