"""Store shards as GeoParquet 1.1: GeoPandas and DuckDB read them, bbox filters skip row groups, GeoJSON is RFC 7946."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from extras import require

geopandas = require("geopandas")
duckdb = require("duckdb")
shapely = require("shapely")
rasterio = require("rasterio")

from affine import Affine  # noqa: E402
from rasterio.warp import transform as warp_points  # noqa: E402
from shapely.geometry import MultiPolygon, box, shape  # noqa: E402

from mpsclip.archive import geoparquet  # noqa: E402
from mpsclip.archive.filters import ItemFilter, meta_arrays  # noqa: E402
from mpsclip.archive.geoparquet import (  # noqa: E402
    ROW_GROUP_ROWS,
    BBox,
    footprint_array,
    footprint_from_wkb,
    footprint_parts,
    footprint_wkb,
    footprints_meeting,
    row_groups_in_bbox,
)
from mpsclip.archive.items import TileSettings  # noqa: E402
from mpsclip.archive.render import to_geojson  # noqa: E402
from mpsclip.archive.search import Hit, exact_topk  # noqa: E402
from mpsclip.archive.sources import iter_items  # noqa: E402
from mpsclip.archive.store import ShardRows, shard_path, write_manifest, write_shard  # noqa: E402
from mpsclip.archive.store_reader import StoreInfo, load_store, open_store, read_ids_metas, read_shard, stream  # noqa: E402

DIM, VIEWS = 8, 2
CROSSING = [179.5, 10.0, -179.5, 11.0]  # west > east: across the antimeridian
METAS: list[dict[str, Any]] = [
    {"kind": "geotiff-window", "scene": "s/a.tif", "crs": "EPSG:32633", "window": [0, 0, 32, 32], "bands": [1, 2, 3],
     "stretch": None, "footprint": [15.0, 45.0, 15.5, 45.25], "keywords": ["harbor", "ship"]},
    {"kind": "file", "path": "img/b.png"},
    {"kind": "tar-member", "tar": "shards/0.tar", "member": "x.jpg", "offset": 512, "size": 99},
    {"kind": "geotiff-window", "scene": "s/c.tif", "crs": "EPSG:32660", "window": [32, 0, 32, 32], "bands": [1],
     "stretch": [[1.0, 9.0]], "footprint": CROSSING},
    {"footprint": [1, 2, 3], "window": "not four ints", "crs": None, "keywords": [1, 2]},  # all stay in meta
]


def _rows(metas: list[dict[str, Any]], seed: int = 0) -> ShardRows:
    rng = np.random.default_rng(seed)
    n = len(metas)
    vectors = rng.standard_normal((n, DIM)).astype(np.float16)
    return ShardRows([f"item{i:04d}" for i in range(n)], [json.dumps(m) for m in metas], vectors, vectors,
                     rng.standard_normal((n, VIEWS, DIM)).astype(np.float16), rng.random((n, VIEWS)) < 0.5)


def _store(path: Path, shards: list[list[dict[str, Any]]]) -> Path:
    for index, metas in enumerate(shards):
        write_shard(shard_path(path, index), _rows(metas, seed=index), DIM, VIEWS)
    n = sum(map(len, shards))
    counts = {"items": n, "embedded": n, "failed": 0, "shards": len(shards)}
    write_manifest(path, {"complete": True, "counts": counts, "dim": DIM, "views": VIEWS, "source_root": str(path)})
    return path


def _rows_in_bbox(info: StoreInfo, box: BBox) -> np.ndarray:
    """Store rows of the items whose footprint meets ``box``, as a search streams them."""
    return np.concatenate([part.rows() for part in stream(info, ["id"], ItemFilter(bbox=box))])


def _meets(fp: BBox, query: BBox) -> bool:
    """The per-item reference: some part of ``fp`` overlaps some side of ``query`` (closed intervals)."""
    pairs = [(a, b) for a in footprint_parts(fp) for b in footprint_parts(query)]
    return any(a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3] for a, b in pairs)


def _as_read(meta: dict[str, Any]) -> dict[str, Any]:
    """A meta as readers give it back: keys sorted, a lifted footprint's numbers as floats."""
    out = dict(sorted(meta.items()))
    if geoparquet.valid_footprint(meta.get("footprint")) is not None:
        out["footprint"] = [float(v) for v in meta["footprint"]]
    return out


