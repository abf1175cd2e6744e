"""The server scores like 'mpsclip search': through a store's FAISS index (read once per store version), exactly
with --exact or a bbox, and on a GPU by the max-over-views top-k kernel (here under Triton's CPU interpreter)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from extras import require
from mpsclip.bench.search import synthetic_queries, synthetic_store

from mpsclip.archive.index import IndexSettings, build_index, index_answers, load_index
from mpsclip.archive.search import exact_topk, search_store
from mpsclip.archive.store_reader import open_store
from mpsclip.choices import MODES
from tests.interpreter import INTERPRETED, interpreted, run_in_interpreter

require("faiss")
DIM, CLUSTERS, K = 32, 20, 5
INDEX = IndexSettings("IVF8,PQ8x4fs", nprobe=1, recall_queries=20)  # approximate: its answers differ from exact
parent = pytest.mark.skipif(INTERPRETED, reason="runs in the parent process, not the TRITON_INTERPRET=1 child")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 clustered items in 5 shards, with perspectives: enough rows for FAISS to train IVF8,PQ8x4fs."""
    path = tmp_path_factory.mktemp("stores") / "synthetic"
    synthetic_store(path, 600, dim=DIM, views=2, shard_size=128, clusters=CLUSTERS)
    return path


@pytest.fixture(scope="module")
def indexed(plain: Path) -> Path:
    path = plain.parent / "indexed"
    shutil.copytree(plain, path)
    build_index(open_store(path), INDEX, progress=False)
    return path


def queries(n: int = 12) -> torch.Tensor:
    return synthetic_queries(n, DIM, clusters=CLUSTERS)


def served(catalog, q: torch.Tensor, mode: str, bbox=None) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    from fastapi.testclient import TestClient
    from mpsclip.serve.app import create_app

    scores, rows = [], []
    with TestClient(create_app(catalog)) as client:
        assert client.get("/stores").json()["stores"][0]["index"] == catalog.get(None).index_status()
        assert "'mpsclip serve --exact'" in client.get("/openapi.json").json()["info"]["description"]
        for vec in q.tolist():
            body = {"embedding": vec, "k": K, "mode": mode} | ({"bbox": list(bbox)} if bbox else {})
            hits = client.post("/search", json=body).json()["hits"]
            rows.append([catalog.get(None).row_of[h["id"]] for h in hits])
            scores.append([h["score"] for h in hits])
    return torch.tensor(scores), torch.tensor(rows)


@parent
def test_index_answers_like_search() -> None:
    assert index_answers(exact=False, bbox=None)
    assert not index_answers(exact=True, bbox=None)
    assert not index_answers(exact=False, bbox=(0.0, 0.0, 1.0, 1.0))


@parent
def test_scoring_path() -> None:
    from mpsclip.serve.catalog import scoring_path

    cpu, cuda, box = torch.device("cpu"), torch.device("cuda", 0), (0.0, 0.0, 1.0, 1.0)
    for mode in MODES:
        assert scoring_path(cpu, mode, True, False, None) == "index"
        assert scoring_path(cuda, mode, True, False, None) == "index"
        assert scoring_path(cuda, mode, True, True, None) == "maxsim-kernel"
        assert scoring_path(cuda, mode, True, False, box) == "maxsim-kernel"
        assert scoring_path(cuda, mode, False, False, None) == "maxsim-kernel"
    assert scoring_path(cpu, "fused", True, True, None) == "numpy-product"
    assert scoring_path(cpu, "global", False, False, box) == "numpy-product"
    assert scoring_path(cpu, "max-response", False, False, None) == "maxsim-reference"


@parent
@pytest.mark.parametrize("mode", MODES)
def test_served_topk_is_search_with_the_index_and_exact_with_exact(indexed: Path, mode: str) -> None:
    from mpsclip.serve.catalog import Catalog

    info, q = open_store(indexed), queries()
    with_index = load_index(info).search(q, K, mode)  # what 'mpsclip search' answers on this store
    exact = exact_topk(info, q, K, mode)  # what 'mpsclip search --exact' answers
    assert not torch.equal(with_index[1], exact[1])  # nprobe 1 of 8 lists misses some: the two answers differ
    catalog = Catalog([indexed])
    assert catalog.get(None).index_status()["used"] is True
    got = served(catalog, q, mode)
    assert torch.equal(got[1], with_index[1]) and torch.allclose(got[0], with_index[0], atol=1e-6)
    got_exact = served(Catalog([indexed], exact=True), q, mode)
    assert torch.equal(got_exact[1], exact[1]) and torch.allclose(got_exact[0], exact[0], atol=1e-5)


@parent
def test_bbox_is_exact_among_the_boxed_items_as_search(indexed: Path) -> None:
    from mpsclip.serve.catalog import Catalog

    info, q, box = open_store(indexed), queries(4), (-180.0, -85.0, 60.0, 40.0)
    catalog = Catalog([indexed])
    for mode in MODES:
        want = search_store(info, q, K, mode, bbox=box)
        scores, rows = served(catalog, q, mode, box)
        assert rows.tolist() == [[catalog.get(None).row_of[h.id] for h in hits] for hits in want]
        assert torch.allclose(scores, torch.tensor([[h.score for h in hits] for hits in want]), atol=1e-5)


