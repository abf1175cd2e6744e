"""Archive items: what one image of an archive is, how georeferenced scenes are cut, and what reading one raises.

An :class:`Item` has an explicit ``kind``:

* ``file``: a whole image file (meta ``path``);
* ``tar-member``: the image member of a WebDataset sample (meta ``tar``, ``member``, ``offset``, ``size``);
* ``geotiff-window``: a tile of a georeferenced scene (meta ``scene``, ``window``, ...; see
  :mod:`mpsclip.archive.geotiff`);
* ``image-window``: a tile of a plain (not georeferenced) image file larger than a tile (meta ``path`` and
  ``window`` ``[col_off, row_off, width, height]`` in the image's pixels; no footprint), cut by
  :func:`image_windows` as scenes are;
* ``remote``: a whole raster named by ``hrefs`` (one RGB or grey raster, or red, green and blue single-band
  rasters), each an ``http(s)://`` or ``s3://`` URL or a local path; ``remote-window``: a tile of such rasters
  (meta as ``geotiff-window``'s, with ``hrefs`` instead of ``scene``); see :mod:`mpsclip.archive.remote`.

Every path in an item's meta (``path``, ``tar``, ``scene``) is relative to the SOURCE root recorded in the store's
manifest as ``source_root``, so a store moved to another folder or machine still finds its images:
:func:`resolve_source_path` joins them again, :func:`item_from_meta` rebuilds the item of a stored row (a remote
item only when its hosts are among those the store's manifest declares, ``remote_hosts``). A store is untrusted
input: a meta path that is absolute, climbs out with ``..`` or leads outside the root through a symlink is
refused, naming the item (:func:`contained_path`). Reading pixels is :mod:`mpsclip.archive.readers`' job.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

from PIL import Image

from mpsclip.archive.hrefs import REMOTE_KINDS, allowed_remote, gdal_path, host_of, is_url
from mpsclip.errors import MPSCLIPError

ItemKind = Literal["file", "tar-member", "geotiff-window", "image-window", "remote", "remote-window"]
ITEM_KINDS: tuple[str, ...] = get_args(ItemKind)
PATH_KEYS: dict[str, str] = {"file": "path", "tar-member": "tar", "geotiff-window": "scene", "image-window": "path"}
"""The meta key holding each local kind's file (relative to the source root)."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
IMAGE_FORMATS = "JPEG/PNG/TIFF/WEBP"
"""How messages name the image files of :data:`IMAGE_EXTENSIONS`."""
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What reading a broken or truncated image raises (PIL, rasterio): such items are skipped and listed."""


@dataclass(frozen=True)
class Item:
    """One image of an archive: ``id`` is its path relative to the source (``/`` separators; a tar sample's is
    ``<shard>/<member>``, a GeoTIFF tile's ``<scene>/r<row>_c<col>``), ``path`` the file holding its bytes (the
    image, the shard or the scene; a remote item's first href), ``kind`` how to read them and ``meta`` the
    JSON-able record kept in the store. A remote item reads ``hrefs``: as given (signed URLs keep their query
    string, which is never stored nor shown), local paths absolute."""

    id: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    kind: ItemKind = "file"
    hrefs: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ITEM_KINDS:
            raise MPSCLIPError(f"item {self.id}: kind {self.kind!r} is not one of {', '.join(ITEM_KINDS)}")


@dataclass(frozen=True)
class TileSettings:
    """How to cut georeferenced scenes and plain images larger than a tile: square tiles of ``tile_size`` px every
    ``stride`` px; for scenes only, 1-based ``bands`` (None: 1,2,3, or 1 for single-band scenes) and, with
    ``resolution``, pixels of that many metres (the scene is resampled) instead of one scene pixel."""

    tile_size: int
    stride: int
    bands: tuple[int, ...] | None = None
    resolution: float | None = None

    def __post_init__(self) -> None:
        if self.tile_size < 1 or self.stride < 1:
            raise MPSCLIPError(f"--tile-size and --stride must be 1 or more, got {self.tile_size}, {self.stride}")
        if self.resolution is not None and not self.resolution > 0:
            raise MPSCLIPError(f"--resolution must be a number of metres above 0, got {self.resolution}")


def window_offsets(size: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride``, the last one shifted to end at ``size``."""
    if size <= tile:
        return [0]
    offsets = list(range(0, size - tile + 1, stride))
    if offsets[-1] != size - tile:
        offsets.append(size - tile)
    return offsets


def image_windows(width: int, height: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(col_off, row_off, width, height)`` of the tiles of a ``width`` x ``height`` image, row by row: full
    tiles every ``stride`` px, the last row and column shifted back to end at the edge (an axis shorter than a
    tile gives tiles of its length)."""
    return [
        (col, row, min(tile, width), min(tile, height))
        for row in window_offsets(height, tile, stride)
        for col in window_offsets(width, tile, stride)
    ]


def window_suffix(col: int, row: int) -> str:
    """A tile's id below its scene or image: ``r<row>_c<col>``, zero-padded so that ids sort row by row."""
    return f"r{row:06d}_c{col:06d}"


def check_regular_file(path: Path) -> int:
    """The size of ``path``; OSError when it is not a regular file (after symlinks: a FIFO, a device, a folder)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"{path}: not a regular file; only regular image files are read")
    return info.st_size


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def relative_to_root(path: Path, root: Path) -> str:
    """``path`` as meta records it: relative to ``root`` (``/`` separators), or absolute when outside it."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(root).as_posix()
    except ValueError:
        return str(absolute)


def contained_path(root: str | Path, relative: str | Path, item_id: str | None = None) -> Path:
    """``relative`` joined to ``root``; raises :class:`MPSCLIPError` naming the item when it is absolute, has a
    ``..`` part or, symlinks followed, lies outside ``root``."""
    name = f"item {item_id}" if item_id is not None else f"item path {relative}"
    posix = PurePosixPath(str(relative))  # meta paths use '/' separators
    if posix.is_absolute():
        problem = f"its path {relative} is absolute"
    elif ".." in posix.parts:
        problem = f"its path {relative} climbs out of the source folder with '..'"
    else:
        path = Path(root) / relative
        if path.resolve().is_relative_to(Path(root).resolve()):
            return path
        problem = f"its path {relative} leads outside the source folder through a symbolic link"
    raise MPSCLIPError(
        f"{name}: {problem}; an item's file must lie inside the store's source folder {root}. The store was altered "
        "or the source holds such a link: remove the link (or copy the file in) and embed the source again"
    )


def resolve_source_path(info_or_root: Any, relative: str | Path, item_id: str | None = None) -> Path:
    """The file a meta path names: ``relative`` joined to the source root, given as a path, a store manifest
    (dict with ``source_root``) or a :class:`~.store_reader.StoreInfo`; refused (naming ``item_id``) when it
    does not lie inside the root (:func:`contained_path`)."""
    root = info_or_root
    if hasattr(root, "manifest"):
        root = root.manifest
    if isinstance(root, dict):
        if "source_root" not in root:
            raise MPSCLIPError(
                "the store's manifest has no source_root (made before stores recorded it); embed the source again"
            )
        root = root["source_root"]
    return contained_path(root, relative, item_id)


def item_from_meta(item_id: str, meta: dict[str, Any], info_or_root: Any) -> Item:
    """The item of a stored row (``id`` and parsed ``meta``), its file found below the source root; a remote
    item's URLs must be on the hosts the store's manifest declares (``remote_hosts``; not checked when
    ``info_or_root`` is a plain root folder)."""
    kind = meta.get("kind")
    if kind in REMOTE_KINDS:
        hrefs = _stored_hrefs(item_id, meta, info_or_root)
        return Item(item_id, Path(hrefs[0] if not is_url(hrefs[0]) else meta["hrefs"][0]), meta, kind, hrefs)
    if kind not in PATH_KEYS:
        raise MPSCLIPError(f"item {item_id}: its meta has no item kind ({kind!r}); embed the source again")
    return Item(item_id, resolve_source_path(info_or_root, meta[PATH_KEYS[kind]], item_id), meta, kind)


def _stored_hrefs(item_id: str, meta: dict[str, Any], info_or_root: Any) -> tuple[str, ...]:
    """A stored remote item's hrefs to read: local ones joined to the source root, URLs only on the hosts the
    store's manifest declares (``remote_hosts``) when ``info_or_root`` is a manifest or store."""
    hrefs = meta.get("hrefs")
    if not isinstance(hrefs, list) or len(hrefs) not in (1, 3) or not all(isinstance(h, str) for h in hrefs):
        raise MPSCLIPError(f"item {item_id}: its meta has no hrefs list of 1 or 3; embed the source again")
    manifest = getattr(info_or_root, "manifest", info_or_root)
    allowed = set(manifest.get("remote_hosts") or []) if isinstance(manifest, dict) else None
    readable = []
    for href in hrefs:
        if not is_url(href):
            gdal_path(href)  # refuses GDAL virtual paths and other schemes
            readable.append(str(resolve_source_path(info_or_root, href, item_id)))
        elif allowed is None or allowed_remote(href, allowed):
            readable.append(href)
        else:
            raise MPSCLIPError(
                f"item {item_id}: {host_of(href)} is not among the hosts the store's manifest declares "
                f"({', '.join(sorted(allowed)) or 'none'}); it is not read"
            )
    return tuple(readable)
