"""The HTTP API in process (FastAPI TestClient): served top-k equals 'mpsclip search', errors name the field."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from mpsclip.serve.app import create_app
from mpsclip.serve.catalog import Catalog, store_names
from mpsclip.serve.queries import MAX_UPLOAD_BYTES
from PIL import Image

from mpsclip.archive.job import EmbedSettings, embed_archive
from mpsclip.archive.search import encode_queries, load_search_model, search_store
from mpsclip.archive.store_reader import open_store
from mpsclip.errors import MPSCLIPError


@pytest.fixture(scope="module")
def store(synth_store: Path) -> Path:
    return synth_store


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


def test_item_embedding_image_and_batch(client: TestClient, synth: Path, store: Path) -> None:
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
    queries = [{"text": "a harbor"}, {"text": "an airport", "k": 2, "mode": "max-response"}]
    batch = client.post("/search/batch", json={"queries": queries}).json()
    assert [len(r["hits"]) for r in batch["results"]] == [6, 2]
    info = open_store(store)
    model = load_search_model(info.manifest, None)
    for query, result in zip(queries, batch["results"], strict=True):  # each as 'mpsclip search' ranks it
        want = search_store(info, encode_queries(model, [query["text"]]), query.get("k", 6), query.get("mode", "fused"))
        assert [h["id"] for h in result["hits"]] == [h.id for h in want[0]]
        assert [h["score"] for h in result["hits"]] == pytest.approx([h.score for h in want[0]], abs=1e-3)


def test_bad_input_names_the_field(client: TestClient) -> None:
    for body, field in [
        ({"text": "x", "k": 0}, "k"),
        ({"text": "x", "mode": "best"}, "mode"),
        ({"k": 3}, "exactly one"),
        ({"text": "x", "item_id": "y"}, "exactly one"),
        ({"text": "x", "bbox": [1, 2, 0, 95]}, "bbox"),  # north beyond 90
        ({"text": "x", "bbox": [-181, 2, 0, 3]}, "bbox"),
        ({"image": "not base64!"}, "image"),
        ({"item_id": "nope"}, "item_id"),
        ({"text": "x", "store": "other"}, "store"),
    ]:
        r = client.post("/search", json=body)
        assert 400 <= r.status_code < 500 and field in str(r.json()["detail"]), (body, r.text)
    assert client.post("/search", json={"text": "x", "bbox": [1, 2, 0, 3]}).status_code == 200  # across 180°
    for raw, field in [('{"item_id": [NaN]}', "item_id"), ('{"text": "x", "k": Infinity}', "k"),
                       ('{"text": "x", "bbox": [NaN, 0, -Infinity]}', "bbox")]:  # JSON cannot echo these back
        r = client.post("/search", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and field in str(r.json()["detail"]), (raw, r.text)
    big = client.post("/search/upload", files={"file": ("q.png", b"0" * (MAX_UPLOAD_BYTES + 1))})
    assert big.status_code == 413
    assert client.post("/search/upload", files={"file": ("q.png", b"junk")}).status_code == 422
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")  # 81 Mpx in a few kB: refused before decoding
    for r, field in [(client.post("/search/upload", files={"file": ("q.png", bomb.getvalue())}), "file"),
                     (client.post("/search", json={"image": base64.b64encode(bomb.getvalue()).decode()}), "image")]:
        assert r.status_code == 413 and r.json()["detail"].startswith(f"{field}: 9000 x 9000 pixels")


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
    encoder = app.state.encoder.batcher.fn

    def slow(jobs):
        gate.wait(5)
        return encoder(jobs)

    app.state.encoder.batcher.fn = slow
    with TestClient(app) as c, ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(c.post, "/search", json={"text": f"q{i}"}) for i in range(6)]
        threading.Timer(1.0, gate.set).start()
        responses = [p.result() for p in pending]
        codes = [r.status_code for r in responses]
        assert 503 in codes and 200 in codes
        assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
        assert c.post("/search", json={"text": "again"}).status_code == 200


KEY = "s3cret-Key_1"


@pytest.fixture(scope="module")
def locked(store: Path):
    catalog = Catalog([store], lambda info: load_search_model(info.manifest, None))
    with TestClient(create_app(catalog, api_key=KEY)) as c:
        yield c


def test_api_key_guards_every_path_but_health_and_page(locked: TestClient) -> None:
    for path in ["/healthz", "/readyz", "/", "/static/app.js"]:
        assert locked.get(path).status_code == 200, path
    first = locked.post("/search", json={"text": "a", "k": 1}, headers={"X-API-Key": KEY}).json()["hits"][0]["id"]
    for method, path in [("GET", "/stores"), ("GET", f"/items/s/{first}"), ("GET", f"/items/s/{first}/thumbnail"),
                         ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/search"),
                         ("POST", "/search/batch"), ("POST", "/search/upload"), ("POST", "/admin/reload"),
                         ("GET", "/no/such/path")]:
        for headers in [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
            r = locked.request(method, path, headers=headers, json={"text": "a"})
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"] == "Bearer" and "X-API-Key" in r.json()["detail"]
    assert locked.get("/stores", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert locked.get("/stores", headers={"X-API-Key": KEY}).status_code == 200
    assert locked.post("/search", json={"text": "a"}, headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert 'mpsclip_errors_total{kind="unauthorized"}' in locked.get("/metrics", headers={"X-API-Key": KEY}).text


def test_page_logs_in_once_with_a_session_cookie(store: Path) -> None:
    from urllib.parse import quote as q

    catalog = Catalog([store], lambda info: load_search_model(info.manifest, None))
    with TestClient(create_app(catalog, api_key=KEY), follow_redirects=False) as c:
        assert c.get("/?key=wrong&q=x").status_code == 401 and not c.cookies
        login = c.get(f"/?q=an+airport&key={q(KEY)}&k=3")
        assert login.status_code == 303 and login.headers["location"] == "/?q=an+airport&k=3"
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert c.get("/stores").status_code == 200  # the cookie alone, as the page's fetch and <img> send it
        hit = c.post("/search", json={"text": "a", "k": 1}).json()["hits"][0]
        assert c.get(hit["thumbnail_url"]).status_code == 200
        own = {"Origin": "http://testserver"}
        assert c.post("/search", json={"text": "a"}, headers=own).status_code == 200
        forged = c.post("/search", json={"text": "a"}, headers={"Origin": "http://localhost:3000"})
        assert forged.status_code == 401  # cookie-only requests that change state come from the page's origin
        assert c.get("/stores", headers={"Origin": "http://localhost:3000"}).status_code == 200


def test_bind_warning_and_key_from_environment(store: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from mpsclip.serve import server
    from mpsclip.serve.auth import bind_warning, same_key

    from mpsclip.cli import main

    assert bind_warning("127.0.0.1", None) is None and bind_warning("0.0.0.0", "k") is None
    assert "--api-key" in bind_warning("0.0.0.0", None)
    assert same_key(KEY, KEY) and not same_key("s3cret", KEY) and not same_key(None, KEY)
    assert not same_key("ключ", KEY)  # any text a client sends compares without error
    for unusable in ["", "two words", "ключ"]:
        with pytest.raises(MPSCLIPError, match="printable ASCII"):
            create_app(Catalog([store]), api_key=unusable)
    started: list = []  # mpsclip serve as far as building the app; nothing listens
    monkeypatch.setattr(server, "serve", lambda catalog, towers, settings, make_app: started.append(make_app(None)))
    monkeypatch.delenv("MPSCLIP_API_KEY", raising=False)
    argv = ["serve", str(store), "--host", "0.0.0.0", "--device", "cpu", "--no-triton"]
    main(argv)
    assert "reachable from other machines, with no access control" in capsys.readouterr().err
    monkeypatch.setenv("MPSCLIP_API_KEY", KEY)
    main(argv)
    assert "access control" not in capsys.readouterr().err
    with TestClient(started[-1], base_url="http://127.0.0.1:8000") as c:  # mpsclip serve answers its own names
        assert c.get("/stores").status_code == 401 and c.get("/stores", headers={"X-API-Key": KEY}).status_code == 200


def test_cors_off_unless_asked(store: Path, client: TestClient) -> None:
    preflight = {"Origin": "https://maps.example.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,x-api-key"}
    assert "access-control-allow-origin" not in client.options("/search", headers=preflight).headers
    assert "access-control-allow-origin" not in client.get("/stores", headers={"Origin": preflight["Origin"]}).headers
    catalog = Catalog([store], lambda info: load_search_model(info.manifest, None))
    with TestClient(create_app(catalog, api_key=KEY, cors=["https://maps.example.org"])) as c:
        ok = c.options("/search", headers=preflight)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://maps.example.org"
        denied = c.get("/stores", headers={"Origin": preflight["Origin"]})  # a 401 the page can read
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == preflight["Origin"]
        other = c.options("/search", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_body_limit_refuses_before_reading_it_all(store: Path) -> None:
    catalog = Catalog([store], lambda info: load_search_model(info.manifest, None))
    with TestClient(create_app(catalog, max_body_bytes=4096)) as c:
        assert c.post("/search", json={"text": "x" * 100}).status_code == 200
        big = c.post("/search", json={"text": "x" * 5000})
        assert big.status_code == 413 and "request body" in big.json()["detail"]
        upload = c.post("/search/upload", files={"file": ("q.png", b"0" * 5000)})
        assert upload.status_code == 413
        assert 'mpsclip_errors_total{kind="body_too_large"}' in c.get("/metrics").text


def test_body_limit_stops_reading_streams_and_bad_lengths() -> None:
    """ASGI-level (the test client reads a streamed body whole before the app sees it): a chunked body is read
    only until it passes the limit; an oversized or malformed Content-Length is refused before any byte."""
    import asyncio

    from mpsclip.serve.limits import BodyLimitMiddleware

    reached: list[bytes] = []

    async def app(scope, receive, send):
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(headers: list, chunks: list[bytes]) -> tuple[int, int]:
        sent, read = [], []

        async def receive():
            read.append(1)
            if len(read) > len(chunks):
                raise AssertionError("read past the end of the body")
            return {"type": "http.request", "body": chunks[len(read) - 1], "more_body": len(read) < len(chunks)}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/search", "headers": headers}
        asyncio.run(BodyLimitMiddleware(app, 4096)(scope, receive, send))
        return sent[0]["status"], len(read)

    assert call([], [b"x" * 1024] * 100) == (413, 5)  # stopped at the 5th KiB of 100
    assert call([(b"content-length", b"1000000000")], [b"x"]) == (413, 0)
    assert call([(b"content-length", b"12abc")], [b"x"]) == (400, 0)
    assert call([], [b"ab", b"cd", b""]) == (200, 3) and reached == [b"abcd"]  # one message for the app


@pytest.fixture(scope="module")
def tie_store(synth: Path, ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three scenes, each twice (``1a``..``3c``, then ``4a``..``6c``): equal embeddings, so exactly equal scores."""
    import shutil

    from mpsclip.archive.job import EmbedSettings, embed_archive

    images = tmp_path_factory.mktemp("ties")
    scenes = sorted((synth / "images").glob("*.png"))[:3]
    for n, (letter, scene) in enumerate(zip("abcabc", scenes + scenes, strict=True), start=1):
        shutil.copy(scene, images / f"{n}{letter}.png")
    out = images.parent / "ties-store"
    embed_archive(images, out, ckpt, settings=EmbedSettings(batch_size=6, shard_size=2, device="cpu"), progress=False)
    return out


