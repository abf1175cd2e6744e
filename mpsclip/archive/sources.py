"""Archive sources: where the images to embed come from.

``iter_items(source)`` accepts

* one image file (JPEG, PNG, TIFF or WEBP): that file is the only item (id: its name), its folder the root;
* a folder: every JPEG/PNG/TIFF/WEBP file below it and the samples of every ``.tar`` shard below it (recursively,
  hidden files and folders skipped);
* a text file of paths (``.txt`` or ``.lst``): one image path per line, relative to the file's folder unless
  absolute; blank lines and lines starting with ``#`` are ignored;
* a WebDataset ``.tar`` shard, or a brace pattern of shards such as ``shards-{0000..0009}.tar`` (see
  :mod:`mpsclip.archive.webdataset`; quote a pattern so that the shell leaves it alone): one item per sample
  with an image member, id ``<shard>/<member name>`` (``<shard>``: the shard's path relative to the folder or to
  the pattern's leading folder, its file name when SOURCE is one shard) and meta ``tar``, ``member``,
  ``offset`` and ``size``, enough to read the image again with one seek;
* a STAC Catalog, Collection, Item or ItemCollection JSON or a stac-geoparquet file (``.parquet``), each a local
  file or an ``http(s)://`` / ``s3://`` URL, or a STAC API item search URL (``<api>/search?collections=...``, as
  ``mpsclip embed --stac-api`` writes it), optionally ending with ``#assets=KEY,...``: one item per STAC item
  (id ``<collection>/<STAC item id>``) listed by :mod:`mpsclip.archive.stac` and read remotely
  (:func:`mpsclip.archive.remote.remote_items`); items without the chosen assets are left out and named on stderr;
* one ``http(s)://`` or ``s3://`` image URL; a text file may list such URLs too (id: the URL without its query).

With ``tiles`` (``--tile-size``), each georeferenced ``.tif``/``.tiff`` file is replaced by its tiles (see
:mod:`mpsclip.archive.geotiff`, which needs rasterio; meta ``scene``, ``window``, ``crs``, ``footprint``, ...),
and each other image file wider or taller than a tile by its ``image-window`` tiles, cut the same way in its own
pixels (id ``<file id>/r<row>_c<col>``, meta ``path`` and ``window``; no CRS nor footprint; ``bands`` and
``resolution`` are the scenes' alone). Images that fit in one tile, unreadable files and tar samples stay whole.

Items come in a deterministic order (sorted by id) so that shard ``i`` of a store always holds the same items.
``Item.meta`` is a plain JSON-able dict (with the item's ``kind``) whose paths are relative to
:func:`source_root`, from which :func:`mpsclip.archive.items.item_from_meta` and
:func:`mpsclip.archive.readers.open_item` read the pixels again. This module only lists.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mpsclip.archive import stac, webdataset
from mpsclip.archive.hrefs import is_url, public_href
from mpsclip.archive.items import (
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    READ_ERRORS,
    Item,
    TileSettings,
    check_regular_file,
    image_windows,
    is_image_file,
    relative_to_root,
    window_suffix,
)
from mpsclip.errors import MPSCLIPError

LIST_EXTENSIONS = (".txt", ".lst")
GEOTIFF_SUFFIXES = (".tif", ".tiff")


def source_root(source: str | Path) -> Path:
    """The absolute folder every meta path of ``source``'s items is relative to: the folder itself, the folder of
    an image file, list file or shard, or the leading folder of a pattern of shards (for a URL or STAC source, see
    :func:`mpsclip.archive.stac.stac_root`)."""
    pattern, path = source_text(source), Path(source)
    if stac.is_stac_source(pattern):
        return stac.stac_root(pattern)
    if "{" in pattern and not path.exists():
        return Path(os.path.abspath(webdataset.pattern_shards(pattern)[0]))
    return Path(os.path.abspath(path if path.is_dir() else path.parent))


def iter_items(source: str | Path, tiles: TileSettings | None = None) -> Iterator[Item]:
    """Items of an image file, a folder, a text file of paths, a tar shard or a pattern of shards, sorted by id;
    raises :class:`MPSCLIPError` on a bad source. With ``tiles``, georeferenced GeoTIFF scenes and larger images
    give their tiles."""
    pattern, source = source_text(source), Path(source)
    remote: list[Item] = []  # remote items come tiled already
    if stac.is_stac_source(pattern):
        items, remote = [], _stac_items(pattern, tiles)
    elif "{" in pattern and not source.exists():
        base, shards = webdataset.pattern_shards(pattern)
        root = source_root(pattern)
        items = _shards_items([(shard, shard.relative_to(base).as_posix()) for shard in shards], root)
    elif source.is_dir():
        items = _folder_items(source, source_root(source))
    elif source.is_file() and is_image_file(source):
        items = [_file_item(source.name, source, source_root(source))]
    elif source.is_file() and source.suffix.lower() in LIST_EXTENSIONS:
        items, urls = _list_items(source, source_root(source))
        remote = _url_items(urls, tiles, source_root(source))
    elif source.is_file() and source.suffix.lower() == webdataset.SHARD_SUFFIX:
        items = _shards_items([(source, source.name)], source_root(source))
    elif not source.exists():
        raise MPSCLIPError(
            f"{source}: no such folder or file; pass an image, a folder of images, a .txt list of paths or URLs, "
            ".tar shards, a STAC catalog (.json, http(s)://, s3://) or a stac-geoparquet file"
        )
    else:
        raise MPSCLIPError(
            f"{source}: not an image ({', '.join(IMAGE_EXTENSIONS)}), a folder, a text file of paths "
            f"({', '.join(LIST_EXTENSIONS)}) nor a .tar shard; pass an image, a folder of images, a list file, "
            "WebDataset shards or a STAC catalog (.json) or stac-geoparquet file"
        )
    if tiles is not None:
        items = _tiled(items, tiles, source_root(pattern))
    return iter(sorted(items + remote, key=lambda item: item.id))


URL_MANGLED = re.compile(r"^(https?|s3):/(?!/)")


def source_text(source: str | Path) -> str:
    """``source`` as text, a URL that went through ``Path`` (``https:/host/...``) given its ``//`` back."""
    return URL_MANGLED.sub(r"\1://", str(source))


