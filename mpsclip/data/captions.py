"""Caption normalisation, matching the authors' preprocessing of RSITMD/RSICD captions."""

from __future__ import annotations

import re
from pathlib import Path

from mpsclip.errors import MPSCLIPError

_DROPPED = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")


def normalize_caption(text: str, max_words: int = 30) -> str:
    """Lower-case, drop punctuation, split on ``-`` and ``/``, collapse whitespace, keep ``max_words``."""
    text = _DROPPED.sub("", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _WHITESPACE.sub(" ", text).strip()
    return " ".join(text.split(" ")[:max_words]) if text else ""


def require_caption(text: str, path: str | Path, where: str, max_words: int = 30) -> str:
    """Normalise ``text``; raise :class:`MPSCLIPError` naming ``path`` and ``where`` if nothing is left."""
    caption = normalize_caption(text, max_words)
    if not caption:
        raise MPSCLIPError(
            f"{path}: {where}: caption {text!r} is empty after normalisation "
            "(it holds only punctuation or whitespace); fix or remove that caption"
        )
    return caption
