"""The store reader's two access patterns agree: streamed shard by shard (with or without a pushed-down filter)
and loaded into memory; a load taken again reuses the shards that did not change and reads the others."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mpsclip.archive import store_reader
from mpsclip.archive.filters import ItemFilter, meta_arrays
from mpsclip.archive.store import ShardRows, shard_path, shard_record, write_manifest, write_shard
from mpsclip.archive.store_reader import VECTOR_COLUMNS, load_store, open_store, stream
from mpsclip.errors import MPSCLIPError

DIM, VIEWS, ROWS = 8, 2, 5


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    values = rng.standard_normal((*shape, DIM))
    return (values / np.linalg.norm(values, axis=-1, keepdims=True)).astype(np.float16)


def _write(store: Path, shard: int, seed: int) -> None:
    """Shard ``shard`` of ``ROWS`` items with unit vectors and footprints one degree apart, recorded in the
    manifest as 'mpsclip embed' records it."""
    rng = np.random.default_rng(seed)
    ids = [f"s{shard}/item{i}.png" for i in range(ROWS)]
    west = [float(shard * ROWS + n) for n in range(ROWS)]  # one footprint a degree, store row n at n..n+0.5
    metas = [json.dumps({"kind": "file", "path": i, "footprint": [w, 0.0, w + 0.5, 0.5]})
             for i, w in zip(ids, west, strict=True)]
    rows = ShardRows(ids, metas, _unit(rng, ROWS), _unit(rng, ROWS), _unit(rng, ROWS, VIEWS),
                     rng.random((ROWS, VIEWS)) < 0.5)
    store.mkdir(exist_ok=True)
    write_shard(shard_path(store, shard), rows, DIM, VIEWS)
    manifest = json.loads((store / "manifest.json").read_text()) if (store / "manifest.json").exists() else {}
    records = [r for r in manifest.get("shards", []) if r["file"] != shard_path(store, shard).name]
    records = sorted([*records, shard_record(shard_path(store, shard))], key=lambda r: r["file"])
    n = ROWS * len(records)
    counts = {"items": n, "embedded": n, "failed": 0, "shards": len(records)}
    write_manifest(store, {"complete": True, "counts": counts, "dim": DIM, "views": VIEWS, "unit_norm": True,
                           "source_root": str(store), "shards": records})


def test_stream_and_load_give_the_same_rows(tmp_path: Path) -> None:
    store = tmp_path / "s"
    for shard in range(3):
        _write(store, shard, seed=shard)
    info = open_store(store)
    data = load_store(store)
    parts = list(stream(info, ["id", "meta", *VECTOR_COLUMNS]))
    assert [p.offset for p in parts] == [0, 5, 10]
    assert np.concatenate([p.rows() for p in parts]).tolist() == list(range(15))
    assert [i for p in parts for i in p.columns["id"]] == data.ids
    assert [m for p in parts for m in p.columns["meta"]] == data.metas
    for column in VECTOR_COLUMNS:
        np.testing.assert_array_equal(np.concatenate([p.columns[column] for p in parts]), data.columns[column])
    box = (3.2, 0.0, 7.1, 1.0)  # the footprints of rows 3..7, across shards 0 and 1
    where = ItemFilter(bbox=box)
    streamed = list(stream(info, ["id", "global"], where))
    rows = np.concatenate([p.rows() for p in streamed])
    assert rows.tolist() == where.rows(meta_arrays(data.metas)).tolist() == [3, 4, 5, 6, 7]  # as served in memory
    np.testing.assert_array_equal(np.concatenate([p.columns["global"] for p in streamed]), data.columns["global"][rows])


def test_a_load_again_reads_only_the_shards_that_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s"
    for shard in range(2):
        _write(store, shard, seed=shard)
    first = load_store(store)
    reads: list[int] = []
    read_shard = store_reader.read_shard
    counted = lambda info, s, *rest: reads.append(s) or read_shard(info, s, *rest)  # noqa: E731
    monkeypatch.setattr(store_reader, "read_shard", counted)
    assert load_store(store, previous=first).ids == first.ids and reads == []
    _write(store, 2, seed=2)  # the store grew by a shard
    grown = load_store(store, previous=first)
    assert reads == [2] and grown.ids[:10] == first.ids and len(grown.ids) == 15
    _write(store, 0, seed=7)  # shard 0 rewritten: other vectors, same ids
    reads.clear()
    changed = load_store(store, previous=grown)
    assert reads == [0]
    fresh = load_store(store)
    for column in VECTOR_COLUMNS:
        np.testing.assert_array_equal(changed.columns[column], fresh.columns[column])
    assert not np.array_equal(changed.columns["retrieval"][:ROWS], grown.columns["retrieval"][:ROWS])


def test_a_store_changing_during_every_read_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s"
    _write(store, 0, seed=0)
    parts = store_reader._shard_parts

    def touched(*args: object) -> list:
        out = parts(*args)
        stat = (store / "manifest.json").stat()
        os.utime(store / "manifest.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        return out

    monkeypatch.setattr(store_reader, "_shard_parts", touched)
    with pytest.raises(MPSCLIPError, match=r"its files changed every time it was read \(3 tries\)"):
        load_store(store)
