"""Dates and cloud cover: shard columns with row-group statistics, --datetime/--max-cloud searches that skip row
groups, and POST /search with a datetime; the answers equal a brute-force filter over the items' metas."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mpsclip.archive.dates import Interval, format_datetime, parse_datetime, parse_interval
from mpsclip.archive.filters import ItemFilter, meta_arrays
from mpsclip.archive.job import model_identity
from mpsclip.archive.search import exact_topk
from mpsclip.archive.store import ShardRows, shard_path, write_manifest, write_shard
from mpsclip.archive.store_reader import StoreInfo, load_store, open_store, read_ids_metas, read_shard
from mpsclip.cli import main

UTC = timezone.utc  # noqa: UP017 - the project supports Python 3.10
DIM, VIEWS = 64, 2  # the tiny model's embedding size, so 'mpsclip search' can encode text for this store
START = datetime(2024, 1, 1, tzinfo=UTC)
SHARD_ROWS = (600, 100)  # shard 0: three row groups of 256, 256 and 88 items an hour apart; shard 1: all in 2023
BOX = (0.0, 0.0, 30.0, 10.0)


def _meta(shard: int, i: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"kind": "remote-window", "stac_item": f"S2_{shard}_{i // 10}", "collection": "s2-l2a",
                            "platform": "sentinel-2a", "hrefs": [f"https://example.test/{i}/visual.tif"],
                            "footprint": [i * 0.1, 0.0, i * 0.1 + 0.05, 0.05]}
    when = START + timedelta(hours=i) if shard == 0 else datetime(2023, 6, 1, tzinfo=UTC) + timedelta(hours=i)
    if i % 10 != 3:  # every tenth item has no date
        meta["datetime"] = format_datetime(when)
    if i % 10 == 5:  # an offset other than Z: parsed, and kept as written in meta
        meta["datetime"] = (when + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S+02:00")
    if i % 7:
        meta["eo:cloud_cover"] = (i * 13) % 101 if i % 2 else (i * 13) % 101 + 0.5
    return meta


def _metas(shard: int) -> list[dict[str, Any]]:
    return [_meta(shard, i) for i in range(SHARD_ROWS[shard])]


@pytest.fixture(scope="module")
def dated(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> Path:
    path = tmp_path_factory.mktemp("stores") / "dated"
    rng = np.random.default_rng(0)
    for shard, n in enumerate(SHARD_ROWS):
        vectors = rng.standard_normal((n, DIM))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = ShardRows([f"s{shard}/item{i:04d}" for i in range(n)], [json.dumps(m) for m in _metas(shard)],
                         vectors.astype(np.float16), vectors.astype(np.float16),
                         np.repeat(vectors[:, None], VIEWS, 1).astype(np.float16), np.ones((n, VIEWS), bool))
        write_shard(shard_path(path, shard), rows, DIM, VIEWS)
    counts = {"items": sum(SHARD_ROWS), "embedded": sum(SHARD_ROWS), "failed": 0, "shards": len(SHARD_ROWS)}
    write_manifest(path, {"complete": True, "counts": counts, "dim": DIM, "views": VIEWS, "source_root": str(path),
                          **model_identity(ckpt, None)})
    return path


def _passing(metas: list[dict[str, Any]], interval: Interval | None, max_cloud: float | None = None,
             bbox: tuple[float, float, float, float] | None = None) -> list[int]:
    """Rows passing the filters, decided from the metas alone (plain Python, no arrays)."""
    keep = []
    for row, meta in enumerate(metas):
        when = parse_datetime(meta["datetime"]) if "datetime" in meta else None
        if interval is not None and (when is None or (interval.start and when < interval.start)
                                     or (interval.stop and when >= interval.stop)):
            continue
        cloud = meta.get("eo:cloud_cover")
        if max_cloud is not None and (cloud is None or cloud > max_cloud):
            continue
        fp = meta["footprint"]
        if bbox is not None and (fp[0] > bbox[2] or fp[2] < bbox[0] or fp[1] > bbox[3] or fp[3] < bbox[1]):
            continue
        keep.append(row)
    return keep


def _all_metas() -> list[dict[str, Any]]:
    return [*_metas(0), *_metas(1)]


def test_columns_statistics_and_round_trip(dated: Path) -> None:
    table = pq.read_table(shard_path(dated, 0))
    assert table.schema.field("datetime").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("eo:cloud_cover").type == pa.float64()
    assert table.column("datetime")[1].as_py() == START + timedelta(hours=1) and table.column("datetime")[3].is_valid \
        is False
    assert table.column("datetime")[5].as_py() == START + timedelta(hours=5)  # +02:00 read as UTC
    assert table.column("stac_item")[11].as_py() == "S2_0_1" and table.column("platform")[0].as_py() == "sentinel-2a"
    assert table.column("hrefs")[2].as_py() == ["https://example.test/2/visual.tif"]
    assert table.column("eo:cloud_cover")[1].as_py() == 13.0 and table.column("eo:cloud_cover")[7].is_valid is False
    rests = [json.loads(m) for m in table.column("meta").to_pylist()]
    assert rests[1] == {} and rests[5] == {"datetime": "2024-01-01T07:00:00+02:00"}  # kept as written
    metadata = pq.read_metadata(shard_path(dated, 0))
    stats = [metadata.row_group(g).column(table.column_names.index("datetime")).statistics for g in range(3)]
    assert [(s.min, s.max) for s in stats] == [(START, START + timedelta(hours=255)),
                                             (START + timedelta(hours=256), START + timedelta(hours=511)),
                                             (START + timedelta(hours=512), START + timedelta(hours=599))]
    want = [dict(sorted((m | {"eo:cloud_cover": float(m["eo:cloud_cover"])} if "eo:cloud_cover" in m else m).items()))
            for m in _all_metas()]
    want = [m | {"footprint": [float(v) for v in m["footprint"]]} for m in want]
    assert load_store(dated).metas == want
    read = read_ids_metas(open_store(dated), [0, 5, 650])
    assert [meta for _, meta in read.values()] == [want[0], want[5], want[650]]


def _count_row_groups(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[int]]]:
    """Records ``(shard, row groups)`` of every Parquet read of row groups (shards told apart by their rows)."""
    read: list[tuple[int, list[int]]] = []
    original = pq.ParquetFile.read_row_groups

    def counted(self: pq.ParquetFile, groups: list[int], *args: Any, **kwargs: Any) -> pa.Table:
        read.append((SHARD_ROWS.index(self.metadata.num_rows), list(groups)))
        return original(self, groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counted)
    return read


@pytest.mark.parametrize(
    ("text", "max_cloud", "bbox", "groups"),
    [
        ("2024-01-12/2024-01-14", None, None, [[1], []]),  # Jan 12 00:00 .. Jan 14 23:59: rows 264..335
        ("2024-01-22T08:00:00Z/..", None, None, [[2], []]),
        ("../2023-12-31", None, None, [[], [0]]),
        ("2024-01-05T10:00:00Z", None, None, [[0], []]),  # one instant: row 106 only
        (None, 20.0, None, [[0, 1, 2], [0]]),
        ("2024-01-01/2024-01-31", 50.0, BOX, [[0, 1], []]),  # the box holds rows 0..300 of shard 0
    ],
)
def test_filters_skip_row_groups_and_keep_exactly_the_passing_items(
    dated: Path, monkeypatch: pytest.MonkeyPatch, text: str | None, max_cloud: float | None, bbox: Any,
    groups: list[list[int]],
) -> None:
    info = open_store(dated)
    interval = parse_interval(text) if text else None
    want = _passing(_all_metas(), interval, max_cloud, bbox)
    read = _count_row_groups(monkeypatch)
    query = torch.zeros(1, DIM)
    _, rows = exact_topk(info, query, 1000, "fused", bbox, False, interval, max_cloud)
    found = sorted(r for r in rows[0].tolist() if r >= 0)
    assert found == want and len(want) > 0
    assert sorted(read) == [(0, groups[0]), (1, groups[1])]


def _filter_shard(info: StoreInfo, shard: int, where: ItemFilter) -> list[int]:
    return read_shard(info, shard, ["id"], where).positions.tolist()


def test_old_shards_filter_on_their_metas(dated: Path, tmp_path: Path) -> None:
    """A shard written before GeoParquet (the whole meta as JSON) is filtered on the same lifted values; one
    written before the date columns holds no dates (a date filter keeps none of it, others read it as before)."""
    import shutil

    store = tmp_path / "old"
    shutil.copytree(dated, store)
    path = shard_path(store, 0)
    table = pq.read_table(path)
    metas = _metas(0)
    old = table.select(["id", "retrieval", "global", "perspectives", "valid"])
    old = old.add_column(1, "meta", pa.array([json.dumps(m, sort_keys=True) for m in metas]))
    pq.write_table(old.replace_schema_metadata(None), path)
    info = open_store(store)
    where = ItemFilter(BOX, parse_interval("2024-01-03/2024-01-09"), 40.0)
    assert _filter_shard(info, 0, where) == _passing(metas, where.interval, 40.0, BOX)
    assert where.rows(meta_arrays(metas)).tolist() == _passing(metas, where.interval, 40.0, BOX)

    pq.write_table(table.drop_columns(["datetime", "eo:cloud_cover"]), path, row_group_size=256)
    assert _filter_shard(info, 0, ItemFilter(interval=parse_interval("../.."))) == []
    assert _filter_shard(info, 0, ItemFilter(max_cloud=100.0)) == []
    assert _filter_shard(info, 0, ItemFilter(bbox=BOX)) == _passing(metas, None, None, BOX)


def test_cli_search_datetime_and_max_cloud(dated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    interval = parse_interval("2024-01-12/2024-01-20")
    want = _passing(_all_metas(), interval, 30.0)
    args = ["search", str(dated), "a harbor", "--datetime", "2024-01-12/2024-01-20", "--max-cloud", "30", "-k", "500",
            "--device", "cpu", "--quiet"]
    assert main([*args, "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    assert sorted(int(h["id"].split("item")[1]) for h in hits) == want  # all in shard 0
    for hit in hits:
        assert interval.start <= parse_datetime(hit["meta"]["datetime"]) < interval.stop  # type: ignore[operator]
        assert hit["meta"]["eo:cloud_cover"] <= 30
    assert main([*args, "--format", "geojson"]) == 0
    features = json.loads(capsys.readouterr().out)["features"]
    assert len(features) == len(want) and all(f["properties"]["datetime"] for f in features)

    assert main(["search", str(dated), "a harbor", "--datetime", "2024-05-01T10:00:00"]) == 2
    assert "--datetime: '2024-05-01T10:00:00': no time offset; add Z for UTC" in capsys.readouterr().err
    assert main(["search", str(dated), "a harbor", "--max-cloud", "120"]) == 2
    assert "--max-cloud: '120': expected a percentage from 0 to 100" in capsys.readouterr().err
    assert main(["search", str(dated), "a harbor", "--max-cloud", "cloudy"]) == 2
    assert "--max-cloud: 'cloudy': expected a percentage, a number from 0 to 100" in capsys.readouterr().err


def test_post_search_datetime(dated: Path) -> None:
    from fastapi.testclient import TestClient
    from mpsclip.serve.app import create_app
    from mpsclip.serve.catalog import Catalog

    info = open_store(dated)
    query = torch.from_numpy(np.random.default_rng(5).standard_normal((1, DIM)).astype(np.float32))
    query /= query.norm()
    with TestClient(create_app(Catalog([dated]), batching=False)) as client:
        for text, cloud in [("2024-01-12/2024-01-14", None), ("2024-01-01T00:00:00Z/2024-01-08", 60.0),
                            ("../2023-12-31", None)]:
            interval = parse_interval(text)
            body = {"embedding": query[0].tolist(), "k": 50, "datetime": text} | ({"max_cloud": cloud} if cloud else {})
            response = client.post("/search", json=body)
            assert response.status_code == 200, response.text
            hits = response.json()["hits"]
            _, rows = exact_topk(info, query, 50, "fused", None, False, interval, cloud)  # 'mpsclip search' answers
            want = [f"s{0 if r < 600 else 1}/item{r if r < 600 else r - 600:04d}" for r in rows[0].tolist() if r >= 0]
            assert [h["id"] for h in hits] == want and hits
            for hit in hits:
                assert interval.start is None or parse_datetime(hit["datetime"]) >= interval.start
                assert interval.stop is None or parse_datetime(hit["datetime"]) < interval.stop
        unfiltered = client.post("/search", json={"embedding": query[0].tolist(), "k": 700}).json()["hits"]
        assert len(unfiltered) == 700 and sum(h["datetime"] is None for h in unfiltered) == 70
        bad = client.post("/search", json={"embedding": query[0].tolist(), "datetime": "2024-13-01"})
        assert bad.status_code == 422 and "datetime: '2024-13-01': month must be in 1..12" in bad.text
        too_cloudy = client.post("/search", json={"embedding": query[0].tolist(), "max_cloud": 101})
        assert too_cloudy.status_code == 422 and "max_cloud" in too_cloudy.text
        page = client.get("/").text
        assert 'id="date-from"' in page and 'id="date-to"' in page and 'id="max-cloud"' in page