@pytest.mark.parametrize("mode", ["fused", "global", "max-response"])
def test_equal_scores_in_store_order_as_search(tie_store: Path, mode: str) -> None:
    """One-hot query embeddings score each row by one of its numbers, exactly (a BLAS product of two equal rows
    may differ in the last bit, depending on where the rows sit): the duplicates tie exactly."""
    info = open_store(tie_store)
    with TestClient(create_app(Catalog([tie_store]))) as c:
        for axis in range(0, info.dim, 7):
            query = [0.0] * info.dim
            query[axis] = 1.0
            for k in (1, 2, 3, 5):
                got = c.post("/search", json={"embedding": query, "k": k, "mode": mode}).json()["hits"]
                want = search_store(info, torch.tensor([query]), k, mode)[0]
                assert [h["id"] for h in got] == [h.id for h in want], (axis, k)
                assert [h["score"] for h in got] == [h.score for h in want]
            hits = c.post("/search", json={"embedding": query, "k": 6, "mode": mode}).json()["hits"]
            ranked = [h["id"] for h in hits]
            for first, second in (("1a", "4a"), ("2b", "5b"), ("3c", "6c")):  # equal scores: earlier row first
                assert ranked.index(f"{first}.png") + 1 == ranked.index(f"{second}.png"), ranked


