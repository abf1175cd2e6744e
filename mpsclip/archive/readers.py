"""Reading an item's pixels: a whole file, a tar member (one seek) or a GeoTIFF window; the one dispatch on
:attr:`~mpsclip.archive.items.Item.kind`. A broken item raises one of :data:`~mpsclip.archive.items.READ_ERRORS`."""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath
from typing import IO

from PIL import Image

from mpsclip.archive import webdataset
from mpsclip.archive.items import Item

JPEG_SUFFIXES = (".jpg", ".jpeg")


def open_rgb(path: Path | IO[bytes]) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def encoded_bytes(item: Item) -> bytes | None:
    """The undecoded image bytes of a file or tar member; None for a GeoTIFF window (it is read resampled)."""
    if item.kind == "file":
        return item.path.read_bytes()
    if item.kind == "tar-member":
        return webdataset.read_member(item.path, item.meta["offset"], item.meta["size"])
    return None


def open_item(item: Item) -> Image.Image:
    """An item's RGB pixels (see the module's docstring)."""
    data = encoded_bytes(item)
    if data is None:
        from mpsclip.archive.geotiff import read_tile

        return read_tile(item.path, item.meta)
    return open_rgb(io.BytesIO(data))


def jpeg_bytes(item: Item) -> bytes | None:
    """The undecoded bytes of a JPEG item (a whole file or a tar member), for decoding on a device; None else."""
    name = item.meta["member"] if item.kind == "tar-member" else item.path.name
    if PurePosixPath(name).suffix.lower() not in JPEG_SUFFIXES:
        return None
    return encoded_bytes(item)
