"""Archive sources: where the images to embed come from.

``iter_items(source)`` accepts

* a folder: every JPEG/PNG/TIFF file below it (recursively, hidden files and folders skipped);
* a text file of paths (``.txt`` or ``.lst``): one image path per line, relative to the file's folder unless
  absolute; blank lines and lines starting with ``#`` are ignored.

With ``tiles`` (``--tile-size``), each georeferenced ``.tif``/``.tiff`` scene is replaced by its tiles (see
:mod:`mpsclip.archive.geotiff`, which needs rasterio); other files stay whole images.

Items come in a deterministic order (sorted by id) so that shard ``i`` of a store always holds the same items.
``Item.meta`` is a plain JSON-able dict (later sources add keys such as ``scene``, ``window``, ``crs`` and
``footprint``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mpsclip.errors import MPSCLIPError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".lst")
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What reading a broken or truncated image raises (PIL, rasterio): such items are skipped and listed."""


@dataclass(frozen=True)
class Item:
    """One image of an archive: ``id`` is its path relative to the source (``/`` separators)."""

    id: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TileSettings:
    """How to cut georeferenced scenes: square tiles of ``tile_size`` px every ``stride`` px, 1-based ``bands``
    (None: 1,2,3, or 1 for single-band scenes)."""

    tile_size: int
    stride: int
    bands: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.tile_size < 1 or self.stride < 1:
            raise MPSCLIPError(f"--tile-size and --stride must be 1 or more, got {self.tile_size}, {self.stride}")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def iter_items(source: str | Path, tiles: TileSettings | None = None) -> Iterator[Item]:
    """Items of a folder or a text file of paths, sorted by id; raises :class:`MPSCLIPError` on a bad source.
    With ``tiles``, georeferenced GeoTIFF scenes give their tiles instead of one item."""
    source = Path(source)
    if source.is_dir():
        items = _folder_items(source)
    elif source.is_file() and source.suffix.lower() in LIST_EXTENSIONS:
        items = _list_items(source)
    elif not source.exists():
        raise MPSCLIPError(f"{source}: no such folder or file; pass a folder of images or a .txt list of paths")
    else:
        raise MPSCLIPError(
            f"{source}: not a folder nor a text file of paths ({', '.join(LIST_EXTENSIONS)}); "
            "pass a folder of images or a list file"
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
    for item in items:
        if item.path.suffix.lower() in (".tif", ".tiff") and geotiff.is_georeferenced(item.path):
            out.extend(geotiff.scene_tiles(item.path, item.id, tiles))
        else:
            out.append(item)
    return out


def _folder_items(root: Path) -> list[Item]:
    items = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not is_image_file(path) or not path.is_file():
            continue
        items.append(Item(id=rel.as_posix(), path=path))
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


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def open_item(item: Item) -> Image.Image:
    """An item's RGB pixels: a GeoTIFF tile's window (meta ``window``) or the whole image file."""
    if "window" in item.meta:
        from mpsclip.archive.geotiff import read_tile

        return read_tile(item.path, item.meta)
    return open_rgb(item.path)
