"""Durable files: what a crash-safe write does after writing, before it renames or marks anything complete.

`fsync_path` flushes a file's data, or a directory's entries (a rename into it, a new file in it), to disk.
Callers write into a temporary place, fsync what they wrote, then rename it into place (the model cache,
checkpoints). It does not write or rename anything itself.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync the file or directory at `path` (opened read-only: a directory cannot be opened for writing)."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
