"""Tiny georeferenced GeoTIFF scenes for the serving tests (needs rasterio: call after ``require("rasterio")``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

HOSTILE = "<img src=x onerror=window.pwned=1>"
"""A scene file name that is markup: the page must show it as text."""


def write_scene(path: Path, data: np.ndarray, crs: str, transform: Any, nodata: float | None = None) -> Path:
    """A GeoTIFF of ``data`` [bands, H, W]."""
    import rasterio

    profile = {
        "driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
        "dtype": data.dtype.name, "crs": crs, "transform": transform, "nodata": nodata,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def harbour(path: Path) -> Path:
    """3-band uint8, 128 x 96 px of 10 m in EPSG:32633 (near 15.0 E, 45.1 N): a blue sea on the left, a green
    shore on the right, a grey pier in the middle; seeded noise on top."""
    from affine import Affine

    rng = np.random.default_rng(0)
    data = np.zeros((3, 96, 128), dtype=np.uint8)
    data[:, :, :56] = np.array([30, 70, 150])[:, None, None]
    data[:, :, 56:] = np.array([60, 130, 50])[:, None, None]
    data[:, 40:56, 20:90] = 170
    data = np.clip(data + rng.integers(-20, 21, size=data.shape), 1, 255).astype(np.uint8)
    return write_scene(path, data, "EPSG:32633", Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), nodata=0)


def hostile(folder: Path) -> Path:
    """1-band uint16, 64 x 64 px of 0.0001 degree in EPSG:4326 (from 15.02 E, 45.16 N), named :data:`HOSTILE`;
    its bottom-right 32 px tile is nodata (65535), so it gives 3 tiles."""
    from affine import Affine

    yy, xx = np.mgrid[0:64, 0:64]
    data = (1000 + 30 * xx + 10 * yy).astype(np.uint16)[None]
    data[:, 32:, 32:] = 65535
    return write_scene(folder / f"{HOSTILE}.tif", data, "EPSG:4326", Affine(1e-4, 0.0, 15.02, 0.0, -1e-4, 45.16),
                       nodata=65535)


def two_scenes(folder: Path) -> Path:
    """``folder`` holding :func:`harbour` (12 tiles of 32 px) and :func:`hostile` (3 tiles)."""
    folder.mkdir(parents=True, exist_ok=True)
    harbour(folder / "harbour.tif")
    hostile(folder)
    return folder
