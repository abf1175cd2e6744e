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
them and lists them in ``failures.jsonl`` (:func:`read_tile` raises OSError). A scene with overviews (a COG) is
scanned on the coarsest overview that keeps at least :data:`SCAN_MIN_PIXELS` pixels across a window, so listing
a remote COG fetches a small part of it; a window counts as holding data when an overview pixel over it is valid.

A scene is a :class:`SceneBands`: the chosen bands of one raster, or band 1 of each of three single-band
rasters (red, green, blue; :mod:`mpsclip.archive.remote`), read onto the pixel grid of the finest one (windows are
in its pixels; coarser bands are read resampled, bilinear when enlarging and average when shrinking). Local
GeoTIFF scenes and remote rasters share this code: listing (:func:`tile_metas`) and reading
(:func:`read_window`). Rasters open only with the drivers of :data:`ALLOWED_DRIVERS` (a VRT or any other format
that names further files or URLs is refused), local ones only when they are regular files.

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
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.env import env_ctx_if_needed
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from mpsclip.archive.items import (
    Item,
    TileSettings,
    check_regular_file,
    relative_to_root,
    window_offsets,
    window_suffix,
)
from mpsclip.errors import MPSCLIPError

PERCENTILES = (2.0, 98.0)
CHUNK_PIXELS = 1 << 22
"""Pixels per band read at a time while listing a scene (memory stays bounded for big scenes)."""
SAMPLE_PIXELS = 1 << 20
"""At most about this many pixels of a scene are sampled for its percentile stretch."""
SCAN_MIN_PIXELS = 8
"""A scene with overviews is scanned on one that keeps at least this many pixels across a window."""
ALLOWED_DRIVERS = ("GTiff", "JPEG", "PNG", "WEBP")
"""The GDAL drivers rasters open with (COGs are GTiff); VRT and other indirection drivers are refused."""


def open_raster(source: str | Path) -> Any:
    """A rasterio dataset of ``source`` (a local path, or a ``/vsicurl/`` / ``/vsis3/`` path) opened only with
    :data:`ALLOWED_DRIVERS`; a local source must be a regular file. Raises OSError or RasterioError."""
    name = str(source)
    if not name.startswith(("/vsicurl/", "/vsis3/")):
        check_regular_file(Path(name))
    with env_ctx_if_needed():  # rasterio.open takes one driver name; the reader takes the allowed list
        src = DatasetReader(name, driver=list(ALLOWED_DRIVERS), sharing=False)
    if src.driver not in ALLOWED_DRIVERS:  # belt and braces: the driver list is what GDAL was allowed to try
        src.close()
        raise OSError(f"{name}: a {src.driver} raster; only {', '.join(ALLOWED_DRIVERS)} are read")
    return src


def georeferenced(src: Any) -> bool:
    return src.crs is not None and src.transform != Affine.identity()


def is_georeferenced(path: Path) -> bool:
    """True for a file rasterio opens (with an allowed driver) that has a CRS and a non-identity transform."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with open_raster(path) as src:
                return georeferenced(src)
    except (RasterioError, OSError):
        return False


def window_bounds(window: Window, transform: Affine) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a window's four corners in the scene's CRS."""
    col, row, width, height = window.col_off, window.row_off, window.width, window.height
    corners = [transform @ (c, r) for c in (col, col + width) for r in (row, row + height)]
    xs, ys = [x for x, _ in corners], [y for _, y in corners]
    return min(xs), min(ys), max(xs), max(ys)


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


def pixel_scale(crs: CRS, res: tuple[float, float], resolution: float, scene: Path | str) -> tuple[float, float]:
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


def scene_cut(
    crs: CRS, res: tuple[float, float], settings: TileSettings, scene: Path | str
) -> tuple[Cut, float, float]:
    """The cut of a scene and its scene pixels per output pixel (1, 1 without ``resolution``)."""
    if settings.resolution is None:
        return Cut(settings.tile_size, settings.tile_size, settings.stride, settings.stride), 1.0, 1.0
    sx, sy = pixel_scale(crs, res, settings.resolution, scene)

    def px(n: int, scale: float) -> int:
        return max(1, round(n * scale))

    cut = Cut(px(settings.tile_size, sx), px(settings.tile_size, sy), px(settings.stride, sx), px(settings.stride, sy))
    return cut, sx, sy