def source_identity(source: str | Path) -> str:
    """How a store's manifest records ``source``: a URL (or STAC API search) as given, a path made absolute
    (an ``#assets=...`` choice kept in both)."""
    text = source_text(source)
    base, assets = stac.split_assets(text)
    return text if is_url(base) else stac.with_assets(str(Path(base).resolve()), assets)


def _remote_items_function() -> Callable[..., list[Item]]:
    """:func:`mpsclip.archive.remote.remote_items`, imported when a source needs it (it needs rasterio)."""
    try:
        from mpsclip.archive.remote import remote_items
    except ImportError as err:
        raise MPSCLIPError(f"reading remote or STAC sources: {err}; pip install 'mpsclip[geo,stac]'") from err
    return remote_items


def _stac_items(source: str, tiles: TileSettings | None) -> list[Item]:
    """The items (or tiles) of a STAC source or of one image URL."""
    remote_items, root = _remote_items_function(), stac.stac_root(source)
    base = stac.split_assets(source)[0]
    if is_url(base) and is_image_file(Path(public_href(base))):
        if base != source:
            raise MPSCLIPError(f"{public_href(base)}: --assets is for STAC sources, not one image URL")
        return _url_items([base], tiles, root)
    listing = stac.list_records(source)
    stac.report_missing(listing, public_href(base))
    items: list[Item] = []
    for record in tqdm(listing.records, desc="listing STAC items", unit="item", leave=False, disable=None):
        items.extend(remote_items(record.item_id, list(record.hrefs), record.meta, tiles, root))
    return items


def _url_items(urls: list[str], tiles: TileSettings | None, root: Path) -> list[Item]:
    """The items (or tiles) of image URLs, each with its URL without query string as id."""
    if not urls:
        return []
    remote_items = _remote_items_function()
    items: list[Item] = []
    for url in urls:
        items.extend(remote_items(public_href(url), [url], {}, tiles, root))
    return items


def _geotiff() -> Any:
    """:mod:`mpsclip.archive.geotiff`, imported when a listing holds TIFF files to tile (it needs rasterio)."""
    try:
        from mpsclip.archive import geotiff
    except ImportError as err:
        raise MPSCLIPError(
            f"--tile-size on TIFF files needs rasterio ({err}); install it with: pip install 'mpsclip[geo]'"
        ) from err
    return geotiff


def _tiled(items: list[Item], tiles: TileSettings, root: Path) -> list[Item]:
    """``items`` with each image file cut into its tiles: georeferenced TIFF scenes by
    :func:`mpsclip.archive.geotiff.scene_tiles`, other images larger than a tile by :func:`image_tiles`."""
    out: list[Item] = []
    for item in tqdm(items, desc="listing images", unit="file", leave=False, disable=None):
        if item.kind != "file":
            out.append(item)
        elif item.path.suffix.lower() in GEOTIFF_SUFFIXES and _geotiff().is_georeferenced(item.path):
            out.extend(_geotiff().scene_tiles(item.path, item.id, tiles, root))
        else:
            out.extend(image_tiles(item, tiles))
    return out


def image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from an image file's header, or None when it is not a regular file PIL can open (it
    is then read whole, and fails there: a failure listed like any unreadable image)."""
    try:
        check_regular_file(path)
        with Image.open(path) as image:
            return image.size
    except READ_ERRORS:
        return None


def image_tiles(item: Item, tiles: TileSettings) -> list[Item]:
    """The ``image-window`` tiles of a plain image file wider or taller than ``tiles.tile_size``, every
    ``tiles.stride`` pixels (see the module's docstring); ``[item]`` itself when it fits in one tile or cannot be
    read."""
    size = image_size(item.path)
    if size is None or (size[0] <= tiles.tile_size and size[1] <= tiles.tile_size):
        return [item]
    base = {"kind": "image-window", "path": item.meta["path"]}
    return [
        Item(f"{item.id}/{window_suffix(col, row)}", item.path, {**base, "window": [col, row, width, height]},
             "image-window")
        for col, row, width, height in image_windows(*size, tiles.tile_size, tiles.stride)
    ]


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


def _list_items(list_file: Path, root: Path) -> tuple[list[Item], list[str]]:
    """The file items of a list and its ``http(s)://``/``s3://`` URLs (read by :func:`_url_items`)."""
    items: dict[str, Item] = {}
    urls: dict[str, str] = {}
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        where = f"{list_file}, line {number}"
        name = public_href(entry) if is_url(entry) else entry
        if not is_image_file(Path(name)):
            raise MPSCLIPError(
                f"{where}: {name!r} is not a {IMAGE_FORMATS} file name ({', '.join(IMAGE_EXTENSIONS)}); "
                "remove the line or convert the image"
            )
        if name in items or name in urls:
            raise MPSCLIPError(f"{where}: {name!r} is listed twice; remove the duplicate line")
        if is_url(entry):
            urls[name] = entry
            continue
        path = Path(entry) if Path(entry).is_absolute() else list_file.parent / entry
        items[entry] = _file_item(Path(entry).as_posix(), path, root)
    return list(items.values()), list(urls.values())
