"""Atomic file writing: output appears complete or not at all, and existing output is never corrupted.

The temporary file is flushed to disk (``fsync``) before it is renamed over the target, and the folder after, so a
power cut leaves either the old file or the new one, never an empty or half-written file under the target's name.
A process killed while writing leaves its temporary file behind (``.<name>.<random>.tmp``):
:func:`remove_stale_temporaries` removes those of a folder when the next job over it starts.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

Content = bytes | str | Callable[[Path], object]


def atomic_write(target: str | Path, data: Content) -> Path:
    """Write ``data`` to a temporary file beside ``target``, flush it to disk, then rename it over ``target``.

    ``data`` is the file's content (``str`` is written as UTF-8) or a function ``write(tmp)`` that writes the
    temporary file itself (for libraries that take a path: parquet, faiss, torch.save, savefig). The temporary
    file is removed if anything fails, so ``target`` keeps its old content.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        fsync(tmp)
        os.replace(tmp, target)
        fsync(target.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path, names: str = "*") -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left in ``folder`` for targets matching ``names`` (a glob)
    when a process was killed while writing; returns them. Call it only while no other process writes there."""
    stale = sorted(p for p in folder.glob(f".{names}.*.tmp") if p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
