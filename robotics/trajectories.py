"""A set of equal-length trajectories of one task, on disk as one `.npz` file, and fragments of them.

Arrays (N trajectories of T steps):

    observations [N, T, 39] float32  the observation each action was taken in (Meta-World's 39 features)
    actions      [N, T, 4]  float32
    rewards      [N, T]     float32  Meta-World's dense reward (the true reward of every evaluation)
    successes    [N, T]     bool     Meta-World's success flag after each step
    frames       [N, F, H, W, 3] uint8, optional: rendered every `frame_every` steps (F = ceil(T / frame_every))
    info.<key>   [N]        per-trajectory columns: initial_state, noise, policy, source, start, ...

plus a JSON header (`meta`: task, frame_every, anything the producer records). Loading checks every
array before anything uses it (a cut-off or empty file, a missing field, text instead of numbers,
mismatched lengths, NaN); problems name the file, the field and the trajectory. Saving writes
a temporary file next to the target and renames it, so an interrupted write leaves the old file whole.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.npyio import NpzFile

from mmalign.data import DataError
from mmalign.files import write_npz

from .envs import ACTION_SIZE, OBSERVATION_SIZE, check_task

REQUIRED = ("observations", "actions", "rewards", "successes")
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)  # what np.load raises on a bad file


@dataclass
class Trajectories:
    """N equal-length trajectories of `task` (see the module docstring for the fields)."""

    task: str
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    successes: np.ndarray
    frames: np.ndarray | None = None
    info: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "trajectories"

    def __post_init__(self) -> None:
        self.observations = np.asarray(self.observations, dtype=np.float32)
        self.actions = np.asarray(self.actions, dtype=np.float32)
        self.rewards = np.asarray(self.rewards, dtype=np.float32)
        self.successes = np.asarray(self.successes, dtype=bool)
        self.info = {k: np.asarray(v) for k, v in self.info.items()}
        self.validate()

    def validate(self) -> None:
        """Raise DataError naming the source, field and trajectory of the first problems found."""
        try:
            check_task(self.task)
        except ValueError as err:
            raise DataError(f"{self.source}: field 'task': {err}") from None
        for check in (self._layout_problems, self._shape_problems, self._finite_problems):
            problems = check()
            if problems:
                raise _error(self.source, problems)

    def _layout_problems(self) -> list[tuple[str, str]]:
        """Observations [N, T, 39] and actions [., ., 4] (Meta-World's sizes) with N and T at least 1."""
        problems = []
        for name, size in (("observations", OBSERVATION_SIZE), ("actions", ACTION_SIZE)):
            shape = getattr(self, name).shape
            if len(shape) != 3:
                problems.append((name, f"expected [N, T, {size}], got shape {shape}"))
            elif shape[-1] != size:
                problems.append((name, f"expected {size} features per step (Meta-World's), got shape {shape}"))
        if not problems and 0 in self.observations.shape[:2]:
            problems.append(("observations", f"no {'trajectories' if len(self) == 0 else 'steps'} (shape "
                                             f"{self.observations.shape})"))
        every = self.meta.get("frame_every", 1)
        if not isinstance(every, Integral) or isinstance(every, bool) or every < 1:
            problems.append(("meta.frame_every", f"expected a whole number of steps >= 1, got {every!r}"))
        return problems

    def _shape_problems(self) -> list[tuple[str, str]]:
        """Every other array's leading dimensions against observations [N, T]."""
        problems = []
        n, t = self.observations.shape[:2]
        for name in ("actions", "rewards", "successes"):
            shape = getattr(self, name).shape
            if shape[:2] != (n, t) or (name != "actions" and len(shape) != 2):
                expected = "[N, T, A]" if name == "actions" else "[N, T]"
                problems.append((name, f"shape {shape} does not match observations {self.observations.shape} "
                                       f"(expected {expected} with N={n}, T={t})"))
        if self.frames is not None:
            every = self.meta.get("frame_every", 1)
            want = (n, -(-t // every))
            if self.frames.ndim != 5 or self.frames.shape[:2] != want or self.frames.shape[-1] != 3:
                problems.append(("frames", f"expected [N, F, H, W, 3] with N={n}, F={want[1]} (T={t}, frame_every="
                                           f"{every}), got shape {self.frames.shape}"))
            elif self.frames.dtype != np.uint8:
                problems.append(("frames", f"expected uint8 pixels, got {self.frames.dtype}"))
        for key, column in self.info.items():
            if column.shape[:1] != (n,):
                problems.append((f"info.{key}", f"expected {n} entries (one per trajectory), got shape {column.shape}"))
        return problems

    def _finite_problems(self) -> list[tuple[str, str]]:
        """NaN or infinite observations, actions or rewards, with the first trajectories and steps that hold them."""
        problems = []
        for name in ("observations", "actions", "rewards"):
            array = getattr(self, name)
            if not np.isfinite(array).all():
                bad = np.argwhere(~np.isfinite(array.reshape(array.shape[0], array.shape[1], -1)))[:3]
                where = ", ".join(f"trajectory {i} step {s}" for i, s, _ in bad)
                problems.append((name, f"{(~np.isfinite(array)).sum()} NaN or infinite value(s), first at {where}"))
        return problems

    def __len__(self) -> int:
        return self.observations.shape[0]

    @property
    def horizon(self) -> int:
        """T, the number of steps of every trajectory."""
        return self.observations.shape[1]

    def returns(self) -> np.ndarray:
        """The true return sum_t r_t of each trajectory [N]."""
        return self.rewards.sum(axis=1)

    def success(self) -> np.ndarray:
        """Whether each trajectory succeeded at any step [N]."""
        return np.any(self.successes, axis=1)

    def select(self, indices) -> Trajectories:
        """The trajectories at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return Trajectories(self.task, self.observations[indices], self.actions[indices], self.rewards[indices],
                            self.successes[indices], None if self.frames is None else self.frames[indices],
                            {k: v[indices] for k, v in self.info.items()}, dict(self.meta), self.source)

    def fragment(self, length: int, num: int, seed: int = 0) -> Trajectories:
        """`num` segments of `length` steps, each from a random trajectory at a random start (info: source, start).

        Frames are not carried into segments; segments keep their trajectory's other info columns.
        """
        if not 1 <= length <= self.horizon:
            raise ValueError(f"segment length must be between 1 and the horizon {self.horizon}, got {length}")
        if num < 1:
            raise ValueError(f"the number of segments must be at least 1, got {num}")
        rng = np.random.default_rng(seed)
        source = rng.integers(len(self), size=num)
        start = rng.integers(self.horizon - length + 1, size=num)
        steps = start[:, None] + np.arange(length)
        rows = source[:, None]
        info = {k: v[source] for k, v in self.info.items() if k not in ("source", "start")}
        return Trajectories(self.task, self.observations[rows, steps], self.actions[rows, steps],
                            self.rewards[rows, steps], self.successes[rows, steps], None,
                            {**info, "source": source, "start": start},
                            {**self.meta, "segment_length": length, "frame_every": 1}, self.source)

    def save(self, path: str | Path) -> Path:
        """Write all arrays and the header to one .npz file, atomically (temporary file, then rename)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"{path}: trajectory files end in .npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in REQUIRED}
        if self.frames is not None:
            arrays["frames"] = self.frames
        arrays.update({f"info.{k}": v for k, v in self.info.items()})
        arrays["meta"] = np.array(json.dumps({**self.meta, "task": self.task}))
        return write_npz(path, arrays)

    @classmethod
    def load(cls, path: str | Path) -> Trajectories:
        """Read and validate a file written by `save` (errors name the file and field)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"trajectory file {path} does not exist")
        arrays = _read_npz(path)
        _check_arrays(path, arrays)
        try:
            meta = json.loads(str(arrays.pop("meta")))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: field 'meta' is not JSON ({err})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("task"), str):
            raise DataError(f"{path}: field 'meta' must be a JSON object with a 'task' name")
        info = {k[len("info."):]: arrays.pop(k) for k in list(arrays) if k.startswith("info.")}
        return cls(meta.pop("task"), **{k: arrays[k] for k in REQUIRED}, frames=arrays.get("frames"), info=info,
                   meta=meta, source=str(path))


def _read_npz(path: Path) -> dict[str, Any]:
    """Every entry of an .npz file (arrays, or raw bytes for a member that is not one), nothing unpickled."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes), not a .npz trajectory file")
    try:
        data = np.load(path, allow_pickle=False)
    except NPZ_ERRORS as err:
        raise _unreadable(path, err) from None
    if not isinstance(data, NpzFile):
        raise DataError(f"{path}: holds a single .npy array, not the named arrays of a .npz trajectory file")
    with data:
        try:
            return {k: data[k] for k in data.files}
        except NPZ_ERRORS as err:
            raise _unreadable(path, err) from None


def _unreadable(path: Path, err: BaseException) -> DataError:
    """The error for a file np.load cannot read; a broken zip is most often one cut off while written or copied."""
    cut = isinstance(err, (zipfile.BadZipFile, EOFError, zlib.error))
    return DataError(f"{path}: not a readable .npz trajectory file ({err or type(err).__name__})"
                     + ("; was it cut off while being written or copied?" if cut else ""))


def _check_arrays(path: Path, arrays: dict[str, Any]) -> None:
    """Raise DataError for missing fields and entries that are not arrays of the kind each field holds."""
    missing = [k for k in (*REQUIRED, "meta") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing field(s) {', '.join(missing)}; it has {', '.join(sorted(arrays)) or 'none'}")
    kinds = {name: ("numbers", "biuf") for name in REQUIRED}
    kinds.update({"frames": ("uint8 pixels", "u"), "meta": ("a JSON string", "U")})
    kinds.update({name: ("an array", "biufUS") for name in arrays if name.startswith("info.")})
    problems = [(name, f"expected {what}, got {_describe(arrays[name])}") for name, (what, codes) in kinds.items()
                if name in arrays and not (isinstance(arrays[name], np.ndarray) and arrays[name].dtype.kind in codes)]
    if problems:
        raise _error(str(path), problems)


def _describe(value: Any) -> str:
    return f"an array of {value.dtype}" if isinstance(value, np.ndarray) else "bytes that are not a .npy array"


def concatenate(parts: list[Trajectories]) -> Trajectories:
    """One set from several of the same task and horizon (frames kept only when every part has them)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    for part in parts[1:]:
        if part.task != first.task or part.observations.shape[1:] != first.observations.shape[1:]:
            raise DataError(f"{part.source}: cannot join {part.task} trajectories of shape {part.observations.shape} "
                            f"to {first.task} trajectories of shape {first.observations.shape}")
    keys = set.intersection(*(set(p.info) for p in parts))
    frames = None if any(p.frames is None for p in parts) else np.concatenate([p.frames for p in parts])
    return Trajectories(first.task, **{k: np.concatenate([getattr(p, k) for p in parts]) for k in REQUIRED},
                        frames=frames, info={k: np.concatenate([p.info[k] for p in parts]) for k in sorted(keys)},
                        meta=dict(first.meta), source=first.source)


def _error(source: str, problems: list[tuple[str, str]]) -> DataError:
    """One DataError listing every (field, problem) of `source`."""
    lines = "\n".join(f"  field '{name}': {problem}" for name, problem in problems)
    return DataError(f"{source}: {len(problems)} problem(s) in the trajectories\n{lines}")
