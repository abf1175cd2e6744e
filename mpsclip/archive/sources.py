"""Archive sources: where the images to embed come from.

``iter_items(source)`` accepts

* a folder: every JPEG/PNG/TIFF file below it and the samples of every ``.tar`` shard below it (recursively,
  hidden files and folders skipped);
* a text file of paths (``.txt`` or ``.lst``): one image path per line, relative to the file's folder unless
  absolute; blank lines and lines starting with ``#`` are ignored;
* a WebDataset ``.tar`` shard, or a brace pattern of shards such as ``shards-{0000..0009}.tar`` (see
  :mod:`mpsclip.archive.webdataset`; quote a pattern so that the shell leaves it alone): one item per sample
  with an image member, id ``<shard>/<member name>`` (``<shard>``: the shard's path relative to the folder or to
  the pattern's leading folder, its file name when SOURCE is one shard) and meta ``tar`` (absolute path),
  ``member``, ``offset`` and ``size``, enough to read the image again with one seek.

With ``tiles`` (``--tile-size``), each georeferenced ``.tif``/``.tiff`` file is replaced by its tiles (see
:mod:`mpsclip.archive.geotiff`, which needs rasterio; meta ``scene``, ``window``, ``crs``, ``footprint``, ...);
other files and tar samples stay whole images.

Items come in a deterministic order (sorted by id) so that shard ``i`` of a store always holds the same items.
``Item.meta`` is a plain JSON-able dict from which :func:`open_item` reads the pixels again.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image
from tqdm import tqdm

from mpsclip.archive import webdataset
from mpsclip.errors import MPSCLIPError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".lst")
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What reading a broken or truncated image raises (PIL, rasterio): such items are skipped and listed."""


@dataclass(frozen=True)
class Item:
    """One image of an archive: ``id`` is its path relative to the source (``/`` separators; a tar sample's is
    ``<shard>/<member>``, a GeoTIFF tile's ``<scene>/r<row>_c<col>``)."""

    id: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TileSettings:
    """How to cut georeferenced scenes: square tiles of ``tile_size`` px every ``stride`` px, 1-based ``bands``
    (None: 1,2,3, or 1 for single-band scenes); with ``resolution``, a pixel covers that many metres (the scene
    is resampled) instead of one scene pixel."""

    tile_size: int
    stride: int
    bands: tuple[int, ...] | None = None
    resolution: float | None = None

    def __post_init__(self) -> None:
        if self.tile_size < 1 or self.stride < 1:
            raise MPSCLIPError(f"--tile-size and --stride must be 1 or more, got {self.tile_size}, {self.stride}")
        if self.resolution is not None and not self.resolution > 0:
            raise MPSCLIPError(f"--resolution must be a number of metres above 0, got {self.resolution}")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def iter_items(source: str | Path, tiles: TileSettings | None = None) -> Iterator[Item]:
    """Items of a folder, a text file of paths, a tar shard or a pattern of shards, sorted by id; raises
    :class:`MPSCLIPError` on a bad source. With ``tiles``, georeferenced GeoTIFF scenes give their tiles."""
    pattern, source = str(source), Path(source)
    if "{" in pattern and not source.exists():
        base, shards = webdataset.pattern_shards(pattern)
        items = _shards_items([(shard, shard.relative_to(base).as_posix()) for shard in shards])
    elif source.is_dir():
        items = _folder_items(source)
    elif source.is_file() and source.suffix.lower() in LIST_EXTENSIONS:
        items = _list_items(source)
    elif source.is_file() and source.suffix.lower() == webdataset.SHARD_SUFFIX:
        items = _shards_items([(source, source.name)])
    elif not source.exists():
        raise MPSCLIPError(
            f"{source}: no such folder or file; pass a folder of images, a .txt list of paths or .tar shards"
        )
    else:
        raise MPSCLIPError(
            f"{source}: not a folder, a text file of paths ({', '.join(LIST_EXTENSIONS)}) nor a .tar shard; "
            "pass a folder of images, a list file or WebDataset shards"
        )
    if tiles is not None:
        items = _tiled(items, tiles)
    return iter(sorted(items, key=lambda item: item.id))


def _tiled(items: list[Item], tiles: TileSettings) -> list[Item]:
    try:
        from mpsclip.archive import geotiff
    except ImportError as err:
        raise MPSCLIPError(f"--tile-size needs rasterio ({err}); install it with: pip install 'mpsclip[geo]'") from err
    out: list[Item] = []
    for item in tqdm(items, desc="listing scenes", unit="file", leave=False, disable=None):
        if item.path.suffix.lower() in (".tif", ".tiff") and geotiff.is_georeferenced(item.path):
            out.extend(geotiff.scene_tiles(item.path, item.id, tiles))
        else:
            out.append(item)
    return out


def _folder_items(root: Path) -> list[Item]:
    items, shards = [], []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if is_image_file(path):
            items.append(Item(id=rel.as_posix(), path=path))
        elif path.suffix.lower() == webdataset.SHARD_SUFFIX:
            shards.append((path, rel.as_posix()))
    return items + _shards_items(shards)


def _shards_items(shards: list[tuple[Path, str]]) -> list[Item]:
    """One item per image sample of each ``(shard, shard id)``, read from the headers only."""
    items = []
    for shard, shard_id in tqdm(shards, desc="listing shards", unit="shard", leave=False, disable=None):
        tar = str(shard.resolve())
        for member in webdataset.image_members(shard):
            meta = {"tar": tar, "member": member.name, "offset": member.offset, "size": member.size}
            items.append(Item(id=f"{shard_id}/{member.name}", path=shard, meta=meta))
    return items


def _list_items(list_file: Path) -> list[Item]:
    items: dict[str, Item] = {}
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        where = f"{list_file}, line {number}"
        if not is_image_file(Path(entry)):
            raise MPSCLIPError(
                f"{where}: {entry!r} is not a JPEG/PNG/TIFF file name ({', '.join(IMAGE_EXTENSIONS)}); "
                "remove the line or convert the image"
            )
        if entry in items:
            raise MPSCLIPError(f"{where}: {entry!r} is listed twice; remove the duplicate line")
        path = Path(entry) if Path(entry).is_absolute() else list_file.parent / entry
        items[entry] = Item(id=Path(entry).as_posix(), path=path)
    return list(items.values())


def open_rgb(path: Path | IO[bytes]) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def open_item(item: Item) -> Image.Image:
    """An item's RGB pixels: a tar member (meta ``tar``), a GeoTIFF tile's window (meta ``window``) or the whole
    image file; a broken one raises one of :data:`READ_ERRORS`."""
    meta = item.meta
    if "tar" in meta:
        data = webdataset.read_member(meta["tar"], meta["offset"], meta["size"])
        return open_rgb(io.BytesIO(data))
    if "window" in meta:
        from mpsclip.archive.geotiff import read_tile

        return read_tile(item.path, meta)
    return open_rgb(item.path)
