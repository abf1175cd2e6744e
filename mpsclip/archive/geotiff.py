"""Tiles of georeferenced GeoTIFF scenes as archive items (needs ``rasterio``: ``pip install mpsclip[geo]``).

A scene is cut into ``tile_size`` windows every ``stride`` pixels; the last row and column of windows are shifted
back to end at the scene's edge, so the whole scene is covered with full-size tiles (a scene smaller than one
tile gives one tile of its own size). Listing a scene reads it once: windows whose pixels are all nodata or all
zero are left out, and for imagery that is not 8-bit the per-band 2nd and 98th percentiles of the valid pixels
(sampled every 4th pixel) are recorded, to stretch each tile to 8 bits when it is read.

Each tile is an :class:`Item` with id ``<scene id>/r<row_off>_c<col_off>`` (zero-padded) and meta ``scene``
(absolute path), ``window`` ``[col_off, row_off, width, height]``, ``crs`` (e.g. ``EPSG:32633``), ``footprint``
``[minx, miny, maxx, maxy]`` in EPSG:4326, ``bands`` (1-based) and ``stretch`` (``[[lo, hi], ...]`` per band,
or None for 8-bit data).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from mpsclip.archive.sources import Item, TileSettings
from mpsclip.errors import MPSCLIPError

PERCENTILES = (2.0, 98.0)
SAMPLE_STEP = 4


def is_georeferenced(path: Path) -> bool:
    """True for a file rasterio opens that has a CRS and a non-identity transform."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.crs is not None and src.transform != Affine.identity()
    except RasterioError:
        return False


def window_bounds(window: Window, transform: Affine) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a window's four corners in the scene's CRS."""
    col, row, width, height = window.col_off, window.row_off, window.width, window.height
    corners = [transform @ (c, r) for c in (col, col + width) for r in (row, row + height)]
    xs, ys = [x for x, _ in corners], [y for _, y in corners]
    return min(xs), min(ys), max(xs), max(ys)


def window_offsets(size: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride``, the last one shifted to end at ``size``."""
    if size <= tile:
        return [0]
    offsets = list(range(0, size - tile + 1, stride))
    if offsets[-1] != size - tile:
        offsets.append(size - tile)
    return offsets


def scene_windows(width: int, height: int, tile: int, stride: int) -> list[Window]:
    return [
        Window(col, row, min(tile, width), min(tile, height))
        for row in window_offsets(height, tile, stride)
        for col in window_offsets(width, tile, stride)
    ]


def choose_bands(count: int, bands: tuple[int, ...] | None, scene: Path) -> tuple[int, ...]:
    """The 1-based bands to read: ``bands``, or 1,2,3 (1 for a scene with fewer than three bands)."""
    if bands is None:
        return (1, 2, 3) if count >= 3 else (1,)
    if len(bands) not in (1, 3):
        raise MPSCLIPError(f"--bands takes 1 band (grey) or 3 bands (red,green,blue), got {len(bands)}")
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise MPSCLIPError(f"{scene}: has {count} bands, --bands asks for {', '.join(map(str, bad))}")
    return bands


def valid_pixels(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """[H, W] mask of pixels that are not nodata (in any band) and not zero in every band."""
    valid = np.any(data != 0, axis=0)
    if nodata is not None:
        valid &= ~np.any(np.isnan(data) if np.isnan(nodata) else data == nodata, axis=0)
    return valid


def stretch_limits(samples: list[np.ndarray], n_bands: int) -> list[list[float]]:
    """Per-band [2nd, 98th] percentiles of sampled valid pixels ([n, bands] arrays)."""
    values = np.concatenate(samples) if samples else np.zeros((0, n_bands))
    if len(values) == 0:
        return [[0.0, 1.0] for _ in range(n_bands)]
    lo, hi = np.percentile(values, PERCENTILES, axis=0)
    return [[float(a), float(b)] for a, b in zip(lo, hi, strict=True)]


def scene_tiles(path: Path, scene_id: str, settings: TileSettings) -> list[Item]:
    """The tiles of one scene that hold data (see the module's docstring); raises MPSCLIPError if unreadable."""
    try:
        return _scene_tiles(path, scene_id, settings)
    except RasterioError as err:
        raise MPSCLIPError(f"{path}: cannot read the scene ({err}); fix or remove the file") from err


def _scene_tiles(path: Path, scene_id: str, settings: TileSettings) -> list[Item]:
    with rasterio.open(path) as src:
        bands = choose_bands(src.count, settings.bands, path)
        kept: list[Window] = []
        samples: list[np.ndarray] = []
        for window in scene_windows(src.width, src.height, settings.tile_size, settings.stride):
            data = src.read(list(bands), window=window)
            valid = valid_pixels(data, src.nodata)
            if not valid.any():
                continue
            kept.append(window)
            step = (slice(None), slice(None, None, SAMPLE_STEP), slice(None, None, SAMPLE_STEP))
            samples.append(data[step][:, valid[step[1:]]].T.astype(np.float64))
        stretch = None if src.dtypes[0] == "uint8" else stretch_limits(samples, len(bands))
        crs = src.crs.to_string()
        base = {"scene": str(path.resolve()), "crs": crs, "bands": list(bands), "stretch": stretch}
        items = []
        for w in kept:
            fp = transform_bounds(src.crs, "EPSG:4326", *window_bounds(w, src.transform))
            meta = {
                **base,
                "window": [int(w.col_off), int(w.row_off), int(w.width), int(w.height)],
                "footprint": [float(v) for v in fp],
            }
            tile_id = f"{scene_id}/r{int(w.row_off):06d}_c{int(w.col_off):06d}"
            items.append(Item(id=tile_id, path=path, meta=meta))
        return items


def to_uint8(data: np.ndarray, stretch: list[list[float]] | None) -> np.ndarray:
    """[bands, H, W] pixels as uint8: 8-bit data as is, other data stretched linearly from [lo, hi] per band."""
    if stretch is None:
        return data.astype(np.uint8)
    out = np.empty(data.shape, dtype=np.uint8)
    for band, (lo, hi) in enumerate(stretch):
        scaled = (data[band].astype(np.float64) - lo) * (255.0 / max(hi - lo, 1e-12))
        out[band] = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    return out


def read_tile(path: Path, meta: dict[str, Any]) -> Image.Image:
    """The RGB image of a tile item; a window that cannot be read raises OSError (like an unreadable image)."""
    col, row, width, height = meta["window"]
    try:
        with rasterio.open(path) as src:
            if col < 0 or row < 0 or col + width > src.width or row + height > src.height:
                raise OSError(f"window {meta['window']} is outside the {src.width}x{src.height} scene")
            data = src.read(list(meta["bands"]), window=Window(col, row, width, height))
    except RasterioError as err:
        raise OSError(f"{type(err).__name__}: {err}") from err
    pixels = to_uint8(data, meta["stretch"])
    if pixels.shape[0] == 1:
        pixels = np.repeat(pixels, 3, axis=0)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
