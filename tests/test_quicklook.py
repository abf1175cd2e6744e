"""Scene quicklooks of georeferenced stores: listing, rendering from the GeoTIFF, caching, the two HTTP routes."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
from extras import require

rasterio = require("rasterio")
require("fastapi")

import georef  # noqa: E402
from affine import Affine  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from mpsclip.serve import quicklook  # noqa: E402
from mpsclip.serve.app import create_app  # noqa: E402
from mpsclip.serve.catalog import Catalog  # noqa: E402
from mpsclip.serve.quicklook import SceneCatalog, list_scenes, quicklook_size, render_quicklook  # noqa: E402
from PIL import Image  # noqa: E402
from rasterio.warp import transform_bounds  # noqa: E402

from mpsclip.archive.items import TileSettings  # noqa: E402
from mpsclip.archive.job import EmbedSettings, embed_archive  # noqa: E402
from mpsclip.archive.sources import iter_items  # noqa: E402
from mpsclip.errors import MPSCLIPError  # noqa: E402

TILES = TileSettings(tile_size=32, stride=32)


def metas(root: Path) -> list[dict]:
    return [item.meta for item in iter_items(root, TILES)]


def halves(path: Path) -> Path:
    """80 x 40 px of 0.001 degree from 10 E, 50 N: red left half, blue right half, the top 8 rows nodata (0)."""
    data = np.full((3, 40, 80), 30, dtype=np.uint8)
    data[0, :, :40] = 200
    data[2, :, 40:] = 200
    data[:, :8] = 0
    return georef.write_scene(path, data, "EPSG:4326", Affine(1e-3, 0.0, 10.0, 0.0, -1e-3, 50.0), nodata=0)


def png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGBA"
    return np.asarray(image)


def test_geographic_scene_bounds_pixels_and_nodata(tmp_path: Path) -> None:
    halves(tmp_path / "h.tif")
    (scene,) = list_scenes(metas(tmp_path), {"source_root": str(tmp_path)})
    assert scene.name == "h.tif" and scene.index == 0 and scene.tiles == 6 and scene.error is None
    assert scene.bounds == pytest.approx((10.0, 49.96, 10.08, 50.0))
    # square ground pixels: 0.08 degree of longitude at 49.98 N is cos(49.98) x 0.08 degree of latitude wide
    assert scene.size == (80, round(80 * 0.04 / (0.08 * math.cos(math.radians(49.98)))))
    pixels = png(render_quicklook(scene))
    assert pixels.shape == (scene.size[1], scene.size[0], 4)
    h = scene.size[1]
    assert pixels[h // 2, 10].tolist() == [200, 30, 30, 255] and pixels[h // 2, 70].tolist() == [30, 30, 200, 255]
    assert (pixels[: int(h * 8 / 40) - 1, :, 3] == 0).all()  # nodata rows are transparent
    assert (pixels[int(h * 8 / 40) + 1 :, :, 3] == 255).all()


def test_projected_uint16_scene_is_bounded_warped_and_stretched(tmp_path: Path) -> None:
    """600 x 300 px of 10 m in UTM 33N: the quicklook is 512 px wide, spans the scene's lon/lat bounds, and its
    grey ramp is stretched with the tiles' percentiles (dark on the west edge, bright on the east)."""
    ramp = np.tile(np.linspace(1000, 5000, 600, dtype=np.uint16), (300, 1))[None]
    transform = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
    georef.write_scene(tmp_path / "u.tif", ramp, "EPSG:32633", transform)
    (scene,) = list_scenes(metas(tmp_path), {"source_root": str(tmp_path)})
    want = transform_bounds("EPSG:32633", "EPSG:4326", 500000, 4997000, 506000, 5000000, densify_pts=21)
    assert scene.bounds == pytest.approx(want) and scene.stretch is not None and scene.bands == (1,)
    assert scene.size[0] == quicklook.MAX_SIDE and scene.size == quicklook_size(scene.bounds, 600, 300)
    assert scene.size[1] == pytest.approx(256, abs=3)  # 6 km x 3 km on the ground
    pixels = png(render_quicklook(scene))
    row = pixels[scene.size[1] // 2]
    assert row[5, 0] < 20 and row[-6, 0] > 235 and (np.diff(row[20:-20, 0].astype(int)) >= 0).all()
    assert (row[:, 0] == row[:, 1]).all() and (row[:, 1] == row[:, 2]).all()  # one band shown as grey


def test_quicklook_reads_the_overviews(tmp_path: Path) -> None:
    """The base pixels are changed after the overviews were built: the quicklook shows the overview's."""
    path = georef.write_scene(tmp_path / "o.tif", np.full((3, 1024, 1024), 100, dtype=np.uint8), "EPSG:4326",
                              Affine(1e-5, 0.0, 10.0, 0.0, -1e-5, 0.01))
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2, 4], rasterio.enums.Resampling.average)
        dst.write(np.full((3, 1024, 1024), 200, dtype=np.uint8))
    tiles = [item.meta for item in iter_items(tmp_path, TileSettings(512, 512))]
    (scene,) = list_scenes(tiles, {"source_root": str(tmp_path)})
    assert max(scene.size) == quicklook.MAX_SIDE
    pixels = png(render_quicklook(scene))
    assert (pixels[8:-8, 8:-8, :3] == 100).all()


