from __future__ import annotations

import argparse
import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from extras import require

rasterio = require("rasterio")

from affine import Affine  # noqa: E402
from PIL import Image  # noqa: E402
from rasterio.warp import transform as warp_points  # noqa: E402

from mpsclip.archive import geotiff  # noqa: E402
from mpsclip.archive import job as job_mod  # noqa: E402
from mpsclip.archive.geotiff import Cut, read_tile, scan_scene, scene_windows, valid_pixels, window_offsets  # noqa: E402
from mpsclip.archive.items import READ_ERRORS, Item, TileSettings  # noqa: E402
from mpsclip.archive.sources import iter_items  # noqa: E402
from mpsclip.archive.store_reader import load_store  # noqa: E402
from mpsclip.cli import main  # noqa: E402
from mpsclip.commands import embed as embed_cmd  # noqa: E402
from mpsclip.errors import MPSCLIPError  # noqa: E402
from mpsclip.model import MPSCLIP  # noqa: E402

TILES = TileSettings(tile_size=32, stride=32)


def from_origin(west: float, north: float, xsize: float, ysize: float) -> Affine:
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


def write_scene(
    path: Path, data: np.ndarray, crs: str, transform: Affine, nodata: float | None = None, **options: Any
) -> Path:
    """A GeoTIFF of ``data`` [bands, H, W] (``options``: creation options such as ``tiled``)."""
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        **options,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def utm_scene(path: Path) -> Path:
    """3-band uint8, 64 x 96 px of 10 m in EPSG:32633; the top-left 32 px tile is all zero (nodata 0)."""
    data = np.random.default_rng(0).integers(1, 255, size=(3, 64, 96), dtype=np.uint8)
    data[:, :32, :32] = 0
    return write_scene(path, data, "EPSG:32633", from_origin(500000, 5000000, 10, 10), nodata=0)


def test_window_offsets() -> None:
    assert window_offsets(96, 32, 32) == [0, 32, 64]
    assert window_offsets(100, 32, 32) == [0, 32, 64, 68]
    assert window_offsets(20, 32, 16) == [0]
    assert window_offsets(64, 32, 16) == [0, 16, 32]


def test_utm_tiles_and_footprints(tmp_path: Path) -> None:
    utm_scene(tmp_path / "scene.tif")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.tif")  # not georeferenced: stays one image
    items = list(iter_items(tmp_path, TILES))
    assert [i.id for i in items] == [
        "plain.tif",
        "scene.tif/r000000_c000032",
        "scene.tif/r000000_c000064",
        "scene.tif/r000032_c000000",
        "scene.tif/r000032_c000032",
        "scene.tif/r000032_c000064",
    ]
    assert items[0].meta == {"kind": "file", "path": "plain.tif"} and items[4].kind == "geotiff-window"
    tile = items[4].meta
    assert tile["window"] == [32, 32, 32, 32] and tile["crs"] == "EPSG:32633" and tile["stretch"] is None
    assert tile["scene"] == "scene.tif" and tile["kind"] == "geotiff-window" and tile["bands"] == [1, 2, 3]
    # by hand: columns 32..64 -> x 500320..500640; rows 32..64 -> y 4999680..4999360
    lons, lats = warp_points("EPSG:32633", "EPSG:4326", [500320, 500640, 500320, 500640], [4999360] * 2 + [4999680] * 2)
    assert tile["footprint"] == pytest.approx([min(lons), min(lats), max(lons), max(lats)], abs=1e-6)
    assert 14.9 < tile["footprint"][0] < 15.1 and 45.0 < tile["footprint"][1] < 45.2
    assert len(list(iter_items(tmp_path))) == 2  # without tiles: two whole files
    alone = list(iter_items(tmp_path / "scene.tif", TILES))  # the scene as SOURCE: its folder is the root
    assert [(i.id, i.meta) for i in alone] == [(i.id, i.meta) for i in items[1:]]


