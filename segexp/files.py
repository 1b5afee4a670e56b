"""Writing files so a reader sees all of a file or none: write beside it, then rename into place.

A rename within one folder is atomic on POSIX file systems: a concurrent reader (another sweep
job, a resumed run) finds the old file, the new one or none, never a half-written one, and a
process killed mid-write leaves the old file as it was. `file_lock` serializes what must not run
at once (a fresh store's migration, a speed probe).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, publish: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` to write to; `os.replace`d onto `path` when the block ends.

    The name is unique per process (parallel writers of one file do not mix their bytes) and
    ends in `.tmp`: writers that add a suffix to a path (`np.save`) should be handed a file
    object. If the block raises, the temporary file is removed and `path` stays as it was.
    `publish=False` moves nothing (a DDP rank whose checkpoint call writes nothing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if publish:
            os.replace(tmp, path)
    finally:
        if tmp.is_file():  # the block failed, or nothing was published
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_path`)."""
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside `path` to fill; renamed to `path` when the block ends.

    A `path` already in place is kept (another writer finished it first: its files are as
    complete as these) and the temporary folder is removed, as it is when the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, path)
    except OSError:  # a non-empty folder is in place
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(path: str | Path, option: str, folder: bool = False) -> Path:
    """`path`, or a ValueError naming `option` where no file (`folder`: folder) can be written.

    Checked before any work, so a bad `--out` fails in a second rather than after inference or
    training. For a missing path, its nearest existing parent must be a writable folder (the
    missing folders are made when written).
    """
    path, kind = Path(path), "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        other = "file" if folder else "folder"
        raise ValueError(f"{option} {path} is a {other}, not a {kind}")
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir() and existing != path:
        raise ValueError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        raise ValueError(f"{option} {path}: {existing} is read-only")
    return path


@contextlib.contextmanager
def output_to(path: str | Path) -> Iterator[Path]:
    """This process's stdout and stderr (file descriptors 1 and 2, so libraries' too) into `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield path
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created), held for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
