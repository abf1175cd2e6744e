from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from extras import require
from mpsclip.bench.search import synthetic_queries, synthetic_store

from mpsclip.archive.index import (
    INDEX_JSON,
    IndexSettings,
    build_index,
    default_factory,
    import_faiss,
    load_index,
    recall_at_k,
)
from mpsclip.archive.job import EmbedSettings, embed_archive
from mpsclip.archive.search import exact_topk
from mpsclip.archive.store import write_manifest
from mpsclip.archive.store_reader import open_store
from mpsclip.choices import MODES
from mpsclip.cli import main
from mpsclip.data.synth import generate
from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP

require("faiss")
DIM = 32


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "synthetic"
    synthetic_store(path, 600, dim=DIM, views=2, shard_size=128, clusters=20)
    return path


def test_default_factory() -> None:
    assert default_factory(1_000, 512) == "Flat"
    assert default_factory(100_000, 512) == "IVF1024,PQ128x4fs"
    assert default_factory(1_000_000, 510) == "IVF4096,Flat"


def test_rerank_of_all_rows_is_exact_search(synthetic: Path) -> None:
    info = open_store(synthetic)
    record = build_index(info, IndexSettings(factory="Flat", recall_queries=20), progress=False)
    assert record["factory"] == "Flat" and record["nprobe"] is None and record["recall_queries"] == {"store sample": 20}
    assert set(record["recall@10"]["store sample"]) == {*MODES, "faiss only"}
    assert record["recall@10"]["store sample"]["fused"] == 1.0  # Flat finds the exact fused top-10
    assert json.loads((synthetic / INDEX_JSON).read_text()) == record
    index = load_index(info)
    queries = synthetic_queries(7, DIM, clusters=20)
    for mode in MODES:
        want = exact_topk(info, queries, 5, mode)
        got = index.search(queries, 5, mode, candidates=info.n_rows)
        assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], atol=1e-6)


def test_ivf_pq_index(synthetic: Path) -> None:
    info = open_store(synthetic)
    queries = synthetic_queries(20, DIM, clusters=20)
    record = build_index(info, IndexSettings("IVF8,PQ8x4fs", nprobe=2, recall_queries=30), queries, progress=False)
    assert record["nprobe"] == 2 and record["recall_queries"] == {"store sample": 30, "text": 20}
    assert all(0 <= r <= 1 for recalls in record["recall@10"].values() for r in recalls.values())
    index = load_index(info)
    exact = exact_topk(info, queries, 10, "max-response")
    broad = recall_at_k(index.search(queries, 10, "max-response", candidates=200, nprobe=8), exact)
    assert broad >= recall_at_k(index.search(queries, 10, "max-response", candidates=10, nprobe=1), exact)
    assert broad > 0.9
    scores, rows = index.search(queries, 10, "global")
    assert torch.all(scores[:, :-1] >= scores[:, 1:]) and rows.min() >= 0


def test_recall_at_k_counts_ties_as_equal() -> None:
    exact = (
        torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, -torch.inf, -torch.inf]]),
        torch.tensor([[1, 2, 3, 4], [5, 6, -1, -1]]),
    )
    missed = (torch.tensor([[0.7, 0.6, 0.5, 0.4], [0.9, 0.8, 0.1, 0.0]]), torch.tensor([[3, 4, 9, 8], [6, 5, 0, 7]]))
    assert recall_at_k(missed, exact) == pytest.approx(0.75)  # rows 9 and 8 score below the 4th exact score
    tied = (torch.tensor([[0.9, 0.8, 0.7, 0.6]]), torch.tensor([[1, 2, 3, 7]]))  # row 7 ties with row 4
    assert recall_at_k(tied, (exact[0][:1], exact[1][:1])) == 1.0
    assert recall_at_k((tied[0] - 1e-3, tied[1]), (exact[0][:1], exact[1][:1])) == pytest.approx(0.75)


