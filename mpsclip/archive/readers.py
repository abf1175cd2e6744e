"""Reading an item's pixels: a whole file, a tar member (one seek), a GeoTIFF window, a window of a plain image or
a remote raster (whole or a window, :mod:`mpsclip.archive.remote`); the one dispatch on
:attr:`~mpsclip.archive.items.Item.kind`. A broken item raises one of :data:`~mpsclip.archive.items.READ_ERRORS`.

A plain image's window is cut from the whole decoded image (PIL decodes no part of a JPEG or PNG alone); the
image last decoded is kept (one per process, keyed on its path, size and modification time), so the tiles of one
image, which come one after the other in id order, decode it once.

Only regular files are opened (a FIFO, a device such as ``/dev/zero`` or a folder fails at once with OSError,
before any read), and a file or member larger than :data:`MAX_IMAGE_BYTES` is refused rather than read.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import IO, Any

from PIL import Image

from mpsclip.archive import webdataset
from mpsclip.archive.items import REMOTE_KINDS, Item, check_regular_file

JPEG_SUFFIXES = (".jpg", ".jpeg")
MAX_IMAGE_BYTES = 1 << 30
"""The largest image file (or tar member) read whole: 1 GiB."""


def read_file(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_IMAGE_BYTES (OSError otherwise)."""
    size = check_regular_file(path)
    if size > MAX_IMAGE_BYTES:
        raise OSError(f"{path}: {size} bytes, more than the {MAX_IMAGE_BYTES} an image file may have")
    with open(path, "rb") as f:
        return f.read(MAX_IMAGE_BYTES + 1)[:MAX_IMAGE_BYTES]


def open_rgb(path: Path | IO[bytes]) -> Image.Image:
    if isinstance(path, (str, Path)):
        path = io.BytesIO(read_file(Path(path)))
    with Image.open(path) as img:
        return img.convert("RGB")


@lru_cache(maxsize=1)
def _decoded(path: str, size: int, mtime_ns: int) -> Image.Image:
    """The RGB pixels of the image file ``path`` as it was at ``size`` bytes and ``mtime_ns`` (the cache's key)."""
    return open_rgb(Path(path))


def _window(meta: dict[str, Any]) -> tuple[int, int, int, int]:
    """Meta ``window`` as ``(col, row, width, height)``; OSError when it is not four integers, sizes above 0."""
    window = meta.get("window")
    if not (isinstance(window, list) and len(window) == 4 and all(type(v) is int for v in window)):
        raise OSError(f"window {window!r} is not [col_off, row_off, width, height]")
    if window[2] < 1 or window[3] < 1:
        raise OSError(f"window {window} is empty")
    col, row, width, height = window
    return col, row, width, height


def read_image_window(item: Item) -> Image.Image:
    """The RGB pixels of an ``image-window`` item: its window of the whole image (OSError for a window outside
    it)."""
    col, row, width, height = _window(item.meta)
    check_regular_file(item.path)
    info = os.stat(item.path)
    image = _decoded(str(item.path), info.st_size, info.st_mtime_ns)
    if col < 0 or row < 0 or col + width > image.width or row + height > image.height:
        raise OSError(f"window {item.meta['window']} is outside the {image.width}x{image.height} image")
    return image.crop((col, row, col + width, row + height))


def encoded_bytes(item: Item) -> bytes | None:
    """The undecoded image bytes of a file or tar member; None for a window or a remote raster (they are read
    resampled or cut)."""
    if item.kind == "file":
        return read_file(item.path)
    if item.kind == "tar-member":
        check_regular_file(item.path)
        if not 0 <= item.meta["size"] <= MAX_IMAGE_BYTES:
            raise OSError(f"{item.path}: member {item.meta.get('member')!r} of {item.meta['size']} bytes is refused")
        return webdataset.read_member(item.path, item.meta["offset"], item.meta["size"])
    return None


def open_item(item: Item) -> Image.Image:
    """An item's RGB pixels (see the module's docstring)."""
    if item.kind in REMOTE_KINDS:
        from mpsclip.archive.remote import read_remote

        return read_remote(item)
    if item.kind == "image-window":
        return read_image_window(item)
    data = encoded_bytes(item)
    if data is None:
        from mpsclip.archive.geotiff import read_tile

        return read_tile(item.path, item.meta)
    return open_rgb(io.BytesIO(data))


def jpeg_bytes(item: Item) -> bytes | None:
    """The undecoded bytes of a JPEG item (a whole file or a tar member), for decoding on a device; None else."""
    if item.kind not in ("file", "tar-member"):
        return None
    name = item.meta["member"] if item.kind == "tar-member" else item.path.name
    if PurePosixPath(name).suffix.lower() not in JPEG_SUFFIXES:
        return None
    return encoded_bytes(item)
