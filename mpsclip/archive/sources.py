"""Archive sources: where the images to embed come from.

``iter_items(source)`` accepts

* a folder: every JPEG/PNG/TIFF file below it and the samples of every ``.tar`` shard below it (recursively,
  hidden files and folders skipped);
* a text file of paths (``.txt`` or ``.lst``): one image path per line, relative to the file's folder unless
  absolute; blank lines and lines starting with ``#`` are ignored;
* a WebDataset ``.tar`` shard, or a brace pattern of shards such as ``shards-{0000..0009}.tar`` (see
  :mod:`mpsclip.archive.webdataset`; quote a pattern so that the shell leaves it alone): one item per sample
  with an image member, id ``<shard>/<member name>`` (``<shard>``: the shard's path relative to the folder or to
  the pattern's leading folder, its file name when SOURCE is one shard) and meta ``tar``, ``member``,
  ``offset`` and ``size``, enough to read the image again with one seek.

With ``tiles`` (``--tile-size``), each georeferenced ``.tif``/``.tiff`` file is replaced by its tiles (see
:mod:`mpsclip.archive.geotiff`, which needs rasterio; meta ``scene``, ``window``, ``crs``, ``footprint``, ...);
other files and tar samples stay whole images.

Items come in a deterministic order (sorted by id) so that shard ``i`` of a store always holds the same items.
``Item.meta`` is a plain JSON-able dict (with the item's ``kind``) whose paths are relative to
:func:`source_root`, from which :func:`mpsclip.archive.items.item_from_meta` and
:func:`mpsclip.archive.readers.open_item` read the pixels again. This module only lists.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from mpsclip.archive import webdataset
from mpsclip.archive.items import IMAGE_EXTENSIONS, Item, TileSettings, is_image_file, relative_to_root
from mpsclip.errors import MPSCLIPError

LIST_EXTENSIONS = (".txt", ".lst")


def source_root(source: str | Path) -> Path:
    """The absolute folder every meta path of ``source``'s items is relative to: the folder itself, the folder of
    a list file or shard, or the leading folder of a pattern of shards."""
    pattern, path = str(source), Path(source)
    if "{" in pattern and not path.exists():
        return Path(os.path.abspath(webdataset.pattern_shards(pattern)[0]))
    return Path(os.path.abspath(path if path.is_dir() else path.parent))


def iter_items(source: str | Path, tiles: TileSettings | None = None) -> Iterator[Item]:
    """Items of a folder, a text file of paths, a tar shard or a pattern of shards, sorted by id; raises
    :class:`MPSCLIPError` on a bad source. With ``tiles``, georeferenced GeoTIFF scenes give their tiles."""
    pattern, source = str(source), Path(source)
    if "{" in pattern and not source.exists():
        base, shards = webdataset.pattern_shards(pattern)
        root = source_root(pattern)
        items = _shards_items([(shard, shard.relative_to(base).as_posix()) for shard in shards], root)
    elif source.is_dir():
        items = _folder_items(source, source_root(source))
    elif source.is_file() and source.suffix.lower() in LIST_EXTENSIONS:
        items = _list_items(source, source_root(source))
    elif source.is_file() and source.suffix.lower() == webdataset.SHARD_SUFFIX:
        items = _shards_items([(source, source.name)], source_root(source))
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
        items = _tiled(items, tiles, source_root(pattern))
    return iter(sorted(items, key=lambda item: item.id))


def _tiled(items: list[Item], tiles: TileSettings, root: Path) -> list[Item]:
    try:
        from mpsclip.archive import geotiff
    except ImportError as err:
        raise MPSCLIPError(f"--tile-size needs rasterio ({err}); install it with: pip install 'mpsclip[geo]'") from err
    out: list[Item] = []
    for item in tqdm(items, desc="listing scenes", unit="file", leave=False, disable=None):
        if item.path.suffix.lower() in (".tif", ".tiff") and geotiff.is_georeferenced(item.path):
            out.extend(geotiff.scene_tiles(item.path, item.id, tiles, root))
        else:
            out.append(item)
    return out


def _file_item(item_id: str, path: Path, root: Path) -> Item:
    return Item(item_id, path, {"kind": "file", "path": relative_to_root(path, root)}, "file")


def _folder_items(folder: Path, root: Path) -> list[Item]:
    items, shards = [], []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if is_image_file(path):
            items.append(_file_item(rel.as_posix(), path, root))
        elif path.suffix.lower() == webdataset.SHARD_SUFFIX:
            shards.append((path, rel.as_posix()))
    return items + _shards_items(shards, root)


def _shards_items(shards: list[tuple[Path, str]], root: Path) -> list[Item]:
    """One item per image sample of each ``(shard, shard id)``, read from the headers only."""
    items = []
    for shard, shard_id in tqdm(shards, desc="listing shards", unit="shard", leave=False, disable=None):
        tar = relative_to_root(shard, root)
        for member in webdataset.image_members(shard):
            meta = {"kind": "tar-member", "tar": tar, "member": member.name}
            meta |= {"offset": member.offset, "size": member.size}
            items.append(Item(f"{shard_id}/{member.name}", shard, meta, "tar-member"))
    return items


def _list_items(list_file: Path, root: Path) -> list[Item]:
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
        items[entry] = _file_item(Path(entry).as_posix(), path, root)
    return list(items.values())