def choose_bands(count: int, bands: tuple[int, ...] | None, scene: Path | str) -> tuple[int, ...]:
    """The 1-based bands to read: ``bands``, or 1,2,3 (1 for a scene with fewer than three bands)."""
    if bands is None:
        return (1, 2, 3) if count >= 3 else (1,)
    if len(bands) not in (1, 3):
        raise MPSCLIPError(f"--bands takes 1 band (grey) or 3 bands (red,green,blue), got {len(bands)}")
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise MPSCLIPError(f"{scene}: has {count} bands, --bands asks for {', '.join(map(str, bad))}")
    return bands


class SceneBands:
    """The bands of a scene on one pixel grid (see the module's docstring): ``layers`` holds one (dataset, band)
    per output band, ``grid`` the dataset whose pixels windows count in. Reads like a rasterio dataset whose
    bands are the layers (1-based)."""

    def __init__(self, layers: list[tuple[Any, int]], grid: Any) -> None:
        self.layers, self.grid = layers, grid
        self.width, self.height, self.crs = grid.width, grid.height, grid.crs
        self.transform, self.res = grid.transform, grid.res
        self.count = len(layers)
        self.indexes = tuple(range(1, len(layers) + 1))
        self.dtypes = [ds.dtypes[band - 1] for ds, band in layers]
        self.nodata = [ds.nodatavals[band - 1] for ds, band in layers]

    def overview_factors(self) -> list[int]:
        ds, band = self.layers[0] if self.layers[0][0] is self.grid else (self.grid, 1)
        return list(ds.overviews(band))

    def _own_window(self, ds: Any, window: Window) -> Window:
        """``window`` (grid pixels) in ``ds``'s pixels: the same window on the same grid, else the ground it
        covers (fractional offsets, clipped to the raster)."""
        if ds is self.grid or (ds.transform == self.grid.transform and ds.shape == self.grid.shape):
            return window
        own = from_bounds(*window_bounds(window, self.grid.transform), transform=ds.transform)
        col0, row0 = max(own.col_off, 0.0), max(own.row_off, 0.0)
        col1, row1 = min(own.col_off + own.width, ds.width), min(own.row_off + own.height, ds.height)
        return Window(col0, row0, max(col1 - col0, 1e-6), max(row1 - row0, 1e-6))

    def read(
        self,
        indexes: list[int],
        window: Window,
        out_shape: tuple[int, ...] | None = None,
        resampling: Resampling | None = Resampling.nearest,
    ) -> np.ndarray:
        """[len(indexes), H, W] pixels of ``window`` (``out_shape`` ``(.., H, W)``, default the window's size);
        ``resampling`` None: average where a layer shrinks, bilinear where it is enlarged."""
        height, width = out_shape[-2:] if out_shape else (int(window.height), int(window.width))
        layers = [self.layers[i - 1] for i in indexes]
        dtype = np.result_type(*[ds.dtypes[band - 1] for ds, band in layers])
        out = np.empty((len(layers), height, width), dtype=dtype)
        i = 0
        while i < len(layers):  # consecutive layers of one dataset on one window: one read
            ds = layers[i][0]
            j = i
            while j < len(layers) and layers[j][0] is ds:
                j += 1
            own = self._own_window(ds, window)
            shrink = own.width * own.height > width * height
            chosen = resampling or (Resampling.average if shrink else Resampling.bilinear)
            bands = [band for _, band in layers[i:j]]
            out[i:j] = ds.read(bands, window=own, out_shape=(j - i, height, width), resampling=chosen)
            i = j
        return out


@contextmanager
def open_scene(sources: Sequence[str | Path], bands: tuple[int, ...] | None, where: str) -> Iterator[SceneBands]:
    """The :class:`SceneBands` of one raster (``bands``, see :func:`choose_bands`) or of three single-band rasters
    (red, green, blue; band 1 of each), on the grid of the finest; raises MPSCLIPError for a bad choice of bands
    or rasters that do not share a CRS, OSError or RasterioError for an unreadable raster."""
    if len(sources) not in (1, 3):
        raise MPSCLIPError(
            f"{where}: a scene is 1 raster or 3 single-band rasters (red, green, blue), not {len(sources)}"
        )
    with ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        datasets = [stack.enter_context(open_raster(source)) for source in sources]
        if len(datasets) == 1:
            ds = datasets[0]
            yield SceneBands([(ds, band) for band in choose_bands(ds.count, bands, where)], ds)
            return
        if bands is not None and tuple(bands) != (1, 1, 1):
            raise MPSCLIPError(f"{where}: --bands picks bands of one raster; band assets give red, green, blue")
        if len({str(ds.crs) for ds in datasets}) > 1:
            raise MPSCLIPError(f"{where}: the band rasters are in different CRSs; reproject them to one")
        grid = min(datasets, key=lambda ds: abs(ds.res[0] * ds.res[1]))  # the finest (the first among equals)
        yield SceneBands([(ds, 1) for ds in datasets], grid)