@parent
def test_index_read_once_and_again_after_mpsclip_index(
    plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpsclip.serve import catalog as catalog_module

    from mpsclip.cli import main

    store = tmp_path / "store"
    shutil.copytree(plain, store)
    loads: list[Path] = []
    counted = lambda info, vectors: loads.append(info.path) or load_index(info, vectors)  # noqa: E731
    monkeypatch.setattr(catalog_module, "load_index", counted)
    catalog = catalog_module.Catalog([store])
    assert catalog.get(None).index is None and loads == [store]  # looked for once: none yet
    q = queries(6)
    exact = exact_topk(open_store(store), q, K, "fused")
    assert torch.equal(served(catalog, q, "fused")[1], exact[1])

    assert main(["index", str(store), "--faiss", "IVF8,PQ8x4fs", "--nprobe", "1", "--quiet"]) == 0
    assert catalog.reload() == {"store": "reloaded"} and len(loads) == 2  # the new index.json is a new version
    index = catalog.get(None).index
    assert index is not None and index.record["factory"] == "IVF8,PQ8x4fs"
    columns = catalog.get(None).columns  # candidates re-ranked from the columns in memory, not the .npy copies
    assert all(index.vectors[c] is columns[c] for c in ("retrieval", "global", "perspectives", "valid"))
    for mode in MODES:
        assert torch.equal(served(catalog, q, mode)[1], load_index(open_store(store)).search(q, K, mode)[1])
    assert catalog.reload() == {"store": "unchanged"} and catalog.reload(force=True) == {"store": "reloaded"}
    assert len(loads) == 2 and catalog.get(None).index.index is index.index  # not read again, nor by queries

    assert main(["index", str(store), "--faiss", "Flat", "--quiet"]) == 0  # rebuilt: read again
    assert catalog.reload() == {"store": "reloaded"} and len(loads) == 3
    assert catalog.get(None).index.record["factory"] == "Flat"
    assert torch.equal(served(catalog, q, "fused")[1], exact[1])  # Flat re-ranks the exact top 10 x k


@parent
def test_stale_index_is_logged_and_the_store_scored_exactly(
    indexed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mpsclip.serve.catalog import Catalog

    store = tmp_path / "store"
    shutil.copytree(indexed, store)
    with (store / "manifest.json").open("a") as manifest:  # a manifest the index was not built for
        manifest.write("\n")
    with caplog.at_level("WARNING", logger="mpsclip.serve"):
        catalog = Catalog([store])
    status = catalog.get(None).index_status()
    assert status["used"] is False and "another state of the store" in status["error"]
    assert "its index is not used" in caplog.text
    q = queries(4)
    assert torch.equal(served(catalog, q, "max-response")[1], exact_topk(open_store(store), q, K, "max-response")[1])


@pytest.mark.triton
@pytest.mark.skipif(INTERPRETED, reason="child process")
def test_kernel_path_under_triton_interpreter() -> None:
    require("triton")
    run_in_interpreter(__file__)


@interpreted
@pytest.mark.parametrize("mode", MODES)
def test_kernel_path_equals_the_reference(mode: str, tmp_path: Path) -> None:
    """The GPU path (views on the device, :func:`maxsim_topk`'s Triton kernel), run by the interpreter on CPU
    tensors, answers what the exact chunked reference answers over the same views, with and without a bbox
    (the parent's tests show the CPU paths equal 'mpsclip search --exact')."""
    from mpsclip.kernels.maxsim import maxsim_topk_reference
    from mpsclip.serve.catalog import Catalog

    from mpsclip.archive.geoparquet import footprints_meeting

    path = tmp_path / "s"
    synthetic_store(path, 300, dim=DIM, views=2, shard_size=128, clusters=CLUSTERS)
    store, q = Catalog([path]).get(None), queries(3)
    views, valid = store.views(mode)
    for box in (None, (-180.0, -85.0, 0.0, 0.0)):
        keep = torch.arange(len(views))
        if box is not None:  # the rows whose footprint meets the box
            keep = torch.from_numpy(footprints_meeting(store.filter_arrays().footprints, box))
            assert 0 < len(keep) < len(views)
        want_s, found = maxsim_topk_reference(q, views[keep], K, valid[keep] if valid is not None else None)
        want_r = keep[found]
        got_s, got_r = store.topk_by("maxsim-kernel", q, K, mode, box)
        assert torch.equal(got_r, want_r) and torch.allclose(got_s, want_s, atol=1e-5)


@pytest.mark.gpu
@parent
def test_served_on_cuda_equals_search_on_cuda(indexed: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the kernel path is tested under the Triton interpreter above")
    require("triton")
    from mpsclip.serve.catalog import Catalog

    info, q = open_store(indexed), queries()
    store = Catalog([indexed], device="cuda", exact=True).get(None)
    for mode in MODES:
        got = store.topk(q.cuda(), K, mode)
        want = exact_topk(info, q.cuda(), K, mode)
        assert got[0].device.type == "cpu" and torch.equal(got[1], want[1])
        assert torch.allclose(got[0], want[0], atol=1e-5)
        assert store.views(mode)[0].is_cuda  # held on the device once


@parent
def test_serve_score_bench_interleaves_rounds(tmp_path: Path) -> None:
    import json

    from mpsclip.bench import serve_score

    out = tmp_path / "score"
    assert serve_score.main(["--out", str(out), "--items", "500", "--dim", "16", "--rounds", "3", "--no-fp16"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    samples = record["samples_ms"]
    assert set(samples) == {serve_score.SERVED, serve_score.FP32} and all(len(s) == 3 for s in samples.values())
    ratios = [s / b for s, b in zip(samples[serve_score.SERVED], samples[serve_score.FP32], strict=True)]
    assert record["median_ratio_served_to_fp32_matvec"] == sorted(ratios)[1]
    assert record["top_k_matches_numpy"] is True and "median ratio" in out.with_suffix(".md").read_text()
