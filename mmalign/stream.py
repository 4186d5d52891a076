"""Training data read lazily (`--streaming`): a hub dataset streamed, or a folder's Parquet/JSONL shards read in turn.

Nothing is read before training but the first record (its fields are checked against the schema); every other record
is checked when it is read, and one that fails, or whose media cannot be loaded, is a `BadRow` (`--bad-rows`: the run
stops naming it, or the batch goes on without it). Epoch e reads the records in the order of `shuffle(seed, buffer)`
at epoch e, each process its own part (`datasets.distributed.split_dataset_by_node`: whole shards when their number
divides by the processes, else every P-th record). Micro-step k of a process is batch k of its part, so a run resumed
at step s reads its part again from the start without decoding anything and skips the first s x accumulation batches:
the same batches as an uninterrupted run, with nothing stored but the step. With `--num-workers W` > 0 the main process
reads the records and W worker processes load (decode) whole batches, several ahead, in order.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets.distributed import split_dataset_by_node

from mmalign.config import option
from mmalign.data import Schema, record_problems, row_checks
from mmalign.errors import BadRow, ConfigError, DataError
from mmalign.hub import is_repo_id

SHUFFLE_SEED_STRIDE = 100_003  # as the trainer's epochs: seed s shuffles with s * stride (set_epoch adds the epoch)
PREFETCH = 2  # batches loading ahead per worker
Loaded = tuple[Any, list[BadRow]]
"""A batch as (the collated items that loaded, or None when none did; the `BadRow`s met)."""


@dataclass
class StreamOptions:
    """The options of a trainer that can read its data as training goes."""

    streaming: bool = option(False, "read --data as training goes (a hub dataset streamed, a folder's Parquet/JSONL "
                                    "files in turn), each row checked when read: start-up does not grow with the data")
    shuffle_buffer: int = option(1000, "--streaming: rows are shuffled within a buffer of this many (1: stored order)")


def open_stream(path: str | Path, split: str = "train") -> datasets.IterableDataset:
    """Records of a .parquet/.jsonl file, a folder of them (each file a shard), or a hub dataset id, read lazily;
    media columns are left undecoded (bytes or paths), as the loaders read them."""
    path = Path(path)
    if path.is_file() or path.is_dir():
        files = [path] if path.is_file() else []
        for pattern in (f"*{split}*.parquet", "*.parquet", f"*{split}*.jsonl", "*.jsonl"):
            files = files or sorted(path.rglob(pattern))
        if not files:
            raise DataError(f"{path}: folder holds no .parquet or .jsonl files to stream")
        kinds = {f.suffix.lower() for f in files}
        if len(kinds) > 1 or not kinds <= {".parquet", ".jsonl", ".json"}:
            raise DataError(f"{path}: streams .parquet or .jsonl files of one kind; found {', '.join(sorted(kinds))}")
        builder = "parquet" if kinds == {".parquet"} else "json"
        records = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
    elif is_repo_id(str(path)):
        try:
            records = datasets.load_dataset(str(path), split=split, streaming=True)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: the hub dataset of that name cannot be streamed: {err}") from None
    else:
        raise DataError(f"{path}: no such file or folder")
    return records.decode(False)


class Stream:
    """Records read lazily (`open_stream`), checked against `schema` as they come; `keep(record)` says which to train
    on (e.g. no ties), `load(record, row)` turns one into a training item (raising `BadRow` when its media cannot be
    read). Row r is the r-th kept record of a process's part, counted across epochs."""

    def __init__(self, path: str | Path, schema: Schema, load: Callable[[dict, int], Any],
                 keep: Callable[[dict], bool] = lambda record: True, split: str = "train", shuffle_buffer: int = 1000):
        if shuffle_buffer < 1:
            raise ConfigError(f"--shuffle-buffer {shuffle_buffer}: must be at least 1")
        self.source, self.schema, self.load, self.keep = str(path), schema, load, keep
        self.shuffle_buffer, self.checks = shuffle_buffer, row_checks(schema)
        self.records = open_stream(path, split)
        first = next(iter(self.records), None)
        if first is None:
            raise DataError(f"{path}: no records")
        missing = [f.name for f in schema.fields if f.required and f.name not in first]
        if missing:
            raise DataError(f"{path}: {schema.name} records need field(s) {', '.join(missing)}; the data has "
                            f"{', '.join(sorted(first)) or 'no fields'}")

    def first(self, count: int) -> list[dict]:
        """The first `count` kept records, in stored order (e.g. the captions of sample grids)."""
        return list(itertools.islice(filter(self.keep, self.records), count))

    def rows(self, seed: int, rank: int = 0, processes: int = 1) -> Iterator[tuple[int, dict]]:
        """(row, record) of this process's part, epoch after epoch, each epoch shuffled anew."""
        part = split_dataset_by_node(self.records, rank, processes)
        if self.shuffle_buffer > 1:
            part = part.shuffle(seed=seed * SHUFFLE_SEED_STRIDE, buffer_size=self.shuffle_buffer)
        row = 0
        for epoch in itertools.count():
            part.set_epoch(epoch)
            start = row
            for record in part:
                if self.keep(record):
                    yield row, record
                    row += 1
            if row == start:
                raise DataError(f"{self.source}: process {rank} of {processes} has no record to train on")

    def load_batch(self, collate: Callable[[list], Any], rows: list[tuple[int, dict]], skip: bool) -> Loaded:
        """The batch of these rows: each checked and loaded; a bad row ends the batch (without `skip`) or is left
        out of it."""
        items, bad = [], []
        for row, record in rows:
            try:
                problems = record_problems(record, self.schema, self.checks)
                if problems:
                    raise BadRow(self.source, row, *problems[0])
                items.append(self.load(record, row))
            except BadRow as err:
                bad.append(err)
                if not skip:
                    return None, bad
        return (collate(items) if items else None), bad

    def batches(self, collate: Callable[[list], Any], batch_size: int, start: int, seed: int, rank: int = 0,
                processes: int = 1, workers: int = 0, skip: bool = False) -> Iterator[Loaded]:
        """Batch k, k+1, ... (k = `start`) of this process's part, loaded in `workers` processes when > 0."""
        rows = self.rows(seed, rank, processes)
        groups = iter(lambda: list(itertools.islice(rows, batch_size)), None)  # never empty: rows never end
        todo = itertools.islice(groups, start, None)
        if workers == 0:
            yield from (self.load_batch(collate, group, skip) for group in todo)
            return
        with multiprocessing.get_context("fork").Pool(workers, _set_loader, (self, collate, skip)) as pool:
            ahead = collections.deque(pool.apply_async(_load_in_worker, (group,))
                                      for group in itertools.islice(todo, PREFETCH * workers))
            while True:
                ahead.append(pool.apply_async(_load_in_worker, (next(todo),)))
                yield ahead.popleft().get()


_loader: tuple[Stream, Callable[[list], Any], bool] | None = None


def _set_loader(stream: Stream, collate: Callable[[list], Any], skip: bool) -> None:
    global _loader
    _loader = (stream, collate, skip)


def _load_in_worker(rows: list[tuple[int, dict]]) -> Loaded:
    assert _loader is not None  # set by the pool's initializer
    stream, collate, skip = _loader
    return stream.load_batch(collate, rows, skip)
