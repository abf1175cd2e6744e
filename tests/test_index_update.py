"""'mpsclip index' on a store that grew: the new shards' items are added to the index without training it again
(same IVF centroids), recall is measured again and recorded, and searches and the server use the updated index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from extras import require
from mpsclip.bench.search import synthetic_queries, synthetic_store

from mpsclip.archive.index import (
    INDEX_JSON,
    IndexSettings,
    import_faiss,
    load_index,
    store_identity,
    update_index,
    vector_path,
)
from mpsclip.archive.search import exact_topk
from mpsclip.archive.store import read_manifest, shard_path, write_manifest
from mpsclip.archive.store_reader import open_store, read_shard
from mpsclip.choices import MODES
from mpsclip.cli import main
from mpsclip.errors import MPSCLIPError

require("faiss")
DIM, CLUSTERS, SHARD = 32, 20, 128
ROWS, GROWN = 640, 728  # five full shards, then a sixth of 88 items appended


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "full"
    synthetic_store(path, GROWN, dim=DIM, views=2, shard_size=SHARD, clusters=CLUSTERS)
    return path


def _before_growth(full: Path, path: Path) -> Path:
    """``full`` as it was before its last shard was appended."""
    shutil.copytree(full, path)
    shard_path(path, 5).unlink()
    manifest = read_manifest(path)
    counts = {**manifest["counts"], "items": ROWS, "embedded": ROWS, "shards": 5}
    write_manifest(path, {**manifest, "counts": counts})
    return path


def _grow(full: Path, path: Path) -> None:
    """Append the last shard of ``full`` to ``path`` as 'mpsclip embed' appends one: a new file, a new manifest."""
    shutil.copy(shard_path(full, 5), shard_path(path, 5))
    write_manifest(path, read_manifest(full) | {"note": "grown"})


def _centroids(index: object) -> np.ndarray:
    ivf = import_faiss().extract_index_ivf(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def test_grown_store_gets_its_new_items_without_retraining(full: Path, tmp_path: Path) -> None:
    store = _before_growth(full, tmp_path / "store")
    settings = IndexSettings("IVF8,PQ8x4fs", nprobe=2, recall_queries=40)
    built = update_index(open_store(store), settings, progress=False)
    assert built.action == "built" and built.reason == "the store has no index yet"
    centroids = _centroids(load_index(open_store(store)).index)
    assert built.record["rows_at_training"] == ROWS and len(built.record["shard_sha256"]) == 5

    _grow(full, store)
    info = open_store(store)
    with pytest.raises(MPSCLIPError, match=r"covers the first 5 of the store's 6 shards \(640 of 728 items\).*"
                                           r"'mpsclip index .*store'"):
        load_index(info)

    assert main(["index", str(store), "--recall-queries", "40", "--quiet"]) == 0  # the factory and nprobe are kept
    record = json.loads((store / INDEX_JSON).read_text())
    assert record["store"] == store_identity(info) and record["factory"] == "IVF8,PQ8x4fs" and record["nprobe"] == 2
    assert record["rows_at_training"] == ROWS and record["train_rows"] == built.record["train_rows"]
    assert [u["rows_added"] for u in record["updates"]] == [GROWN - ROWS] and record["updates"][0]["rows"] == GROWN
    assert set(record["recall@10"]["store sample"]) == {*MODES, "faiss only"}
    assert record["recall@10"] != built.record["recall@10"]  # measured again, over the grown store
    index = load_index(info)
    assert index.index.ntotal == GROWN
    assert np.array_equal(_centroids(index.index), centroids)  # not trained again
    for column in ("retrieval", "perspectives", "valid"):
        copy = np.load(vector_path(store, column), mmap_mode="r")
        assert copy.shape[0] == GROWN and np.array_equal(copy[ROWS:], read_shard(info, 5, [column]).columns[column])
    new_rows = torch.from_numpy(np.asarray(index.vectors["retrieval"][ROWS:ROWS + 8], dtype=np.float32))
    found = index.candidates(new_rows, 20, nprobe=8)  # PQ codes: an item is among its own first candidates
    assert all(row in candidates for row, candidates in zip(range(ROWS, ROWS + 8), found.tolist(), strict=True))
    queries = synthetic_queries(10, DIM, clusters=CLUSTERS)
    rows = index.search(queries, 5, "fused", candidates=GROWN, nprobe=8)[1]  # every row a candidate: exact
    assert torch.equal(rows, exact_topk(info, queries, 5, "fused")[1])

    mtime = (store / INDEX_JSON).stat().st_mtime_ns
    again = update_index(info, IndexSettings(), progress=False)
    assert again.action == "current" and (store / INDEX_JSON).stat().st_mtime_ns == mtime  # nothing written


def test_flat_index_just_adds(full: Path, tmp_path: Path) -> None:
    store = _before_growth(full, tmp_path / "store")
    update_index(open_store(store), IndexSettings("Flat", recall_queries=20), progress=False)
    _grow(full, store)
    done = update_index(open_store(store), IndexSettings(recall_queries=20), progress=False)
    assert done.action == "added" and done.rows_added == GROWN - ROWS
    assert done.record["recall@10"]["store sample"]["fused"] == 1.0  # Flat: exact candidates
    assert load_index(open_store(store)).index.ntotal == GROWN


def test_index_is_built_again_when_it_cannot_be_extended(full: Path, tmp_path: Path) -> None:
    store = _before_growth(full, tmp_path / "store")
    update_index(open_store(store), IndexSettings("Flat", recall_queries=5), progress=False)
    _grow(full, store)
    rebuilt = update_index(open_store(store), IndexSettings("IVF8,Flat", recall_queries=5), progress=False)
    assert rebuilt.action == "built" and "differs from the index's 'Flat'" in rebuilt.reason
    shutil.copy(shard_path(full, 4), shard_path(store, 3))  # a covered shard rewritten (same row count)
    again = update_index(open_store(store), IndexSettings(recall_queries=5), progress=False)
    assert again.action == "built" and again.reason == "shards the index covers were rewritten since it was built"
    assert main(["index", str(store), "--rebuild", "--recall-queries", "5", "--quiet"]) == 0
    assert json.loads((store / INDEX_JSON).read_text())["rows_at_training"] == GROWN


def test_server_picks_up_the_updated_index(full: Path, tmp_path: Path) -> None:
    from mpsclip.serve.catalog import Catalog

    store = _before_growth(full, tmp_path / "store")
    update_index(open_store(store), IndexSettings("IVF8,PQ8x4fs", nprobe=2, recall_queries=10), progress=False)
    catalog = Catalog([store])
    assert catalog.get(None).index is not None and catalog.get(None).index.index.ntotal == ROWS
    _grow(full, store)
    assert catalog.reload() == {"store": "reloaded"}
    status = catalog.get(None).index_status()
    assert len(catalog.get(None).ids) == GROWN and not status["used"] and "mpsclip index" in status["error"]
    assert main(["index", str(store), "--recall-queries", "10", "--quiet"]) == 0
    assert catalog.reload() == {"store": "reloaded"}
    served = catalog.get(None)
    assert served.index is not None and served.index.index.ntotal == GROWN and served.index_status()["used"]
    q = synthetic_queries(6, DIM, clusters=CLUSTERS)
    assert torch.equal(served.topk(q, 5, "fused")[1], load_index(open_store(store)).search(q, 5, "fused")[1])
