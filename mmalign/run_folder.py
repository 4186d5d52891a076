"""One run per output folder: `check(folder, resuming)` before anything is loaded, `acquire`/`claim` before writing.

A run folder is marked by its lock file `.mmalign.lock`. While a run writes, it holds an exclusive `flock` on
that file (the kernel drops it when the process ends, kill -9 included), so a second run on the same folder
stops at once instead of interleaving its metrics and weights with the first. A new run needs an empty or
absent folder; `--resume` needs an empty folder or one that holds a run. Everything under a folder this
process holds belongs to its run (a command's stages and nested trainers write there freely).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from mmalign.errors import RunFolderError
from mmalign.files import follow_umask

LOCK_FILE = ".mmalign.lock"
RUN_MARKERS = (LOCK_FILE, "config.yaml", "checkpoints")
_held: dict[Path, IO[str]] = {}


def held(folder: str | Path) -> bool:
    """Whether this process holds `folder` or a folder above it."""
    folder = Path(folder).resolve()
    return any(folder == root or root in folder.parents for root in _held)


def check(folder: str | Path, resuming: bool, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a folder this run may not write: a file, a non-empty folder for a new run, a non-run folder to resume."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--output {folder} is a file, not a folder")
    if held(folder):
        return
    entries = sorted(p.name for p in folder.iterdir() if p.name not in ignore) if folder.is_dir() else []
    if not entries:
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not resuming:
        raise RunFolderError(f"--output {folder} is not empty (it holds {shown}); every run writes into a folder of "
                             "its own: choose a new --output, or pass --resume latest to continue the run in it")
    if not any(name in entries for name in RUN_MARKERS):
        raise RunFolderError(f"--output {folder} holds files ({shown}) but no mmalign run (no {LOCK_FILE}, "
                             "config.yaml or checkpoints/); nothing there is resumed or replaced: choose another "
                             "--output")


class Lock:
    """This process's hold on a run folder (a no-op inside a folder it already holds); `release` lets it go."""

    def __init__(self, folder: Path, handle: IO[str] | None = None, new_lock: bool = False,
                 new_folders: tuple[Path, ...] = ()):
        self.folder, self.handle, self.new_lock, self.new_folders = folder, handle, new_lock, new_folders

    def release(self, clean: bool = False) -> None:
        """Let the folder go; with `clean`, first remove the lock file and the folders this lock created if nothing
        else was written into them (a run that stopped before writing leaves nothing behind)."""
        if self.handle is None:
            return
        _held.pop(self.folder.resolve(), None)
        follow_umask(self.folder)
        if clean and self.new_lock and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            (self.folder / LOCK_FILE).unlink()
            for path in reversed(self.new_folders):
                if not any(path.iterdir()):
                    path.rmdir()
        self.handle.close()
        self.handle = None


def acquire(folder: str | Path, resuming: bool) -> Lock:
    """Create the folder, take its lock and check it again under the lock (see `check`).

    Raises RunFolderError when the folder is not this run's to write (a lock file made by this call is removed
    again) or another process holds the lock. In a launch of several processes only the first (RANK 0) takes it."""
    folder = Path(folder)
    if int(os.environ.get("RANK", "0")) != 0:
        return Lock(folder)
    if held(folder):
        folder.mkdir(parents=True, exist_ok=True)
        return Lock(folder)
    check(folder, resuming)  # before anything is made; again below, under the lock
    lock = folder / LOCK_FILE
    new_lock = not lock.exists()
    new_folders = tuple(p for p in (*reversed(folder.parents), folder) if not p.exists())
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderError(f"--output {folder} is in use by another run ({holder}); wait for it to finish or "
                             "choose another --output") from None
    try:
        check(folder, resuming, ignore=(LOCK_FILE,) if new_lock else ())
    except RunFolderError:
        if new_lock:
            lock.unlink()
        handle.close()
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    _held[folder.resolve()] = handle
    return Lock(folder, handle, new_lock, new_folders)


@contextlib.contextmanager
def claim(folder: str | Path, resuming: bool) -> Iterator[Lock]:
    """`acquire` for the length of a command; if it fails before writing anything, nothing of it is left."""
    lock = acquire(folder, resuming)
    try:
        yield lock
    except BaseException:
        lock.release(clean=True)
        raise
    lock.release()