def test_meta_columns_round_trip(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", [METAS])
    table = pq.read_table(shard_path(store, 0))
    assert table.column("kind").to_pylist() == ["geotiff-window", "file", "tar-member", "geotiff-window", None]
    assert table.column("source_path").to_pylist() == ["s/a.tif", "img/b.png", "shards/0.tar", "s/c.tif", None]
    assert table.column("scene").to_pylist() == ["s/a.tif", None, None, "s/c.tif", None]
    assert table.column("window").to_pylist()[0] == [0, 0, 32, 32] and table.column("crs")[3].as_py() == "EPSG:32660"
    assert table.column("keywords").to_pylist()[:2] == [["harbor", "ship"], None]
    rests = [json.loads(m) for m in table.column("meta").to_pylist()]
    assert rests[0] == {"bands": [1, 2, 3], "stretch": None} and rests[1] == {} and rests[4] == METAS[4]
    info = open_store(store)
    assert [meta for _, meta in read_ids_metas(info, [0, 1, 2, 3, 4]).values()] == [_as_read(m) for m in METAS]
    assert load_store(store).metas == [_as_read(m) for m in METAS]
    assert list(read_shard(info, 0, ["meta"]).columns["meta"]) == [_as_read(m) for m in METAS]


def test_geo_metadata(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", [METAS])
    geo = json.loads(pq.read_metadata(shard_path(store, 0)).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["MultiPolygon", "Polygon"]
    assert "crs" not in column  # OGC:CRS84 by the specification's default
    assert column["bbox"] == [-180.0, 10.0, 180.0, 45.25] and column["orientation"] == "counterclockwise"
    assert column["covering"] == {"bbox": {name: ["bbox", name] for name in ("xmin", "ymin", "xmax", "ymax")}}


def test_geopandas_reads_a_shard(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", [METAS])
    frame = geopandas.read_parquet(shard_path(store, 0))
    assert frame.crs.equals("OGC:CRS84") and frame.crs.equals("EPSG:4326", ignore_axis_order=True)
    assert frame.geometry[0].equals(box(15.0, 45.0, 15.5, 45.25))
    crossing = frame.geometry[3]
    assert isinstance(crossing, MultiPolygon)
    assert crossing.equals(box(179.5, 10, 180, 11).union(box(-180, 10, -179.5, 11)))
    assert frame.geometry[[1, 2, 4]].isna().all()
    for polygon in [frame.geometry[0], *crossing.geoms]:
        assert polygon.is_valid and polygon.exterior.is_ccw
    assert list(frame["scene"][[0, 3]]) == ["s/a.tif", "s/c.tif"]
    near_a = geopandas.read_parquet(shard_path(store, 0), bbox=(15.1, 45.1, 15.2, 45.2))  # through the covering
    assert list(near_a["id"]) == ["item0000"]


def test_duckdb_selects_the_tiles_of_a_box(tmp_path: Path) -> None:
    tiles = [{"kind": "file", "path": f"t{i}.png", "footprint": [i * 1.0, 0.0, i + 0.5, 0.5]} for i in range(20)]
    store = _store(tmp_path / "s", [tiles[:12], [*tiles[12:], METAS[1]]])
    sql = (
        "SELECT id, source_path FROM read_parquet(?) WHERE bbox.xmin <= ? AND bbox.xmax >= ? "
        "AND bbox.ymin <= ? AND bbox.ymax >= ? ORDER BY filename, id"
    )
    west, south, east, north = 3.7, 0.2, 13.1, 1.0
    files = [str(shard_path(store, i)) for i in (0, 1)]
    got = duckdb.connect().execute(sql.replace("?", "[?, ?]", 1), [*files, east, west, north, south]).fetchall()
    assert [path for _, path in got] == [f"t{i}.png" for i in range(4, 14)]
    info = open_store(store)
    assert _rows_in_bbox(info, (west, south, east, north)).tolist() == list(range(4, 14))


def test_bbox_reads_only_row_groups_that_meet_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four row groups, each of tiles around its own longitude: a box over the third decodes the third only."""
    n = 4 * ROW_GROUP_ROWS
    tiles = [{"footprint": [30.0 * (i // ROW_GROUP_ROWS) + 0.01 * (i % ROW_GROUP_ROWS), 5.0,
                            30.0 * (i // ROW_GROUP_ROWS) + 0.01 * (i % ROW_GROUP_ROWS) + 0.005, 5.1]} for i in range(n)]
    store = _store(tmp_path / "s", [tiles])
    metadata = pq.read_metadata(shard_path(store, 0))
    assert metadata.num_row_groups == 4
    inside = (60.5, 5.0, 61.0, 6.0)
    assert row_groups_in_bbox(metadata, inside) == [2]
    assert row_groups_in_bbox(metadata, (100.0, 5.0, 110.0, 6.0)) == []
    assert row_groups_in_bbox(metadata, (90.5, 5.0, 0.5, 6.0)) == [0, 3]  # across the antimeridian: both sides
    read: list[list[int]] = []
    original = pq.ParquetFile.read_row_groups

    def spy(self: pq.ParquetFile, groups: list[int], *args: Any, **kwargs: Any) -> pa.Table:
        read.append(list(groups))
        return original(self, groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    info = open_store(store)
    part = read_shard(info, 0, ["retrieval", "id"], ItemFilter(bbox=inside))
    positions, cols = part.positions, part.columns
    want = [i for i, t in enumerate(tiles) if t["footprint"][0] <= inside[2] and t["footprint"][2] >= inside[0]]
    assert positions.tolist() == want and len(want) == 51 and read == [[2]]
    assert cols["id"].tolist() == [f"item{i:04d}" for i in want]
    np.testing.assert_array_equal(cols["retrieval"], read_shard(info, 0, ["retrieval"]).columns["retrieval"][want])
    read.clear()
    queries = torch.from_numpy(read_shard(info, 0, ["retrieval"]).columns["retrieval"][want[:3]].astype(np.float32))
    _, rows = exact_topk(info, queries, 5, "fused", inside)
    assert set(rows.flatten().tolist()) <= set(want) and read == [[2]]
    assert _rows_in_bbox(info, (100.0, 5.0, 110.0, 6.0)).tolist() == []


def _write_old_shard(path: Path, metas: list[dict[str, Any]], seed: int) -> None:
    """A shard as stores wrote them before GeoParquet: the whole meta as JSON, no geometry, one row group."""
    rows = _rows(metas, seed)
    write_shard(path, rows, DIM, VIEWS)
    table = pq.read_table(path).select(["id", "retrieval", "global", "perspectives", "valid"])
    table = table.add_column(1, "meta", pa.array([json.dumps(m, sort_keys=True) for m in metas]))
    pq.write_table(table.replace_schema_metadata(None), path)


def test_old_shards_still_read(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", [METAS, METAS[:2]])
    _write_old_shard(shard_path(store, 0), METAS, seed=0)
    assert "geo" not in (pq.read_metadata(shard_path(store, 0)).metadata or {}) and "geometry" not in pq.read_schema(
        shard_path(store, 0)).names
    info = open_store(store)
    expected = [_as_read(m) for m in [*METAS, *METAS[:2]]]
    in_memory = load_store(store)
    assert in_memory.metas == expected
    assert [m for _, m in read_ids_metas(info, list(range(7))).values()] == expected
    near_a = (15.1, 45.1, 15.2, 45.2)
    assert _rows_in_bbox(info, near_a).tolist() == [0, 5]  # old and new shard alike
    assert ItemFilter(bbox=near_a).rows(meta_arrays(in_memory.metas)).tolist() == [0, 5]  # in memory, as served
    assert _rows_in_bbox(info, (179.6, 10.5, 179.7, 10.6)).tolist() == [3]
    part = read_shard(info, 0, ["global"], ItemFilter(bbox=(-179.9, 10.5, -179.6, 10.6)))
    assert part.positions.tolist() == [3] and part.columns["global"].shape == (1, DIM)


def test_antimeridian_footprints(tmp_path: Path) -> None:
    fp = (179.5, 10.0, -179.5, 11.0)
    assert footprint_from_wkb(footprint_wkb(fp)) == fp
    assert footprint_from_wkb(footprint_wkb((1.0, 2.0, 3.0, 4.0))) == (1.0, 2.0, 3.0, 4.0)
    store = _store(tmp_path / "s", [METAS])
    info = open_store(store)
    assert _rows_in_bbox(info, (-179.8, 10.5, -179.7, 10.6)).tolist() == [3]  # east of the line
    assert _rows_in_bbox(info, (179.6, 10.5, 179.7, 10.6)).tolist() == [3]  # west of it
    assert _rows_in_bbox(info, (0.0, 10.0, 1.0, 11.0)).tolist() == []  # inside the covering, not the tile


def test_geojson_is_rfc7946(tmp_path: Path) -> None:
    hits = [Hit(rank=i + 1, score=1.0 - i / 10, id=f"item{i}", meta=m) for i, m in enumerate(METAS)]
    collection, skipped = to_geojson(["q"], [hits])
    text = json.dumps(collection)
    assert skipped == 3 and "crs" not in json.loads(text)
    geometries = [shape(f["geometry"]) for f in json.loads(text)["features"]]
    assert [g.geom_type for g in geometries] == ["Polygon", "MultiPolygon"]
    polygons = [geometries[0], *geometries[1].geoms]
    for polygon in polygons:
        assert polygon.is_valid and polygon.exterior.is_ccw
        xs, ys = polygon.exterior.xy
        assert all(-180 <= x <= 180 for x in xs) and all(-90 <= y <= 90 for y in ys)
    assert collection["features"][0]["geometry"]["coordinates"][0][0] == [15.0, 45.0]  # lon, lat
    assert geometries[1].equals(box(179.5, 10, 180, 11).union(box(-180, 10, -179.5, 11)))


def _write_scene(path: Path, crs: str, west: float, north: float, size: int = 64, pixel: float = 10.0) -> Path:
    data = np.random.default_rng(0).integers(1, 255, size=(3, size, size), dtype=np.uint8)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": crs,
               "transform": Affine(pixel, 0.0, west, 0.0, -pixel, north)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def test_geotiff_tiles_open_in_geopandas(tmp_path: Path) -> None:
    """Tiles of a UTM 33N scene and of a UTM 60N scene over the antimeridian, as a shard GeoPandas reads."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    _write_scene(scenes / "a.tif", "EPSG:32633", 500000, 5000000)
    (x180,), _ = warp_points("EPSG:4326", "EPSG:32660", [180.0], [59.99])  # 180° in UTM zone 60
    _write_scene(scenes / "b.tif", "EPSG:32660", x180 - 100, 6654000)  # its left tiles cross the antimeridian
    items = list(iter_items(scenes, TileSettings(tile_size=32, stride=32)))
    assert len(items) == 8
    store = tmp_path / "store"
    write_shard(shard_path(store, 0), _rows([it.meta for it in items]), DIM, VIEWS)
    frame = geopandas.read_parquet(shard_path(store, 0))
    assert frame.crs.equals("OGC:CRS84")
    for item, geometry in zip(items, frame.geometry, strict=True):
        west, south, east, north = item.meta["footprint"]
        if west <= east:
            assert geometry.geom_type == "Polygon" and geometry.bounds == pytest.approx((west, south, east, north))
        else:
            assert geometry.geom_type == "MultiPolygon" and geometry.bounds == pytest.approx((-180, south, 180, north))
        assert geometry.is_valid
    crossing = [it.meta["footprint"][0] > it.meta["footprint"][2] for it in items]
    assert crossing == [False] * 4 + [True, False, True, False]
    assert list(frame["crs"]) == ["EPSG:32633"] * 4 + ["EPSG:32660"] * 4
    assert list(frame["window"][:2].map(list)) == [[0, 0, 32, 32], [32, 0, 32, 32]]


def test_footprints_meeting_equals_the_per_item_test() -> None:
    rng = np.random.default_rng(0)
    footprints: list[BBox | None] = [None, (170.0, -1.0, -170.0, 1.0), (180.0, 0.0, -179.0, 1.0), (179.0, 0, -180.0, 1)]
    for _ in range(400):
        west, east = rng.uniform(-180, 180, 2).round(0)
        south, north = np.sort(rng.uniform(-90, 90, 2).round(0))
        footprints.append((float(west), float(south), float(east), float(north)))
    array = footprint_array(footprints)
    for _ in range(50):
        west, east = np.sort(rng.uniform(-180, 180, 2).round(0))
        south, north = np.sort(rng.uniform(-90, 90, 2).round(0))
        box = (float(west), float(south), float(east), float(north))
        want = [row for row, fp in enumerate(footprints) if fp is not None and _meets(fp, box)]
        assert footprints_meeting(array, box).tolist() == want


def test_query_boxes_across_the_antimeridian_meet_what_shapely_says() -> None:
    """A box with west > east is its two sides of 180°: rows meeting it are those whose footprint (split too)
    intersects the union of both, as shapely computes it."""
    def geometry(b: BBox) -> MultiPolygon:
        return MultiPolygon([box(*side) for side in footprint_parts(b)])

    rng = np.random.default_rng(1)
    footprints: list[BBox | None] = [None]
    for _ in range(300):
        west, east = rng.uniform(-180, 180, 2)
        south, north = np.sort(rng.uniform(-90, 90, 2))
        footprints.append((float(west), float(south), float(east), float(north)))
    array = footprint_array(footprints)
    for _ in range(30):
        east, west = np.sort(rng.uniform(-180, 180, 2))  # west > east: across the antimeridian
        south, north = np.sort(rng.uniform(-90, 90, 2))
        query = (float(west), float(south), float(east), float(north))
        want = [row for row, fp in enumerate(footprints) if fp is not None and geometry(fp).intersects(geometry(query))]
        assert footprints_meeting(array, query).tolist() == want
        assert [row for row, fp in enumerate(footprints) if fp is not None and _meets(fp, query)] == want
