"""Scenes of georeferenced stores and their quicklooks: low-resolution PNGs rendered from the GeoTIFFs themselves.

A store's scenes are the GeoTIFFs its ``geotiff-window`` tiles were cut from (meta ``scene``, relative to the
manifest's ``source_root``), numbered in the order their first tile appears; a request names a scene by that
number, never by a path. Each scene is listed with its EPSG:4326 bounds ``[west, south, east, north]`` (the
scene's own bounds transformed, edges densified) and the pixel size of its quicklook.

A quicklook is the scene read decimated (GDAL uses the file's overviews when it has them) to at most
:data:`MAX_SIDE` pixels on its long side, with the bands and 2-98 % stretch its tiles were embedded with, then
warped onto a regular lon/lat grid spanning those bounds (so a footprint maps onto it linearly), with square
ground pixels (width scaled by the cosine of the mid latitude). Nodata and all-zero pixels are transparent.
PNGs are kept in memory, :data:`CACHE_SIZE` at most, keyed by the file's path, size and modification time; a
scene asked for while it renders is rendered once (:class:`RenderCache`).

rasterio (``mpsclip[geo]``) is imported only when a scene is opened: stores without GeoTIFF tiles do not need it.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from mpsclip.serve import metrics
from PIL import Image

from mpsclip.archive.items import resolve_source_path
from mpsclip.archive.search import BBox, footprint
from mpsclip.errors import MPSCLIPError

MAX_SIDE = 512
"""Longest side of a quicklook in pixels (smaller scenes keep their own size)."""
CACHE_SIZE = 32
"""Quicklook PNGs kept in memory (each at most MAX_SIDE² RGBA pixels, compressed)."""


@dataclass(frozen=True)
class Scene:
    """One GeoTIFF of a store: ``name`` as tile metas record it, ``path`` on this machine, the ``bands`` and
    ``stretch`` its tiles use, ``bounds`` in EPSG:4326, quicklook ``size`` (width, height) and ``tiles`` (how
    many of the store's items come from it). ``error`` says why the file cannot be opened (then ``bounds`` is the
    union of the tiles' footprints and there is no quicklook)."""

    index: int
    name: str
    path: Path
    bands: tuple[int, ...]
    stretch: tuple[tuple[float, float], ...] | None
    bounds: BBox
    size: tuple[int, int]
    tiles: int
    error: str | None = None


def quicklook_size(bounds: BBox, width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) of a lon/lat grid over ``bounds`` with square ground pixels, its long side
    ``min(max_side, the scene's long side in pixels)``."""
    west, south, east, north = bounds
    ground_aspect = (east - west) * math.cos(math.radians((south + north) / 2)) / max(north - south, 1e-12)
    side = max(1, min(max_side, max(width, height)))
    if ground_aspect >= 1:
        return side, max(1, round(side / ground_aspect))
    return max(1, round(side * ground_aspect)), side


def scene_bounds(src: Any) -> BBox:
    """EPSG:4326 bounds of an open rasterio dataset."""
    from rasterio.warp import transform_bounds

    west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
    return float(west), float(south), float(east), float(north)


def open_scene(index: int, name: str, path: Path, metas: list[dict[str, Any]]) -> Scene:
    """The :class:`Scene` of ``path`` given the metas of its tiles (the first one's bands and stretch)."""
    first = metas[0]
    bands = tuple(int(b) for b in first["bands"])
    stretch = tuple((float(lo), float(hi)) for lo, hi in first["stretch"]) if first.get("stretch") else None
    try:
        import rasterio
        from rasterio.errors import RasterioError

        with rasterio.open(path) as src:
            bounds = scene_bounds(src)
            size = quicklook_size(bounds, src.width, src.height)
        return Scene(index, name, path, bands, stretch, bounds, size, len(metas))
    except (ImportError, OSError, RasterioError) as err:
        prints = np.array([fp for m in metas if (fp := footprint(m)) is not None] or [[0.0] * 4])
        west, south = prints[:, :2].min(axis=0).tolist()
        east, north = prints[:, 2:].max(axis=0).tolist()
        bounds = (west, south, east, north)
        error = f"scene {name!r}: its GeoTIFF {path} cannot be opened ({type(err).__name__}: {err})"
        return Scene(index, name, path, bands, stretch, bounds, (1, 1), len(metas), error)


def list_scenes(metas: list[dict[str, Any]], manifest: dict[str, Any]) -> list[Scene]:
    """The scenes of a store's ``geotiff-window`` items, in the order their first tile appears."""
    tiles: dict[str, list[dict[str, Any]]] = {}
    for meta in metas:
        if meta.get("kind") == "geotiff-window" and isinstance(meta.get("scene"), str):
            tiles.setdefault(meta["scene"], []).append(meta)
    return [
        open_scene(index, name, resolve_source_path(manifest, name), group)
        for index, (name, group) in enumerate(tiles.items())
    ]


class RenderCache:
    """At most ``size`` rendered PNGs, least recently used dropped first, and single flight: a key asked for while
    it renders waits for that render (eight concurrent cold requests of a scene render it once)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._done: OrderedDict[Hashable, bytes] = OrderedDict()
        self._running: dict[Hashable, Future[bytes]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, render: Callable[[], bytes]) -> bytes:
        """The PNG of ``key``: from memory, from the render in flight, or ``render()`` now (its error is raised
        to every request waiting for it)."""
        with self._lock:
            if key in self._done:
                self._done.move_to_end(key)
                return self._done[key]
            running = self._running.get(key)
            if running is None:
                mine: Future[bytes] = Future()
                self._running[key] = mine
        if running is not None:
            return running.result()
        try:
            png = render()
        except BaseException as err:
            with self._lock:
                del self._running[key]
            mine.set_exception(err)
            raise
        with self._lock:
            self._done[key] = png
            while len(self._done) > self.size:
                self._done.popitem(last=False)
            del self._running[key]
        mine.set_result(png)
        return png


CACHE = RenderCache()


def render_quicklook(scene: Scene) -> bytes:
    """The scene's quicklook PNG (cached; see the module's docstring); raises MPSCLIPError if it cannot be read."""
    if scene.error is not None:
        raise MPSCLIPError(scene.error)
    try:
        stat = scene.path.stat()
        key = (str(scene.path), stat.st_size, stat.st_mtime_ns, scene.bands, scene.stretch, scene.bounds, scene.size)
        return CACHE.get(key, lambda: render(scene))
    except OSError as err:
        raise MPSCLIPError(f"scene {scene.name!r}: its GeoTIFF {scene.path} cannot be read ({err})") from err


def render(scene: Scene) -> bytes:
    """The quicklook PNG of ``scene``, rendered from its GeoTIFF now (counted in ``mpsclip_quicklook_renders_total``);
    OSError if it cannot be read."""
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError
    from rasterio.transform import from_bounds
    from rasterio.warp import reproject

    from mpsclip.archive.geotiff import to_uint8, valid_pixels

    metrics.QUICKLOOK_RENDERS.inc()
    bands, stretch, bounds, size = scene.bands, scene.stretch, scene.bounds, scene.size
    try:
        with rasterio.open(scene.path) as src:
            scale = max(1.0, max(src.width, src.height) / max(size))
            shape = (len(bands), max(1, round(src.height / scale)), max(1, round(src.width / scale)))
            data = src.read(list(bands), out_shape=shape, resampling=Resampling.average)
            transform = src.transform @ Affine.scale(src.width / shape[2], src.height / shape[1])
            crs, nodata = src.crs, src.nodata
    except RasterioError as err:
        raise OSError(f"{type(err).__name__}: {err}") from err
    pixels = to_uint8(data, [list(s) for s in stretch] if stretch else None)
    if pixels.shape[0] == 1:
        pixels = np.repeat(pixels, 3, axis=0)
    alpha = valid_pixels(data, nodata).astype(np.uint8) * 255
    rgba = np.concatenate([pixels, alpha[None]])
    out = np.zeros((4, size[1], size[0]), dtype=np.uint8)
    reproject(
        rgba, out, src_transform=transform, src_crs=crs, dst_transform=from_bounds(*bounds, size[0], size[1]),
        dst_crs="EPSG:4326", resampling=Resampling.bilinear,
    )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(out.transpose(1, 2, 0)), mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


class SceneCatalog:
    """Each served store's scenes, listed once per loaded store (a reloaded store is listed again)."""

    def __init__(self) -> None:
        self._listed: dict[str, tuple[Any, list[Scene]]] = {}
        self._lock = threading.Lock()

    def scenes(self, store: Any) -> list[Scene]:
        """The scenes of a :class:`~mpsclip.serve.catalog.Store` (``name``, ``metas``, ``info.manifest``)."""
        with self._lock:
            listed = self._listed.get(store.name)
            if listed is None or listed[0] is not store:
                listed = (store, list_scenes(store.metas, store.info.manifest))
                self._listed[store.name] = listed
            return listed[1]

    def scene(self, store: Any, index: int) -> Scene:
        """Scene number ``index`` of ``store``; KeyError naming the valid range otherwise."""
        scenes = self.scenes(store)
        if not scenes:
            raise KeyError(f"scene: store {store.name!r} has no GeoTIFF scenes")
        if not 0 <= index < len(scenes):
            raise KeyError(f"scene: store {store.name!r} has scenes 0..{len(scenes) - 1}, not {index}")
        return scenes[index]


def scene_json(store: str, scene: Scene) -> dict[str, Any]:
    """What ``GET /stores`` lists for a scene."""
    url = None if scene.error else f"/scenes/{quote(store, safe='')}/{scene.index}/quicklook"
    return {"index": scene.index, "name": scene.name, "bounds": list(scene.bounds), "size": list(scene.size),
            "tiles": scene.tiles, "quicklook_url": url, "error": scene.error}