GROW = EmbedSettings(batch_size=3, shard_size=3, device="cpu")


@pytest.fixture()
def growing(synth: Path, ckpt: Path, tmp_path: Path) -> Path:
    """The six scenes' store with its first shard of two only, as a running (or killed) 'mpsclip embed' leaves it."""
    from kills import killed_after_shards

    out = tmp_path / "grow"
    with killed_after_shards(1):
        embed_archive(synth / "images", out, ckpt, settings=GROW, progress=False)
    return out


def test_reload_serves_finished_shards_and_keeps_the_last_good_version(
    growing: Path, synth: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mpsclip.archive import store_reader

    catalog = Catalog([growing], lambda info: load_search_model(info.manifest, None))
    model = catalog.get("grow").model
    with TestClient(create_app(catalog)) as c:
        def listed() -> dict:
            return c.get("/stores").json()["stores"][0]

        def reload() -> dict:
            return c.post("/admin/reload").json()["stores"]["grow"]

        assert (listed()["items"], listed()["complete"], listed()["shards"]) == (3, False, 1)
        assert reload() == {"items": 3, "reload": "unchanged"}
        half = growing / ".shard-00001.parquet.x1.tmp"  # what atomic_write leaves while writing the next shard
        half.write_bytes(b"PAR1 half a shard")
        assert reload() == {"items": 3, "reload": "unchanged"}
        half.unlink()
        broken = growing / "shard-00001.parquet"  # a shard file that is not whole: never served
        broken.write_bytes(b"PAR1 not a parquet file")
        with caplog.at_level("WARNING", logger="mpsclip.serve"):
            failed = reload()
        assert failed["items"] == 3 and failed["reload"].startswith("failed: MPSCLIPError")
        assert "shard-00001.parquet: cannot be read as a shard" in failed["reload"]  # the file named, no raw pyarrow
        assert listed()["reload"]["error"].startswith("MPSCLIPError") and listed()["reload"]["failed_at"]
        assert "reload failed, still serving" in caplog.text
        assert len(c.post("/search", json={"text": "a harbor", "k": 6}).json()["hits"]) == 3
        broken.unlink()
        assert reload() == {"items": 3, "reload": "unchanged"} and listed()["reload"]["error"] is None

        reads: list[int] = []
        read_shard = store_reader.read_shard
        counted = lambda info, s, *rest: reads.append(s) or read_shard(info, s, *rest)  # noqa: E731
        monkeypatch.setattr(store_reader, "read_shard", counted)
        embed_archive(synth / "images", growing, ckpt, settings=GROW, progress=False)  # the second run finishes it
        assert reload() == {"items": 6, "reload": "reloaded"} and reads == [1]  # shard 0 kept from memory
        assert (listed()["items"], listed()["complete"], listed()["shards"]) == (6, True, 2)
        assert catalog.get("grow").model is model  # same checkpoint: the model is not loaded again
        info = open_store(growing)
        want = search_store(info, encode_queries(model, ["a harbor"]), 6, "fused")[0]
        got = c.post("/search", json={"text": "a harbor", "k": 6}).json()["hits"]
        assert [h["id"] for h in got] == [h.id for h in want]


def test_reload_every_seconds_picks_up_a_second_embed_run(growing: Path, synth: Path, ckpt: Path) -> None:
    import time

    catalog = Catalog([growing], lambda info: load_search_model(info.manifest, None))
    with TestClient(create_app(catalog, reload_every_s=0.1)) as c:
        assert c.get("/stores").json()["stores"][0]["items"] == 3
        embed_archive(synth / "images", growing, ckpt, settings=GROW, progress=False)
        deadline = time.monotonic() + 30
        while c.get("/stores").json()["stores"][0]["items"] != 6:
            assert time.monotonic() < deadline, "the server did not notice the finished store"
            time.sleep(0.1)
        assert c.get("/stores").json()["stores"][0]["complete"] is True


def test_source_root_relocates_a_moved_store(store: Path, synth: Path, tmp_path: Path) -> None:
    import json
    import shutil

    moved = tmp_path / "copy" / "s"
    shutil.copytree(store, moved)
    shutil.copytree(synth / "images", tmp_path / "copy" / "images")
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**manifest, "source_root": str(tmp_path / "gone" / "images")}))
    first = Catalog([store]).get(None).ids[0]
    with TestClient(create_app(Catalog([moved]))) as c:
        lost = c.get(f"/items/s/{first}/thumbnail")
        assert lost.status_code == 404 and "--source-root" in lost.json()["detail"]
    with TestClient(create_app(Catalog([store]))) as c:
        want = c.get(f"/items/s/{first}/thumbnail").content
    catalog = Catalog([moved], source_roots=[tmp_path / "copy" / "images"])
    with TestClient(create_app(catalog)) as c:
        assert c.get(f"/items/s/{first}/thumbnail").content == want
        catalog.reload(force=True)  # a reloaded version keeps the relocation
        assert c.get(f"/items/s/{first}/thumbnail").content == want
    with pytest.raises(MPSCLIPError, match="one per STORE"):
        Catalog([moved, store], source_roots=[tmp_path])
    with pytest.raises(MPSCLIPError, match="--source-root .*: no such folder"):
        Catalog([moved], source_roots=[tmp_path / "nowhere"])