def test_uint16_stretch_and_nodata(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(1000, 3001, size=(3, 64, 64), dtype=np.uint16)
    data[:, 32:, 32:] = 65535  # one tile all nodata
    data[:, :8, :8] = 65535  # part of a tile: kept
    write_scene(tmp_path / "s.tif", data, "EPSG:4326", from_origin(10.0, 50.0, 0.001, 0.001), nodata=65535)
    items = list(iter_items(tmp_path, TILES))
    assert [i.meta["window"][:2] for i in items] == [[0, 0], [32, 0], [0, 32]]
    assert items[1].meta["footprint"] == pytest.approx([10.032, 49.968, 10.064, 50.0], abs=1e-9)
    stretch = np.array(items[0].meta["stretch"])
    # percentiles of every 4th pixel: near the exact 1040 and 2960 of the uniform 1000..3000 data
    assert stretch[:, 0] == pytest.approx([1040] * 3, abs=60) and stretch[:, 1] == pytest.approx([2960] * 3, abs=60)
    pixels = np.asarray(read_tile(items[1].path, items[1].meta))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels.min() == 0 and pixels.max() == 255 and 100 < pixels.mean() < 155
    assert 0.005 < (pixels == 255).mean() < 0.06


def test_band_selection(tmp_path: Path) -> None:
    data = np.stack([np.full((32, 32), 10 * b, dtype=np.uint8) for b in range(1, 5)])
    write_scene(tmp_path / "s.tif", data, "EPSG:4326", from_origin(0.0, 1.0, 0.01, 0.01))
    (item,) = iter_items(tmp_path, TileSettings(32, 32, (3, 1, 2)))
    assert np.asarray(read_tile(item.path, item.meta))[0, 0].tolist() == [30, 10, 20]
    (grey,) = iter_items(tmp_path, TileSettings(32, 32, (4,)))
    assert np.asarray(read_tile(grey.path, grey.meta))[0, 0].tolist() == [40, 40, 40]
    with pytest.raises(MPSCLIPError, match="4 bands"):
        list(iter_items(tmp_path, TileSettings(32, 32, (5, 1, 2))))
    with pytest.raises(MPSCLIPError, match="1 band"):
        list(iter_items(tmp_path, TileSettings(32, 32, (1, 2))))


class ReadSpy:
    """A scene that records the size of each read."""

    def __init__(self, src: rasterio.DatasetReader) -> None:
        self.src, self.width, self.height, self.nodata = src, src.width, src.height, src.nodata
        self.reads: list[tuple[int, int, int]] = []

    def read(self, bands: list[int], window: rasterio.windows.Window) -> np.ndarray:
        self.reads.append((int(window.row_off), int(window.width), int(window.height)))
        return self.src.read(bands, window=window)


def test_scan_reads_each_pixel_once_in_bounded_strips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    data = np.zeros((3, 70, 90), dtype=np.uint16)
    for row, col in rng.integers(0, (70, 90), size=(6, 2)):  # a few isolated valid pixels
        data[:, row, col] = rng.integers(1, 4000, size=3)
    write_scene(tmp_path / "s.tif", data, "EPSG:32633", from_origin(500000, 5000000, 10, 10), nodata=0)
    monkeypatch.setattr(geotiff, "CHUNK_PIXELS", 200)  # strips of 2 rows
    monkeypatch.setattr(geotiff, "SAMPLE_PIXELS", 1000)  # every 3rd row and column
    with rasterio.open(tmp_path / "s.tif") as src:
        windows = scene_windows(90, 70, Cut(24, 24, 16, 16))  # overlapping windows, last ones shifted
        spy = ReadSpy(src)
        scan = scan_scene(spy, (1, 2, 3), windows, sample=True)
        brute = [bool(valid_pixels(src.read([1, 2, 3], window=w), 0).any()) for w in windows]
    assert [scan.holds_data(w) for w in windows] == brute and 0 < sum(brute) < len(windows)
    assert max(width * height for _, width, height in spy.reads) <= 200
    assert sorted(row + n for row, _, height in spy.reads for n in range(height)) == list(range(70))
    sampled = np.concatenate(scan.samples)
    expected = data[:, ::3, ::3].reshape(3, -1).T
    assert sampled.tolist() == expected[expected.any(axis=1)].tolist()


def test_resolution_resamples_tiles(tmp_path: Path) -> None:
    """10 m pixels, --resolution 20: a 16 px tile covers 32 scene pixels (320 m) and averages 2x2 blocks."""
    data = np.random.default_rng(3).integers(1, 255, size=(3, 64, 96), dtype=np.uint8)
    write_scene(tmp_path / "scene.tif", data, "EPSG:32633", from_origin(500000, 5000000, 10, 10))
    native = list(iter_items(tmp_path, TileSettings(32, 32)))
    items = list(iter_items(tmp_path, TileSettings(16, 16, None, 20.0)))
    assert [i.id for i in items] == [i.id for i in native] and len(items) == 6
    for tile, same_ground in zip(items, native, strict=True):
        assert tile.meta["window"] == same_ground.meta["window"] and tile.meta["out_size"] == [16, 16]
        assert tile.meta["footprint"] == pytest.approx(same_ground.meta["footprint"], abs=1e-12)
    tile = items[4]
    assert tile.meta["window"] == [32, 32, 32, 32]
    pixels = np.asarray(read_tile(tile.path, tile.meta)).astype(np.float64)
    blocks = data[:, 32:64, 32:64].reshape(3, 16, 2, 16, 2).mean(axis=(2, 4)).transpose(1, 2, 0)
    assert pixels.shape == (16, 16, 3) and np.abs(pixels - blocks).max() <= 0.5 + 1e-9
    # 7 m pixels: windows of round(16 * 7 / 10) = 11 scene pixels, the output pixel is 110 m / 16 = 6.875 m
    (first, *_) = iter_items(tmp_path, TileSettings(16, 16, None, 7.0))
    assert first.meta["window"] == [0, 0, 11, 11] and read_tile(first.path, first.meta).size == (16, 16)
    # a scene smaller than one tile: one tile of its own ground size
    write_scene(tmp_path / "scene.tif", data[:, :20, :30], "EPSG:32633", from_origin(500000, 5000000, 10, 10))
    (small,) = iter_items(tmp_path, TileSettings(16, 16, None, 20.0))
    assert small.meta["window"] == [0, 0, 30, 20] and small.meta["out_size"] == [15, 10]
    assert read_tile(small.path, small.meta).size == (15, 10)
    write_scene(tmp_path / "scene.tif", data, "EPSG:4326", from_origin(10.0, 50.0, 0.001, 0.001))
    with pytest.raises(MPSCLIPError, match="not projected"):
        list(iter_items(tmp_path, TileSettings(16, 16, None, 20.0)))
    with pytest.raises(MPSCLIPError, match="--resolution must be"):
        TileSettings(16, 16, None, 0.0)


def test_resolution_flag() -> None:
    parser = argparse.ArgumentParser()
    embed_cmd.configure(parser)
    args = parser.parse_args(["src", "--out", "o", "--checkpoint", "c", "--tile-size", "224", "--resolution", "10"])
    assert embed_cmd.tile_settings(args) == TileSettings(224, 224, None, 10.0)
    assert job_mod._tiles_identity(TileSettings(224, 224, None, 10.0)) == {
        "tile_size": 224,
        "stride": 224,
        "bands": None,
        "resolution": 10.0,
    }
    args = parser.parse_args(["src", "--out", "o", "--checkpoint", "c", "--resolution", "10"])
    with pytest.raises(MPSCLIPError, match="only used with --tile-size"):
        embed_cmd.tile_settings(args)


def test_truncated_scene_tiles_fail_alone(tmp_path: Path) -> None:
    data = np.random.default_rng(4).integers(1, 255, size=(3, 64, 96), dtype=np.uint8)
    path = tmp_path / "scene.tif"
    blocks = {"tiled": True, "blockxsize": 32, "blockysize": 32, "compress": "deflate"}
    write_scene(path, data, "EPSG:32633", from_origin(500000, 5000000, 10, 10), **blocks)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    items = list(iter_items(tmp_path, TILES))
    assert len(items) == 6  # the unreadable strip keeps its tiles
    read, failed = [], []
    for item in items:
        try:
            read.append(np.asarray(read_tile(item.path, item.meta)))
        except READ_ERRORS as err:
            assert isinstance(err, OSError) and "RasterioIOError" in str(err)
            failed.append(item.id)
    assert read and failed
    assert read[0].tolist() == data[:, :32, :32].transpose(1, 2, 0).tolist()


def test_embed_tiles_cli_and_broken_window(
    tiny_model: MPSCLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tiny_model.save(tmp_path / "m")
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    utm_scene(scenes / "a.tif")
    Image.new("RGB", (40, 40), (200, 0, 0)).save(scenes / "plain.png")
    base = ["embed", str(scenes), "--checkpoint", str(ckpt), "--workers", "0", "--device", "cpu", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "s"), "--tile-size", "32", "--bands", "3,2,1"]) == 0
    assert "9 of 9 items embedded" in capsys.readouterr().out  # 5 scene tiles, 4 of the 40 px plain image
    data = load_store(tmp_path / "s")
    assert data.manifest["tiles"] == {"tile_size": 32, "stride": 32, "bands": [3, 2, 1]}
    assert sum(m.get("crs") == "EPSG:32633" for m in data.metas) == 5
    plain = [(i, m) for i, m in zip(data.ids, data.metas, strict=True) if m["kind"] == "image-window"]
    assert [i for i, _ in plain] == [f"plain.png/r{r:06d}_c{c:06d}" for r in (0, 8) for c in (0, 8)]
    assert all("footprint" not in m and "crs" not in m for _, m in plain)
    assert main(["search", str(tmp_path / "s"), "a harbor", "-k", "9", "--format", "geojson"]) == 0
    assert len(json.loads(capsys.readouterr().out)["features"]) == 5

    assert main([*base, "--out", str(tmp_path / "x"), "--stride", "16"]) == 2
    assert "only used with --tile-size" in capsys.readouterr().err

    def with_broken(source: Path, tiles: TileSettings) -> Iterator[Item]:
        items = list(iter_items(source, tiles))
        yield from items
        yield Item("a.tif/broken", items[0].path, {**items[0].meta, "window": [90, 0, 32, 32]}, "geotiff-window")

    monkeypatch.setattr(job_mod, "iter_items", with_broken)
    assert main([*base, "--out", str(tmp_path / "b"), "--tile-size", "32"]) == 0
    failures = [json.loads(line) for line in (tmp_path / "b" / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == ["a.tif/broken"] and "outside" in failures[0]["error"]


@pytest.mark.slow
def test_search_html(tiny_model: MPSCLIP, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tiny_model.save(tmp_path / "m")
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    utm_scene(scenes / "a.tif")
    Image.new("RGB", (40, 40), (200, 0, 0)).save(scenes / "plain.png")
    store = tmp_path / "s"
    embed = ["embed", str(scenes), "--out", str(store), "--checkpoint", str(ckpt), "--tile-size", "32"]
    assert main([*embed, "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    out = tmp_path / "hits.html"
    assert main(["search", str(store), "ships <b>", "-k", "6", "--format", "html", "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "ships &lt;b&gt;" in page and "plain.png" in page
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 6 and "#6 &middot;" in page
    assert Image.open(io.BytesIO(base64.b64decode(uris[0]))).size in ((32, 32), (40, 40))
    assert main(["search", str(store), "ships", "-k", "2", "--format", "html"]) == 0
    assert capsys.readouterr().out.count("data:image/png") == 2


@pytest.mark.slow
def test_demo_archive_step(tiny_model: MPSCLIP, tmp_path: Path) -> None:
    from mpsclip.data.synth import generate
    from mpsclip.demo import archive_step

    generate(tmp_path / "data", n_train=0, n_test=8, seed=0, image_size=64, workers=1)
    precision = archive_step(tmp_path, tiny_model.save(tmp_path / "m"), tmp_path / "data")
    assert precision is not None and 0.0 <= precision <= 1.0
    features = json.loads((tmp_path / "archive" / "hits.geojson").read_text())["features"]
    assert len(features) == 8 * 5 and 14.9 < features[0]["geometry"]["coordinates"][0][0][0] < 15.5
    assert (tmp_path / "archive" / "hits.html").read_text().count("data:image/png") == 40
    zero_shot = json.loads((tmp_path / "archive" / "store-zero-shot" / "manifest.json").read_text())
    assert zero_shot["perspectives"] == "zero-shot" and zero_shot["counts"]["embedded"] == 64

    geopandas, duckdb = require("geopandas"), require("duckdb")  # the README's example on the demo's store
    store = tmp_path / "archive" / "store"
    tiles = geopandas.read_parquet(store / "shard-00000.parquet", bbox=(15.1, 45.0, 15.2, 45.2))
    data = load_store(store)
    inside = [i for i, m in zip(data.ids, data.metas, strict=True)
              if m["footprint"][0] <= 15.2 and m["footprint"][2] >= 15.1 and m["footprint"][1] <= 45.2]
    assert tiles.crs.equals("OGC:CRS84") and sorted(tiles["id"]) == sorted(inside) and 0 < len(inside) < 64
    rows = duckdb.sql(f"""SELECT id, scene, "window" FROM '{store}/shard-*.parquet'
        WHERE bbox.xmin <= 15.2 AND bbox.xmax >= 15.1 AND bbox.ymin <= 45.2 AND bbox.ymax >= 45.0""").fetchall()
    assert sorted(r[0] for r in rows) == sorted(tiles["id"]) and all(r[2][2:] == [224, 224] for r in rows)
