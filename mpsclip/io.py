"""Atomic file writing: output appears complete or not at all, and existing output is never corrupted."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

Content = bytes | str | Callable[[Path], object]


def atomic_write(target: str | Path, data: Content) -> Path:
    """Write ``data`` to a temporary file beside ``target``, then rename it over ``target``.

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
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
