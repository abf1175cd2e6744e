"""WebDataset tar shards: brace patterns, the image member of each sample, and reading one member by offset.

A shard is an uncompressed ``.tar``. As in WebDataset, a member's key is its path up to the first dot of its file
name and its extension is the rest (``a/0001.seg.png``: key ``a/0001``, extension ``seg.png``); a sample is the
members sharing a key, and its image is the member whose extension is jpg, jpeg, png, tif or tiff (the first of
these in that order when a sample has several). Samples without an image, hidden members (a file name starting
with a dot) and non-regular members are skipped.

Listing a shard reads only its headers and records where each image's bytes lie (``offset`` and ``size``), so a
reader opens one member with a seek and a read, without scanning the tar again.
"""

from __future__ import annotations

import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mpsclip.errors import MPSCLIPError

SHARD_SUFFIX = ".tar"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "tif", "tiff")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


@dataclass(frozen=True)
class Member:
    """An image member of a shard: its name (normalised, ``/`` separators) and where its bytes lie."""

    name: str
    offset: int
    size: int


def expand_braces(pattern: str) -> list[str]:
    """``{0000..0009}`` (a range; zero-padded to the first number's width when it starts with 0) and ``{a,b}``
    (alternatives), left to right; raises :class:`MPSCLIPError` on an unbalanced or empty brace."""
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise MPSCLIPError(f"{pattern}: unbalanced or nested braces; write e.g. shards-{{0000..0099}}.tar")
        return [pattern]
    body = match.group(1)
    numbers = _RANGE.fullmatch(body)
    if numbers:
        lo, hi = numbers.groups()
        if int(lo) > int(hi):
            raise MPSCLIPError(f"{pattern}: range {{{body}}} counts down; write the smaller number first")
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise MPSCLIPError(f"{pattern}: {{{body}}} is neither a range {{0..9}} nor alternatives {{a,b}}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def pattern_shards(pattern: str) -> tuple[Path, list[Path]]:
    """The folder the pattern starts in (ids are relative to it) and the shards it names, which must exist."""
    base = Path(os.path.dirname(pattern[: pattern.index("{")]) or ".")
    shards = [Path(p) for p in dict.fromkeys(expand_braces(pattern))]
    for shard in shards:
        if shard.suffix.lower() != SHARD_SUFFIX:
            raise MPSCLIPError(f"{pattern}: names {shard}, which is not a {SHARD_SUFFIX} shard")
        if not shard.is_file():
            raise MPSCLIPError(f"{pattern}: shard {shard} does not exist; check the pattern's ranges")
    return base, shards


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name as WebDataset splits it; None for a hidden or extension-less name."""
    path = PurePosixPath(name.lstrip("/"))
    stem, dot, ext = path.name.partition(".")
    if not stem or not dot:
        return None
    return (path.parent / stem).as_posix(), ext.lower()


def image_members(shard: Path) -> list[Member]:
    """The image member of each sample of ``shard``, by name; raises :class:`MPSCLIPError` if it cannot be listed.
    A tar that ends early keeps the samples before the cut (with a warning): a member cut short fails when read."""
    try:
        infos = _list(shard)
    except (tarfile.TarError, OSError) as err:
        raise MPSCLIPError(
            f"{shard}: cannot list the tar shard ({err}); shards must be uncompressed .tar files, fix or remove it"
        ) from err
    best: dict[str, tuple[int, Member]] = {}
    for info in infos:
        parts = split_key(info.name)
        if parts is None or parts[1] not in IMAGE_EXTENSIONS or not info.isreg() or info.issparse():
            continue
        key, ext = parts
        member = Member(PurePosixPath(info.name.lstrip("/")).as_posix(), info.offset_data, info.size)
        rank = IMAGE_EXTENSIONS.index(ext)
        if key not in best or rank <= best[key][0]:
            best[key] = (rank, member)
    return sorted((member for _, member in best.values()), key=lambda m: m.name)


def _list(shard: Path) -> list[tarfile.TarInfo]:
    """Every header of ``shard``; warns when the archive stops before its end-of-archive blocks."""
    with tarfile.open(shard, mode="r:") as tar:
        infos: list[tarfile.TarInfo] = []
        try:
            infos.extend(tar)
        except tarfile.ReadError:
            if not infos:
                raise
        stopped = tar.offset
    with open(shard, "rb") as file:
        file.seek(stopped)
        block = file.read(tarfile.BLOCKSIZE)
    if block != bytes(tarfile.BLOCKSIZE):  # a complete tar ends with zero blocks
        last = infos[-1].name if infos else "(none)"
        warnings.warn(
            f"{shard}: truncated or corrupt after byte {stopped} (last member {last}); later samples are missing",
            stacklevel=3,
        )
    return infos


def read_member(shard: str | Path, offset: int, size: int) -> bytes:
    """A member's bytes; raises OSError when the shard ends before them (a truncated shard)."""
    with open(shard, "rb") as file:
        file.seek(offset)
        data = file.read(size)
    if len(data) != size:
        raise OSError(f"{shard}: member at byte {offset} is cut short ({len(data)} of {size} bytes)")
    return data
