"""Error text fit for a response body: names relative to the store, never this machine's absolute paths.

Messages from the store and raster readers name files by their full path, which is right for the server's log and
the command line but tells a client how the server's disks are laid out. :func:`public_message` rewrites each
known root (a store's folder, its source folder) to a relative name and any other absolute path to its last part.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from pathlib import Path

ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/([^\s'\"/(),;]+)/(?:[^\s'\"/(),;]+/)*([^\s'\"/(),;]+)")
"""A path of two or more parts starting with ``/`` (not part of a URL or a relative name): group 1 is its first
part, group 2 its last."""


def roots_of(pairs: Iterable[tuple[Path | str | None, str]]) -> list[tuple[str, str]]:
    """``(absolute root, what to call it)`` pairs, each root also as its resolved path, longest first."""
    out: dict[str, str] = {}
    for root, label in pairs:
        if root is None or not str(root):
            continue
        for form in {str(root), str(Path(root).resolve())}:
            out.setdefault(form.rstrip("/") or "/", label)
    return sorted(out.items(), key=lambda item: -len(item[0]))


def public_message(text: str, roots: Iterable[tuple[str, str]]) -> str:
    """``text`` with each ``root/rest`` as ``rest``, a bare ``root`` as its label, any other absolute path as
    ``.../last-part``."""
    for root, label in roots:
        if root == "/":
            continue
        text = text.replace(root + "/", "")
        text = re.sub(re.escape(root) + r"(?=$|[\s'\"),;:.])", lambda _, label=label: label, text)
    return ABSOLUTE_PATH.sub(_shorten, text)


def _shorten(match: re.Match[str]) -> str:
    """A path under a top-level folder of this machine as ``.../last-part``; others (API paths such as
    ``/admin/reload``) as they are."""
    return f".../{match.group(2)}" if match.group(1) in top_folders() else match.group(0)


@functools.cache
def top_folders() -> frozenset[str]:
    return frozenset(os.listdir("/"))