def test_flat_index_recall_is_one_on_a_store_with_duplicates(tmp_path: Path) -> None:
    """Each embedding is stored three times: exact search breaks ties by row and FAISS by its own order, so the
    rows differ while the scores agree; a Flat index must report recall 1.0 in every mode."""
    import numpy as np

    from mpsclip.archive.store import ShardRows, shard_path, write_shard

    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((40, DIM)).astype(np.float32)
    vectors = np.repeat(distinct / np.linalg.norm(distinct, axis=1, keepdims=True), 3, axis=0).astype(np.float16)
    rng.shuffle(vectors)  # duplicates in rows far apart
    n = len(vectors)
    rows = ShardRows([f"{i:04d}.png" for i in range(n)], ["{}"] * n, vectors, vectors,
                     np.repeat(vectors[:, None], 2, axis=1), np.ones((n, 2), dtype=bool))
    write_shard(shard_path(tmp_path, 0), rows, DIM, 2)
    write_manifest(tmp_path, {"complete": True, "counts": {"items": n, "embedded": n, "failed": 0, "shards": 1},
                              "dim": DIM, "views": 2, "checkpoint": "synthetic", "checkpoint_sha256": "synthetic",
                              "arch": None, "precision": "fp16"})
    info = open_store(tmp_path)
    record = build_index(info, IndexSettings(factory="Flat", recall_queries=30), progress=False)
    assert record["recall@10"]["store sample"] == {mode: 1.0 for mode in (*MODES, "faiss only")}
    queries = torch.from_numpy(vectors[:30].astype(np.float32))
    exact = exact_topk(info, queries, 10, "fused")
    found = load_index(info).search(queries, 10, "fused", candidates=10)
    assert not torch.equal(found[1], exact[1])  # the tie order differs somewhere: rows alone would give recall < 1
    assert recall_at_k(found, exact) == 1.0


def test_stale_or_bad_index_is_refused(synthetic: Path, tmp_path: Path) -> None:
    info = open_store(synthetic)
    with pytest.raises(MPSCLIPError, match="not a FAISS index_factory string"):
        build_index(info, IndexSettings(factory="IVFx,PQ"))
    with pytest.raises(MPSCLIPError, match="no inverted lists"):
        build_index(info, IndexSettings(factory="Flat", nprobe=4))
    with pytest.raises(MPSCLIPError, match="cannot train"):
        build_index(info, IndexSettings(factory="IVF4096,Flat"), progress=False)
    assert load_index(info) is None  # the failed build removed the old index.json
    build_index(info, IndexSettings(factory="Flat", recall_queries=5), progress=False)
    manifest = json.loads((synthetic / "manifest.json").read_text())
    write_manifest(synthetic, {**manifest, "note": "re-embedded"})
    try:
        with pytest.raises(MPSCLIPError, match="another state of the store.*mpsclip index"):
            load_index(open_store(synthetic))
    finally:
        write_manifest(synthetic, manifest)
    assert load_index(open_store(synthetic)) is not None


def test_missing_faiss_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MPSCLIPError, match=r"pip install 'mpsclip\[index\]'"):
        import_faiss()


@pytest.mark.slow
def test_index_and_search_cli(tiny_model: MPSCLIP, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate(tmp_path / "synth", n_train=0, n_test=6, seed=0, image_size=64, workers=1)
    ckpt = tiny_model.save(tmp_path / "m")
    settings = EmbedSettings(batch_size=3, shard_size=4, workers=0, device="cpu")
    embed_archive(tmp_path / "synth" / "images", tmp_path / "s", ckpt, settings=settings, progress=False)
    store = str(tmp_path / "s")
    queries = tmp_path / "queries.txt"
    queries.write_text("an airport\nships in a harbor\n")
    assert main(["index", store, "--faiss", "Flat", "--queries-file", str(queries), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "index Flat over 6 items" in out and "(2 text queries)" in out and "(6 store sample queries)" in out
    search = ["search", store, "an airport", "-k", "3", "--format", "json", "--quiet"]
    assert main(search) == 0
    captured = capsys.readouterr()
    assert "searching with the index (Flat" in captured.err
    indexed = json.loads(captured.out)["results"][0]["hits"]
    assert main([*search, "--exact"]) == 0
    captured = capsys.readouterr()
    assert "index" not in captured.err
    assert [h["id"] for h in json.loads(captured.out)["results"][0]["hits"]] == [h["id"] for h in indexed]
    assert main([*search, "--candidates", "2"]) == 2
    assert "--candidates must be at least -k" in capsys.readouterr().err
    assert main(["index", store, "--faiss", "IVF2,Flat", "--nprobe", "0"]) == 2
    assert "--nprobe must be 1 or more" in capsys.readouterr().err