def valid_pixels(data: np.ndarray, nodata: float | None | Sequence[float | None]) -> np.ndarray:
    """[H, W] mask of pixels that are not nodata (in any band; ``nodata`` one value or one per band) and not zero
    in every band."""
    valid = np.any(data != 0, axis=0)
    per_band = list(nodata) if isinstance(nodata, (list, tuple)) else [nodata] * len(data)
    for band, value in zip(data, per_band, strict=True):
        if value is not None:
            valid &= ~(np.isnan(band) if np.isnan(value) else band == value)
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


def scan_factor(scene: SceneBands, cut: Cut) -> int:
    """The overview a scene is scanned on (1: full resolution; see the module's docstring)."""
    fitting = [f for f in scene.overview_factors() if f * SCAN_MIN_PIXELS <= min(cut.width, cut.height)]
    return max(fitting, default=1)


def scan_scene(src: Any, bands: tuple[int, ...], windows: list[Window], sample: bool, factor: int = 1) -> Scan:
    """Read the scene once, in full-width strips of CHUNK_PIXELS pixels or one row (see the module's docstring),
    at 1 / ``factor`` of its resolution."""
    rows = np.unique([edge for w in windows for edge in (w.row_off, w.row_off + w.height)])
    cols = np.unique([edge for w in windows for edge in (w.col_off, w.col_off + w.width)])
    scan = Scan(rows, cols, np.zeros((len(rows) - 1, len(cols) - 1), dtype=bool), [])
    out_width = max(1, round(src.width / factor))
    step = max(1, math.ceil(math.sqrt(out_width * max(1, round(src.height / factor)) / SAMPLE_PIXELS)))
    strip = max(1, CHUNK_PIXELS * factor * factor // src.width)
    out_row = 0
    for cell, (top, bottom) in enumerate(zip(rows[:-1].tolist(), rows[1:].tolist(), strict=True)):
        for row in range(top, bottom, strip):
            window = Window(0, row, src.width, min(strip, bottom - row))
            try:
                if factor == 1:
                    data = src.read(list(bands), window=window)
                else:
                    shape = (len(bands), max(1, round(window.height / factor)), out_width)
                    data = src.read(list(bands), window=window, out_shape=shape)
            except RasterioError:
                scan.cells[cell] = True  # keep these tiles: reading them fails, which lists them in failures.jsonl
                continue
            valid = valid_pixels(data, src.nodata)
            columns = valid.any(axis=0)
            if factor != 1:  # each scene column takes the overview column over it
                columns = columns[(np.arange(src.width) * out_width) // src.width]
            scan.cells[cell] |= np.logical_or.reduceat(columns, cols[:-1])
            if sample:
                grid = (slice(-out_row % step, None, step), slice(None, None, step))
                scan.samples.append(data[:, grid[0], grid[1]][:, valid[grid]].T)
            out_row += data.shape[1]
    return scan


def out_size(window: Window, cut: Cut, tile_size: int, sx: float, sy: float) -> list[int]:
    """[width, height] in output pixels: ``tile_size`` along a full window's axis, else scene pixels / scale."""
    width = tile_size if window.width == cut.width else max(1, round(window.width / sx))
    height = tile_size if window.height == cut.height else max(1, round(window.height / sy))
    return [width, height]


def tile_metas(scene: SceneBands, settings: TileSettings, where: str) -> list[tuple[str, dict[str, Any]]]:
    """``(r<row>_c<col>, meta)`` of the tiles of ``scene`` that hold data: meta ``crs``, ``stretch``, ``window``,
    ``footprint`` and, with ``resolution``, ``out_size`` (see the module's docstring)."""
    cut, sx, sy = scene_cut(scene.crs, scene.res, settings, where)
    eight_bit = all(dtype == "uint8" for dtype in scene.dtypes)
    windows = scene_windows(scene.width, scene.height, cut)
    scan = scan_scene(scene, scene.indexes, windows, sample=not eight_bit, factor=scan_factor(scene, cut))
    base = {"crs": scene.crs.to_string(), "stretch": None if eight_bit else stretch_limits(scan.samples, scene.count)}
    tiles = []
    for w in windows:
        if not scan.holds_data(w):
            continue
        fp = transform_bounds(scene.crs, "EPSG:4326", *window_bounds(w, scene.transform))
        meta: dict[str, Any] = {
            **base,
            "window": [int(w.col_off), int(w.row_off), int(w.width), int(w.height)],
            "footprint": [float(v) for v in fp],
        }
        if settings.resolution is not None:
            meta["out_size"] = out_size(w, cut, settings.tile_size, sx, sy)
        tiles.append((window_suffix(int(w.col_off), int(w.row_off)), meta))
    return tiles


def scene_tiles(path: Path, scene_id: str, settings: TileSettings, root: Path) -> list[Item]:
    """The tiles of one scene that hold data (see the module's docstring), meta ``scene`` relative to ``root``;
    raises MPSCLIPError if unreadable."""
    try:
        with open_scene([path], settings.bands, str(path)) as scene:
            bands = [band for _, band in scene.layers]
            base = {"kind": "geotiff-window", "scene": relative_to_root(path, root), "bands": bands}
            return [
                Item(f"{scene_id}/{suffix}", path, {**base, **meta}, "geotiff-window")
                for suffix, meta in tile_metas(scene, settings, str(path))
            ]
    except (RasterioError, OSError) as err:
        raise MPSCLIPError(f"{path}: cannot read the scene ({err}); fix or remove the file") from err


def to_uint8(data: np.ndarray, stretch: list[list[float]] | None) -> np.ndarray:
    """[bands, H, W] pixels as uint8: 8-bit data as is, other data stretched linearly from [lo, hi] per band."""
    if stretch is None:
        return data.astype(np.uint8)
    out = np.empty(data.shape, dtype=np.uint8)
    for band, (lo, hi) in enumerate(stretch):
        scaled = (data[band].astype(np.float64) - lo) * (255.0 / max(hi - lo, 1e-12))
        out[band] = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    return out


def rgb_image(pixels: np.ndarray) -> Image.Image:
    """[1 or 3, H, W] uint8 pixels as an RGB image (one band repeated as grey)."""
    if pixels.shape[0] == 1:
        pixels = np.repeat(pixels, 3, axis=0)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))


