"""Tiles of georeferenced GeoTIFF scenes as archive items (needs ``rasterio``: ``pip install mpsclip[geo]``).

A scene is cut into tiles of ``tile_size`` pixels every ``stride`` pixels; the last row and column of windows are
shifted back to end at the scene's edge, so the whole scene is covered with full-size tiles (a scene smaller than
one tile gives one tile of its own size). Pixels are the scene's own, or with ``resolution`` (``--resolution``)
pixels of that many metres: in a projected CRS, a tile's window then spans ``round(tile_size * resolution /
pixel size)`` scene pixels per axis and is read resampled (average when shrinking, bilinear when enlarging) to
``tile_size`` pixels, so a tile covers ``tile_size * resolution`` metres to within half a scene pixel.

Listing a scene reads it once, in full-width strips of :data:`CHUNK_PIXELS` pixels (at least one row): windows
whose pixels are all nodata or all zero are left out, and for imagery that is not 8-bit the per-band 2nd and 98th
percentiles of valid pixels (sampled on a grid of about :data:`SAMPLE_PIXELS`) are recorded, to stretch each tile
to 8 bits when it is read. A strip that cannot be read keeps its windows: reading those tiles fails, which skips
them and lists them in ``failures.jsonl`` (:func:`read_tile` raises OSError).

Each tile is an :class:`Item` of kind ``geotiff-window`` with id ``<scene id>/r<row_off>_c<col_off>`` (zero-padded)
and meta ``kind``, ``scene`` (relative to the source root), ``window`` ``[col_off, row_off, width, height]`` in
scene pixels, ``crs`` (e.g. ``EPSG:32633``), ``footprint`` ``[west, south, east, north]`` in EPSG:4326 degrees
(west > east for a tile across the antimeridian; stores write it as GeoParquet geometry,
:mod:`mpsclip.archive.geoparquet`), ``bands`` (1-based), ``stretch`` (``[[lo, hi], ...]`` per band, or None for
8-bit data) and, with ``resolution``, ``out_size`` ``[width, height]`` in output pixels.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from mpsclip.archive.items import Item, TileSettings, relative_to_root
from mpsclip.errors import MPSCLIPError

PERCENTILES = (2.0, 98.0)
CHUNK_PIXELS = 1 << 22
"""Pixels per band read at a time while listing a scene (memory stays bounded for big scenes)."""
SAMPLE_PIXELS = 1 << 20
"""At most about this many pixels of a scene are sampled for its percentile stretch."""


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


@dataclass(frozen=True)
class Cut:
    """How a scene is cut, in scene pixels: window width and height, column and row steps."""

    width: int
    height: int
    col_step: int
    row_step: int


def scene_windows(width: int, height: int, cut: Cut) -> list[Window]:
    return [
        Window(col, row, min(cut.width, width), min(cut.height, height))
        for row in window_offsets(height, cut.height, cut.row_step)
        for col in window_offsets(width, cut.width, cut.col_step)
    ]


def pixel_scale(crs: CRS, res: tuple[float, float], resolution: float, scene: Path) -> tuple[float, float]:
    """Scene pixels per output pixel of ``resolution`` metres, along x and y; needs a projected CRS."""
    if not crs.is_projected:
        raise MPSCLIPError(
            f"{scene}: --resolution is in metres but the scene's CRS {crs} is not projected; reproject the scene "
            "(e.g. gdalwarp -t_srs EPSG:32633) or drop --resolution"
        )
    try:
        _, metres_per_unit = crs.linear_units_factor
    except CRSError as err:
        raise MPSCLIPError(f"{scene}: --resolution needs the CRS's units in metres ({err}); drop --resolution") from err
    return resolution / (res[0] * metres_per_unit), resolution / (res[1] * metres_per_unit)


def scene_cut(crs: CRS, res: tuple[float, float], settings: TileSettings, scene: Path) -> tuple[Cut, float, float]:
    """The cut of a scene and its scene pixels per output pixel (1, 1 without ``resolution``)."""
    if settings.resolution is None:
        return Cut(settings.tile_size, settings.tile_size, settings.stride, settings.stride), 1.0, 1.0
    sx, sy = pixel_scale(crs, res, settings.resolution, scene)

    def px(n: int, scale: float) -> int:
        return max(1, round(n * scale))

    cut = Cut(px(settings.tile_size, sx), px(settings.tile_size, sy), px(settings.stride, sx), px(settings.stride, sy))
    return cut, sx, sy


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


@dataclass
class Scan:
    """One pass over a scene: which cells between window edges (``rows`` x ``cols``) hold a valid pixel, and
    valid pixels sampled on a grid (``[n, bands]`` arrays)."""

    rows: np.ndarray
    cols: np.ndarray
    cells: np.ndarray
    samples: list[np.ndarray]

    def holds_data(self, window: Window) -> bool:
        r0, r1 = np.searchsorted(self.rows, [window.row_off, window.row_off + window.height])
        c0, c1 = np.searchsorted(self.cols, [window.col_off, window.col_off + window.width])
        return bool(self.cells[r0:r1, c0:c1].any())


def scan_scene(src: Any, bands: tuple[int, ...], windows: list[Window], sample: bool) -> Scan:
    """Read the scene once, in full-width strips of CHUNK_PIXELS pixels or one row (see the module's docstring)."""
    rows = np.unique([edge for w in windows for edge in (w.row_off, w.row_off + w.height)])
    cols = np.unique([edge for w in windows for edge in (w.col_off, w.col_off + w.width)])
    scan = Scan(rows, cols, np.zeros((len(rows) - 1, len(cols) - 1), dtype=bool), [])
    step = max(1, math.ceil(math.sqrt(src.width * src.height / SAMPLE_PIXELS)))
    strip = max(1, CHUNK_PIXELS // src.width)
    for cell, (top, bottom) in enumerate(zip(rows[:-1].tolist(), rows[1:].tolist(), strict=True)):
        for row in range(top, bottom, strip):
            try:
                data = src.read(list(bands), window=Window(0, row, src.width, min(strip, bottom - row)))
            except RasterioError:
                scan.cells[cell] = True  # keep these tiles: reading them fails, which lists them in failures.jsonl
                continue
            valid = valid_pixels(data, src.nodata)
            scan.cells[cell] |= np.logical_or.reduceat(valid.any(axis=0), cols[:-1])
            if sample:
                grid = (slice(-row % step, None, step), slice(None, None, step))
                scan.samples.append(data[:, grid[0], grid[1]][:, valid[grid]].T)
    return scan


def out_size(window: Window, cut: Cut, tile_size: int, sx: float, sy: float) -> list[int]:
    """[width, height] in output pixels: ``tile_size`` along a full window's axis, else scene pixels / scale."""
    width = tile_size if window.width == cut.width else max(1, round(window.width / sx))
    height = tile_size if window.height == cut.height else max(1, round(window.height / sy))
    return [width, height]


def scene_tiles(path: Path, scene_id: str, settings: TileSettings, root: Path) -> list[Item]:
    """The tiles of one scene that hold data (see the module's docstring), meta ``scene`` relative to ``root``;
    raises MPSCLIPError if unreadable."""
    try:
        return _scene_tiles(path, scene_id, settings, root)
    except RasterioError as err:
        raise MPSCLIPError(f"{path}: cannot read the scene ({err}); fix or remove the file") from err


def _scene_tiles(path: Path, scene_id: str, settings: TileSettings, root: Path) -> list[Item]:
    with rasterio.open(path) as src:
        bands = choose_bands(src.count, settings.bands, path)
        cut, sx, sy = scene_cut(src.crs, src.res, settings, path)
        eight_bit = all(src.dtypes[band - 1] == "uint8" for band in bands)
        windows = scene_windows(src.width, src.height, cut)
        scan = scan_scene(src, bands, windows, sample=not eight_bit)
        stretch = None if eight_bit else stretch_limits(scan.samples, len(bands))
        scene = relative_to_root(path, root)
        base = {"kind": "geotiff-window", "scene": scene, "crs": src.crs.to_string(), "bands": list(bands)}
        base["stretch"] = stretch
        items = []
        for w in windows:
            if not scan.holds_data(w):
                continue
            fp = transform_bounds(src.crs, "EPSG:4326", *window_bounds(w, src.transform))
            meta: dict[str, Any] = {
                **base,
                "window": [int(w.col_off), int(w.row_off), int(w.width), int(w.height)],
                "footprint": [float(v) for v in fp],
            }
            if settings.resolution is not None:
                meta["out_size"] = out_size(w, cut, settings.tile_size, sx, sy)
            tile_id = f"{scene_id}/r{int(w.row_off):06d}_c{int(w.col_off):06d}"
            items.append(Item(tile_id, path, meta, "geotiff-window"))
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
    """The RGB image of a tile item, resampled to meta ``out_size`` when it has one; a window that cannot be read
    raises OSError (like an unreadable image)."""
    col, row, width, height = meta["window"]
    out_width, out_height = meta.get("out_size", (width, height))
    shrink = out_width * out_height < width * height
    bands = list(meta["bands"])
    try:
        with rasterio.open(path) as src:
            if col < 0 or row < 0 or col + width > src.width or row + height > src.height:
                raise OSError(f"window {meta['window']} is outside the {src.width}x{src.height} scene")
            data = src.read(
                bands,
                window=Window(col, row, width, height),
                out_shape=(len(bands), out_height, out_width),
                resampling=Resampling.average if shrink else Resampling.bilinear,
            )
    except RasterioError as err:
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        raise OSError(f"{type(err).__name__}: {err}{cause}") from err
    pixels = to_uint8(data, meta["stretch"])
    if pixels.shape[0] == 1:
        pixels = np.repeat(pixels, 3, axis=0)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
