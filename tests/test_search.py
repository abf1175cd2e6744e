from __future__ import annotations

import html
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_adapters
from PIL import Image

from mpsclip.archive import job as job_mod
from mpsclip.archive.items import Item, item_from_meta
from mpsclip.archive.job import EmbedSettings, embed_archive
from mpsclip.archive.render import to_html
from mpsclip.archive.search import (
    Hit,
    encode_images,
    encode_queries,
    exact_topk,
    load_search_model,
    search_store,
)
from mpsclip.archive.sources import iter_items
from mpsclip.archive.store import ShardRows, shard_path, write_manifest, write_shard
from mpsclip.archive.store_reader import VECTOR_COLUMNS, load_store, open_store
from mpsclip.choices import MODES
from mpsclip.cli import main
from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP

SMALL = EmbedSettings(batch_size=2, shard_size=2, workers=0, device="cpu")
DIM, VIEWS = 8, 2
SHARD_SIZES = (5, 0, 7, 4)  # an empty shard in between


def _dyadic(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Multiples of 1/8 in [-1, 1]: their dot products are exact in fp32, so equal scores are exact ties."""
    return rng.integers(-8, 9, size=shape) / 8


@pytest.fixture(scope="module")
def dyadic_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shards (one empty) of 16 items with exact-tie scores: items 3 and 12 are copies of item 1."""
    path = tmp_path_factory.mktemp("stores") / "dyadic"
    rng = np.random.default_rng(0)
    n = sum(SHARD_SIZES)
    retrieval, glob = _dyadic(rng, (n, DIM)), _dyadic(rng, (n, DIM))
    persp = _dyadic(rng, (n, VIEWS, DIM))
    valid = rng.random((n, VIEWS)) < 0.5
    for copy in (3, 12):
        retrieval[copy], glob[copy], persp[copy], valid[copy] = retrieval[1], glob[1], persp[1], valid[1]
    start = 0
    for shard, size in enumerate(SHARD_SIZES):
        rows = range(start, start + size)
        metas = [json.dumps({"footprint": [float(i), 0.0, i + 0.5, 0.5]} if i % 3 else {}) for i in rows]
        part = slice(start, start + size)
        shard_rows = ShardRows([f"item{i:02d}" for i in rows], metas, retrieval[part], glob[part], persp[part],
                               valid[part])
        write_shard(shard_path(path, shard), shard_rows, DIM, VIEWS)
        start += size
    counts = {"items": n, "embedded": n, "failed": 0, "shards": len(SHARD_SIZES)}
    write_manifest(path, {"complete": True, "counts": counts, "dim": DIM, "views": VIEWS})
    return path


def _brute_force(path: Path, queries: torch.Tensor, k: int, mode: str, bbox: tuple | None) -> list[list[tuple]]:
    """Every item scored in float64 from the in-memory store, sorted by (score desc, row asc)."""
    data = load_store(path)
    retrieval, glob, perspectives, valid = (torch.from_numpy(data.columns[c]) for c in VECTOR_COLUMNS)
    results = []
    for q in queries.double():
        scored = []
        for row in range(len(data.ids)):
            fp = data.metas[row].get("footprint")
            outside = bbox is not None and (
                fp is None or fp[0] > bbox[2] or bbox[0] > fp[2] or fp[1] > bbox[3] or bbox[1] > fp[3]
            )
            if outside:
                continue
            if mode == "fused":
                score = float(retrieval[row].double() @ q)
            elif mode == "global":
                score = float(glob[row].double() @ q)
            else:
                views = [glob[row]] + [p for p, ok in zip(perspectives[row], valid[row], strict=True) if ok]
                score = max(float(v.double() @ q) for v in views)
            scored.append((-score, row))
        results.append([(data.ids[row], -neg) for neg, row in sorted(scored)[:k]])
    return results


@pytest.mark.parametrize("mode", MODES)
def test_streamed_search_matches_brute_force(dyadic_store: Path, mode: str) -> None:
    info = open_store(dyadic_store)
    assert info.shard_rows == SHARD_SIZES and info.offsets() == [0, 5, 5, 12]
    queries = torch.from_numpy(_dyadic(np.random.default_rng(1), (5, DIM))).float()
    queries[4] = 0  # every item scores 0: the order is the store order
    for k in (1, 4, 30):
        for bbox in (None, (2.2, 0.0, 9.0, 1.0)):
            got = search_store(info, queries, k, mode, bbox)
            want = _brute_force(dyadic_store, queries, k, mode, bbox)
            assert [[(h.id, h.score) for h in hits] for hits in got] == want
    data = load_store(dyadic_store)
    hits = search_store(info, queries, 30, mode)
    assert [h.rank for h in hits[0]] == list(range(1, 17)) and [h.id for h in hits[4]] == data.ids
    assert hits[0][0].meta == data.metas[int(hits[0][0].id[4:])]


def test_ties_go_to_the_lower_row(dyadic_store: Path) -> None:
    data = load_store(dyadic_store)
    query = torch.from_numpy(data.columns["retrieval"][1]).float().unsqueeze(0)
    scores, rows = exact_topk(open_store(dyadic_store), query, 16, "fused")
    scores, rows = scores[0].tolist(), rows[0].tolist()
    tied = [r for r, s in zip(rows, scores, strict=True) if s == scores[rows.index(1)]]
    assert {1, 3, 12} <= set(tied) and tied == sorted(tied)


def test_store_errors(dyadic_store: Path, tmp_path: Path) -> None:
    with pytest.raises(MPSCLIPError, match="no manifest.json"):
        open_store(tmp_path)
    manifest = json.loads((dyadic_store / "manifest.json").read_text())
    write_manifest(tmp_path, {**manifest, "complete": False})
    with pytest.raises(MPSCLIPError, match="unfinished"):
        open_store(tmp_path)
    with pytest.raises(MPSCLIPError, match="-k must be"):
        exact_topk(open_store(dyadic_store), torch.zeros(1, DIM), 0)
    with pytest.raises(MPSCLIPError, match="unknown mode"):
        exact_topk(open_store(dyadic_store), torch.zeros(1, DIM), 1, "best")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_scoring_matches_cpu(dyadic_store: Path) -> None:
    info = open_store(dyadic_store)
    queries = torch.from_numpy(_dyadic(np.random.default_rng(2), (6, DIM))).float()
    for mode in MODES:
        cpu_s, cpu_i = exact_topk(info, queries, 9, mode)
        gpu_s, gpu_i = exact_topk(info, queries.cuda(), 9, mode)
        assert torch.equal(cpu_i, gpu_i) and torch.equal(cpu_s, gpu_s)


# --- with a model: text and image queries, the command line ---------------------------------------------------


@pytest.fixture(scope="module")
def store(synth_store: Path) -> Path:
    return synth_store


@pytest.mark.slow
def test_text_and_image_queries(synth: Path, store: Path) -> None:
    info = open_store(store)
    model = load_search_model(info.manifest, None)
    data = load_store(store)
    assert data.columns["valid"].any()
    queries = encode_queries(model, ["an airport", "a harbor with boats"])
    for mode in MODES:
        hits = search_store(info, queries, 4, mode)
        assert [len(h) for h in hits] == [4, 4] and [h.rank for h in hits[0]] == [1, 2, 3, 4]
        assert [h.score for h in hits[0]] == sorted((h.score for h in hits[0]), reverse=True)
    fused = search_store(info, queries, 6, "fused")[0]
    best = (torch.from_numpy(data.columns["retrieval"]).float() @ queries[0]).max().item()
    assert fused[0].score == pytest.approx(best, abs=1e-5)
    assert len(search_store(info, queries, 50, "global")[0]) == 6
    images = [synth / "images" / name for name in data.ids[:3]]
    image_hits = search_store(info, encode_images(model, images), 1, "global")
    assert [h[0].id for h in image_hits] == data.ids[:3] and image_hits[0][0].score == pytest.approx(1, abs=2e-3)


def test_search_cli_text_and_images(synth: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = synth / "images" / load_store(store).ids[2]
    args = ["search", str(store), "an airport", "--image", str(image), "-k", "3", "--format", "json", "--quiet"]
    assert main([*args, "--mode", "max-response"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in out["results"]] == ["an airport", str(image)]
    assert [h["rank"] for h in out["results"][0]["hits"]] == [1, 2, 3]
    assert main(["search", str(store), "an airport", "--device", "cpu"]) == 0
    assert "rank" in capsys.readouterr().out


def test_search_cli_errors(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["search", str(store), "--image", str(broken)]) == 2
    assert f"--image {broken}: cannot be read as an image" in capsys.readouterr().err
    assert main(["search", str(store)]) == 2
    assert "no queries" in capsys.readouterr().err
    assert main(["search", str(store), "x", "--candidates", "50"]) == 2
    assert "only used with an index" in capsys.readouterr().err
    assert main(["search", str(store), "x", "--bbox", "1,2,3"]) == 2
    assert "--bbox" in capsys.readouterr().err


def test_other_model_is_refused(store: Path, tmp_path: Path) -> None:
    other = randomize_adapters(MPSCLIP("MPS-Tiny"), seed=1).save(tmp_path / "other")
    with pytest.raises(MPSCLIPError, match="differs"):
        load_search_model(open_store(store).manifest, other)


@pytest.mark.slow
def test_search_cli_geojson_and_html(
    synth: Path, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def with_footprints(source: Path) -> Iterator[Item]:
        for n, item in enumerate(iter_items(source)):
            meta = {**item.meta, "footprint": [float(n), 0.0, n + 0.5, 0.5]} if n < 4 else item.meta
            yield Item(item.id, item.path, meta, item.kind)

    monkeypatch.setattr(job_mod, "iter_items", with_footprints)
    embed_archive(synth / "images", tmp_path / "s", ckpt, settings=SMALL, progress=False)
    assert main(["search", str(tmp_path / "s"), "an airport", "-k", "6", "--format", "geojson"]) == 0
    captured = capsys.readouterr()
    collection = json.loads(captured.out)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 4
    assert "2 hits have no footprint" in captured.err
    feature = collection["features"][0]
    assert feature["geometry"]["type"] == "Polygon" and feature["properties"]["rank"] >= 1
    assert main(["search", str(tmp_path / "s"), "x", "--bbox", "1.2,0,2.2,1", "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    assert sorted(h["meta"]["footprint"][0] for h in hits) == [1.0, 2.0]
    sheet = tmp_path / "hits.html"
    assert main(["search", str(tmp_path / "s"), "x", "-k", "2", "--format", "html", "--out", str(sheet)]) == 0
    assert sheet.read_text().count('<img src="data:image/png;base64,') == 2


SCRIPT = "<script>alert(1)</script>"


def test_html_escapes_ids_keywords_and_queries(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "a.png")
    meta = {"kind": "file", "path": "a.png", "keywords": [SCRIPT, "harbour & <b>boats</b>"]}
    hits = [Hit(rank=1, score=0.5, id=SCRIPT, meta=meta)]
    sheet = to_html([SCRIPT], [hits], {"source_root": str(tmp_path)}, "fused")
    assert "<script" not in sheet and "<b>" not in sheet
    assert sheet.count(html.escape(SCRIPT)) == 3  # the query, the id and the keyword
    assert "harbour &amp; &lt;b&gt;boats&lt;/b&gt;" in sheet
    assert sheet.count('<img src="data:image/png;base64,') == 1


@pytest.mark.slow
def test_moved_source_is_found_with_source_root(
    synth: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(synth / "images", tmp_path / "src")
    embed_archive(tmp_path / "src", tmp_path / "s", ckpt, settings=SMALL, progress=False)
    (tmp_path / "src").rename(tmp_path / "elsewhere")
    args = ["search", str(tmp_path / "s"), "an airport", "-k", "2", "--format", "html", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"source folder {tmp_path / 'src'} does not exist here" in err and "--source-root DIR" in err
    assert main([*args, "--source-root", str(tmp_path / "nowhere")]) == 2
    assert f"--source-root {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    assert main([*args, "--source-root", str(tmp_path / "elsewhere")]) == 0
    assert capsys.readouterr().out.count('<img src="data:image/png;base64,') == 2
    assert main(["search", str(tmp_path / "s"), "an airport", "--quiet"]) == 0  # scoring needs no source
    assert "rank" in capsys.readouterr().out

    info = open_store(tmp_path / "s", source_root=tmp_path / "elsewhere")
    assert info.manifest["source_root"] == str(tmp_path / "elsewhere")
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["source_root"] == str(tmp_path / "src")
    for hit in search_store(info, torch.zeros(1, info.dim), 6)[0]:
        assert item_from_meta(hit.id, hit.meta, info.manifest).path == tmp_path / "elsewhere" / hit.id