def read_window(scene: SceneBands, meta: dict[str, Any]) -> Image.Image:
    """The RGB image of a tile's meta (``window``, ``stretch``, ``out_size``) from its scene; a window outside
    the scene raises OSError."""
    col, row, width, height = meta["window"]
    out_width, out_height = meta.get("out_size", (width, height))
    if col < 0 or row < 0 or col + width > scene.width or row + height > scene.height:
        raise OSError(f"window {meta['window']} is outside the {scene.width}x{scene.height} scene")
    data = scene.read(list(scene.indexes), Window(col, row, width, height), (out_height, out_width), None)
    return rgb_image(to_uint8(data, meta["stretch"]))


def read_whole(scene: SceneBands, max_side: int) -> Image.Image:
    """The whole scene as an RGB image at most ``max_side`` pixels on its longer side (read from overviews when
    it has them); data that is not 8-bit is stretched by its own 2nd-98th percentiles of valid pixels."""
    scale = min(1.0, max_side / max(scene.width, scene.height))
    shape = (max(1, round(scene.height * scale)), max(1, round(scene.width * scale)))
    data = scene.read(list(scene.indexes), Window(0, 0, scene.width, scene.height), shape, None)
    stretch = None
    if any(dtype != "uint8" for dtype in scene.dtypes):
        valid = valid_pixels(data, scene.nodata)
        stretch = stretch_limits([data[:, valid].T], scene.count)
    return rgb_image(to_uint8(data, stretch))


def read_tile(path: Path, meta: dict[str, Any]) -> Image.Image:
    """The RGB image of a ``geotiff-window`` item, resampled to meta ``out_size`` when it has one; a window that
    cannot be read raises OSError (like an unreadable image)."""
    try:
        with open_scene([path], tuple(meta["bands"]), str(path)) as scene:
            return read_window(scene, meta)
    except (RasterioError, MPSCLIPError) as err:
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        raise OSError(f"{type(err).__name__}: {err}{cause}") from err