def test_cache_follows_the_file_and_errors_name_the_scene(tmp_path: Path) -> None:
    path = halves(tmp_path / "h.tif")
    tiles = metas(tmp_path)
    (scene,) = list_scenes(tiles, {"source_root": str(tmp_path)})
    first = render_quicklook(scene)
    assert render_quicklook(scene) is first  # served from memory
    halves(path)
    os.utime(path, ns=(1, 1))  # the same file, rewritten: rendered again
    assert render_quicklook(scene) is not first and render_quicklook(scene) == first
    path.unlink()
    with pytest.raises(MPSCLIPError, match="scene 'h.tif'.*cannot be read"):
        render_quicklook(scene)
    (gone,) = list_scenes(tiles, {"source_root": str(tmp_path)})
    assert gone.error is not None and "h.tif" in gone.error and gone.tiles == len(tiles) == 6
    assert gone.bounds == pytest.approx(scene.bounds)  # the union of the tiles' footprints
    with pytest.raises(MPSCLIPError, match="cannot be opened"):
        render_quicklook(gone)


@pytest.fixture(scope="module")
def geo_client(ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    root = georef.two_scenes(tmp_path_factory.mktemp("geo") / "scenes")
    store = tmp_path_factory.mktemp("stores") / "geo"
    embed_archive(root, store, ckpt, settings=EmbedSettings(tiles=TILES, batch_size=8, device="cpu"), progress=False)
    with TestClient(create_app(Catalog([store]))) as client:
        yield client


def test_stores_list_scenes_and_quicklooks_are_served(geo_client: TestClient) -> None:
    (store,) = geo_client.get("/stores").json()["stores"]
    assert store["georeferenced"] and [s["name"] for s in store["scenes"]] == [f"{georef.HOSTILE}.tif", "harbour.tif"]
    harbour = store["scenes"][1]
    assert harbour["index"] == 1 and harbour["tiles"] == 12 and harbour["quicklook_url"] == "/scenes/geo/1/quicklook"
    assert harbour["size"] == [128, 96] and 14.99 < harbour["bounds"][0] < harbour["bounds"][2] < 15.02
    got = geo_client.get(harbour["quicklook_url"])
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert png(got.content).shape == (96, 128, 4)
    assert geo_client.get("/scenes/geo/2/quicklook").json()["detail"] == "scene: store 'geo' has scenes 0..1, not 2"
    assert geo_client.get("/scenes/geo/-1/quicklook").status_code == 404
    assert geo_client.get("/scenes/geo/..%2Fetc/quicklook").status_code == 404  # a number, never a path
    assert geo_client.get("/scenes/geo/harbour.tif/quicklook").status_code == 422
    assert "unknown store" in geo_client.get("/scenes/nope/0/quicklook").json()["detail"]


def test_scene_catalog_lists_once_per_loaded_store(geo_client: TestClient) -> None:
    store = geo_client.app.state.catalog.get("geo")
    catalog = SceneCatalog()
    assert catalog.scenes(store) is catalog.scenes(store)
    with pytest.raises(KeyError, match="scenes 0..1, not 7"):
        catalog.scene(store, 7)


def test_served_bbox_filter_equals_search_store(geo_client: TestClient) -> None:
    from mpsclip.archive.search import encode_queries, load_search_model, search_store
    from mpsclip.archive.store_reader import open_store

    store = geo_client.app.state.catalog.get("geo")
    harbour = geo_client.get("/stores").json()["stores"][0]["scenes"][1]["bounds"]
    mid = (harbour[0] + harbour[2]) / 2
    box = [harbour[0], harbour[1], mid, harbour[3]]  # the scene's western half
    info = open_store(store.info.path)
    queries = encode_queries(load_search_model(info.manifest, None), ["a harbour"])
    want = search_store(info, queries, 50, bbox=(box[0], box[1], box[2], box[3]))
    body = {"embedding": queries[0].tolist(), "k": 50, "bbox": box}  # this client loads no model
    answer = geo_client.post("/search", json=body)
    assert answer.status_code == 200, answer.text
    got = answer.json()["hits"]
    assert 0 < len(got) < store.info.n_rows
    assert [h["id"] for h in got] == [h.id for h in want[0]]
    assert all(h["footprint"]["coordinates"][0][0][0] <= mid for h in got)
