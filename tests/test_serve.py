"""The HTTP API in process (FastAPI TestClient): served top-k equals 'mpsclip search', errors name the field."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mpsclip.serve.app import MAX_UPLOAD_BYTES, create_app
from mpsclip.serve.catalog import Catalog, store_names

from mpsclip.archive.job import EmbedSettings, embed_archive
from mpsclip.archive.search import encode_queries, load_search_model, search_store
from mpsclip.archive.store import open_store


@pytest.fixture(scope="module")
def store(synth: Path, ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = EmbedSettings(
        perspectives="from-dir", sub_root=synth / "subimages", batch_size=3, shard_size=3, device="cpu"
    )
    out = tmp_path_factory.mktemp("stores") / "s"
    embed_archive(synth / "images", out, ckpt, settings=settings, progress=False)
    return out


@pytest.fixture(scope="module")
def client(store: Path):
    catalog = Catalog([store], lambda info: load_search_model(info.manifest, None))
    with TestClient(create_app(catalog)) as c:
        yield c


@pytest.mark.parametrize("mode", ["fused", "global", "max-response"])
def test_served_topk_equals_search(client: TestClient, store: Path, mode: str) -> None:
    info = open_store(store)
    model = load_search_model(info.manifest, None)
    want = search_store(info, encode_queries(model, ["an airport"]), 4, mode)[0]
    got = client.post("/search", json={"text": "an airport", "k": 4, "mode": mode}).json()
    assert [h["id"] for h in got["hits"]] == [h.id for h in want]
    assert [h["score"] for h in got["hits"]] == pytest.approx([h.score for h in want], abs=1e-3)
    assert got["store"] == "s" and got["k"] == 4 and set(got["took_ms"]) == {"encode", "score", "total"}
    hit = got["hits"][0]
    assert hit["rank"] == 1 and hit["thumbnail_url"] == f"/items/s/{hit['id']}/thumbnail"


def test_item_embedding_image_and_batch(client: TestClient, synth: Path) -> None:
    first = client.post("/search", json={"text": "a harbor", "k": 2}).json()["hits"][0]["id"]
    like = client.post("/search", json={"item_id": first, "k": 1, "mode": "global"}).json()
    assert like["hits"][0]["id"] == first and like["hits"][0]["score"] == pytest.approx(1, abs=2e-3)
    item = client.get(f"/items/s/{first}").json()
    assert item["id"] == first and item["store"] == "s"
    thumb = client.get(f"/items/s/{first}/thumbnail")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    png = (synth / "images" / first).read_bytes()
    by_image = client.post("/search", json={"image": base64.b64encode(png).decode(), "k": 1, "mode": "global"})
    assert by_image.json()["hits"][0]["id"] == first
    upload = client.post("/search/upload", files={"file": ("q.png", png)}, data={"k": "1", "mode": "global"})
    assert upload.json()["hits"][0]["id"] == first
    listed = client.get("/stores").json()["stores"][0]
    assert listed["name"] == "s" and listed["items"] == 6
    dim = len(like["hits"]) and client.app.state.catalog.get("s").info.dim
    emb = client.post("/search", json={"embedding": [1.0] + [0.0] * (dim - 1), "k": 3}).json()
    assert len(emb["hits"]) == 3
    assert client.post("/search", json={"embedding": [1.0], "k": 3}).status_code == 422
    batch = client.post("/search/batch", json={"queries": [{"text": "a"}, {"text": "b", "k": 2}]}).json()
    assert [len(r["hits"]) for r in batch["results"]] == [6, 2]


def test_bad_input_names_the_field(client: TestClient) -> None:
    for body, field in [
        ({"text": "x", "k": 0}, "k"),
        ({"text": "x", "mode": "best"}, "mode"),
        ({"k": 3}, "exactly one"),
        ({"text": "x", "item_id": "y"}, "exactly one"),
        ({"text": "x", "bbox": [1, 2, 0, 3]}, "bbox"),
        ({"image": "not base64!"}, "image"),
        ({"item_id": "nope"}, "item_id"),
        ({"text": "x", "store": "other"}, "store"),
    ]:
        r = client.post("/search", json=body)
        assert 400 <= r.status_code < 500 and field in str(r.json()["detail"]), (body, r.text)
    big = client.post("/search/upload", files={"file": ("q.png", b"0" * (MAX_UPLOAD_BYTES + 1))})
    assert big.status_code == 413
    assert client.post("/search/upload", files={"file": ("q.png", b"junk")}).status_code == 422


def test_health_metrics_and_names(client: TestClient, tmp_path: Path) -> None:
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    text = client.get("/metrics").text
    assert "mpsclip_request_seconds" in text and "mpsclip_stage_seconds" in text and "mpsclip_batch_size" in text
    assert store_names([tmp_path / "a" / "s", tmp_path / "b" / "s"]) == ["s", "s-2"]
    assert client.get("/docs").status_code == 200


def test_overload_answers_503_then_recovers(store: Path) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    gate = threading.Event()
    catalog = Catalog([store], lambda info: load_search_model(info.manifest, None))
    app = create_app(catalog, max_batch=1, max_queue=1)
    encoder = app.state.batcher.fn

    def slow(jobs):
        gate.wait(5)
        return encoder(jobs)

    app.state.batcher.fn = slow
    with TestClient(app) as c, ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(c.post, "/search", json={"text": f"q{i}"}) for i in range(6)]
        threading.Timer(1.0, gate.set).start()
        responses = [p.result() for p in pending]
        codes = [r.status_code for r in responses]
        assert 503 in codes and 200 in codes
        assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
        assert c.post("/search", json={"text": "again"}).status_code == 200
