"""Files written so that a reader never sees half of one: write aside, flush, rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Let ``write`` fill a temporary file next to ``path``, flush it, and rename it to ``path``."""
    tmp = private_sibling(path, "tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def private_sibling(path: Path, suffix: str) -> Path:
    """A hidden name beside ``path`` that no other process or call will use.

    ``.<name>.<pid>-<random>.<suffix>``: the process id says who made it, so leftovers of a
    process that died can be told from files still being written. A unique name rather than
    mkstemp, so that the file gets the usual (umask) permissions.
    """
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.{suffix}")


def sibling_owner(path: Path) -> int | None:
    """The process id in a name that ``private_sibling`` made, or None for any other name."""
    parts = path.name.rsplit(".", 2)
    pid = parts[1].partition("-")[0] if len(parts) == 3 else ""
    return int(pid) if pid.isdigit() else None


def remove_path(path: Path) -> None:
    """Delete a file, a link or a folder tree; nothing if it is already gone."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def fsync_folder(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


__all__ = [
    "atomic_write",
    "fsync_file",
    "fsync_folder",
    "private_sibling",
    "remove_path",
    "sibling_owner",
]
