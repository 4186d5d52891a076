"""Preference pairs over segments, stored as the core's pair records (JSON lines), and their torch dataset.

One record per pair, the core `PAIR` fields plus a label:

    {"prompt": "button-press-v3", "chosen": 12, "rejected": 40, "label": 1.0, "teacher": "oracle"}

`chosen`/`rejected` index the segments of a trajectory file; `label` = P(chosen preferred) in [0, 1]
(1: a hard label, 0.5: equally preferred, in between: a soft label such as PEARL's transferred ones).
Loading checks that every line is a JSON object (errors name the line), then validates every record
with the core's `validate` (errors name the file, record and field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mmalign.data import PAIR, DataError, Field, Schema, load_preferences
from mmalign.files import write_atomically

from .teachers import Teacher
from .trajectories import Trajectories


def _probability(value: Any, record: dict) -> str | None:
    if not isinstance(value, Real) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        return f"expected a probability in [0, 1], got {value!r}"
    return None


def _index(value: Any, size: int) -> bool:
    """Whether `value` is a whole number in [0, size) (3.0 too: a column of JSON numbers may load as floats)."""
    whole = isinstance(value, Integral) or (isinstance(value, Real) and float(value).is_integer())
    return whole and not isinstance(value, bool) and 0 <= value < size


def pair_schema(num_segments: int) -> Schema:
    """The core PAIR record plus `label`, with chosen/rejected distinct segment indices below `num_segments`."""
    def indices(record: dict):
        for name in ("chosen", "rejected"):
            value = record.get(name)
            if value is not None and not _index(value, num_segments):  # a missing index is reported by PAIR
                yield name, f"expected a segment index in [0, {num_segments}), got {value!r}"
        if record.get("chosen") == record.get("rejected"):
            yield "rejected", "is the same segment as chosen"
    return Schema("robot preference pair", PAIR.fields + (Field("label", _probability),), (indices,))


@dataclass
class Pairs:
    """Preference pairs of one task: segment indices and P(chosen preferred)."""

    task: str
    chosen: np.ndarray
    rejected: np.ndarray
    label: np.ndarray
    teacher: str = ""

    def __len__(self) -> int:
        return len(self.chosen)

    def save(self, path: str | Path) -> Path:
        """Write JSON lines atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = ({"prompt": self.task, "chosen": int(c), "rejected": int(r), "label": float(p), "teacher": self.teacher}
                for c, r, p in zip(self.chosen, self.rejected, self.label))
        return write_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in rows)))

    @classmethod
    def load(cls, path: str | Path, segments: Trajectories) -> Pairs:
        """Read and validate pair records against the segments they index (DataError names the line or record)."""
        check_json_lines(path)
        records = load_preferences(path, pair_schema(len(segments)))
        tasks = set(records["prompt"])
        if tasks != {segments.task}:
            raise DataError(f"{path}: field 'prompt': the pairs are of task(s) {', '.join(sorted(map(str, tasks)))}, "
                            f"the segments they index ({segments.source}) of {segments.task}")
        teacher = records["teacher"][0] if "teacher" in records.column_names else ""
        return cls(segments.task, np.asarray(records["chosen"], dtype=np.int64),
                   np.asarray(records["rejected"], dtype=np.int64),
                   np.asarray(records["label"], dtype=np.float32), teacher)


def check_json_lines(path: str | Path) -> None:
    """DataError naming the first line of a JSON-lines file that is not a JSON object, or the file if it has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair file {path} does not exist")
    records = 0
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path}: line {number} is not JSON ({err}); each line holds one pair record") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} holds a {type(record).__name__}, not a pair record (a JSON object)")
        records += 1
    if not records:
        raise DataError(f"{path}: no pair records (the file is empty)")


def label_pairs(segments: Trajectories, num_pairs: int, teacher: Teacher, seed: int = 0, name: str = "") -> Pairs:
    """Draw `num_pairs` random pairs of distinct segments and label them; skipped pairs are left out."""
    if len(segments) < 2:
        raise ValueError(f"{segments.source}: at least 2 segments are needed to make pairs, got {len(segments)}")
    rng = np.random.default_rng(seed)
    a = rng.integers(len(segments), size=num_pairs)
    b = (a + rng.integers(1, len(segments), size=num_pairs)) % len(segments)
    scale = float(segments.returns().mean())
    p_b = teacher.label(segments.rewards[a], segments.rewards[b], rng, scale=scale)
    return labelled_pairs(segments.task, a, b, p_b, name)


def labelled_pairs(task: str, a: np.ndarray, b: np.ndarray, p_b: np.ndarray, name: str = "") -> Pairs:
    """Pairs from a teacher's P(b preferred) per pair of segment indices (a, b); skipped (NaN) pairs are left out."""
    keep = ~np.isnan(p_b)
    a, b, p_b = a[keep], b[keep], p_b[keep]
    b_wins = p_b >= 0.5
    chosen, rejected = np.where(b_wins, b, a), np.where(b_wins, a, b)
    return Pairs(task, chosen, rejected, np.maximum(p_b, 1 - p_b).astype(np.float32), name)


class SegmentArrays(Protocol):
    """What a reward model learns from: observations [N, L, D] and actions [N, L, A] of N segments (Trajectories)."""

    observations: np.ndarray
    actions: np.ndarray


class PairDataset(torch.utils.data.Dataset):
    """Item i: observations and actions of pair i's chosen (w) and rejected (l) segments, and its label."""

    def __init__(self, segments: SegmentArrays, pairs: Pairs):
        self.obs = torch.from_numpy(segments.observations)
        self.act = torch.from_numpy(segments.actions)
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        winner, loser = int(self.pairs.chosen[i]), int(self.pairs.rejected[i])
        return {"obs_w": self.obs[winner], "act_w": self.act[winner],
                "obs_l": self.obs[loser], "act_l": self.act[loser],
                "label": torch.tensor(float(self.pairs.label[i]))}