@pytest.mark.browser
def test_page_works_behind_the_api_key_in_chromium(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's chromium through Playwright: /?key= once, then the page's fetches and <img> thumbnails work."""
    import shutil
    import tempfile

    from extras import expect, require
    from mpsclip.bench.serve_fuzz import running

    executable = shutil.which("chromium")
    expect(executable is not None, "Debian's `chromium` is not installed (`make test` installs it with apt-get)")
    sync_api = require("playwright.sync_api", "the dev extra: pip install 'mpsclip[dev]'")
    monkeypatch.setenv("TMPDIR", tempfile.mkdtemp(prefix="mpsclip-pw-"))  # short: Chromium's socket paths
    catalog = Catalog([store], lambda info: load_search_model(info.manifest, None))
    with running(create_app(catalog, api_key=KEY)) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        locked_out = browser.new_page()
        locked_out.goto(base + "/")
        locked_out.wait_for_function("document.getElementById('message').textContent.includes('401')")
        assert "/?key=KEY" in locked_out.text_content("#message")
        page = browser.new_page()
        page.goto(f"{base}/?key={KEY}&q=a+harbor&k=3")
        page.wait_for_selector(".hit img")
        page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth)")
        assert "key" not in page.url and page.locator(".hit").count() == 3
        assert page.evaluate("document.cookie") == ""  # HttpOnly: the page's scripts never see the key
        page.locator(".hit").first.click()
        page.click("#more-like-this")  # a POST with the cookie, from the page's own origin
        page.wait_for_function("document.getElementById('message').textContent.includes('results like')")
        browser.close()
