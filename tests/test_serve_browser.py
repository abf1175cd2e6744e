"""The search page in a real headless Chromium (Debian's ``chromium``) driven by Playwright for Python.

The page is served from ``serve/static`` by a small app implementing the ``mpsclip serve`` JSON contract over a
fixed, georeferenced 16-item dataset. In CI (``CI=true``) a missing browser or Playwright fails the test with the
reason; locally it skips with it.
"""

import hashlib
import io
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

import pytest
from extras import expect, require

STATIC = Path(__file__).parents[1] / "serve" / "static"
README_SHOT = Path(__file__).parents[1] / "docs" / "serve-page.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BOUNDS = [10.0, 45.0, 10.4, 45.4]  # one scene, 4 x 4 tiles of 0.1 degree
XSS_ID = '<img src=x onerror="window.pwned=1">'


def _items() -> list[dict]:
    items = []
    for row in range(4):
        for col in range(4):
            w, n = BOUNDS[0] + 0.1 * col, BOUNDS[3] - 0.1 * row
            ring = [[w, n - 0.1], [w + 0.1, n - 0.1], [w + 0.1, n], [w, n], [w, n - 0.1]]
            name = XSS_ID if (row, col) == (3, 3) else f"tile_{row}_{col}"
            keywords = ["<b>harbour</b>"] if (row, col) == (3, 3) else [["forest", "harbour"][(row + col) % 2]]
            items.append({"id": name, "keywords": keywords, "footprint": {"type": "Polygon", "coordinates": [ring]}})
    return items


def _score(query: str, item_id: str) -> float:
    digest = hashlib.sha256(f"{query}|{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def _png(color: tuple[int, int, int], size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def contract_app():  # noqa: ANN201  (FastAPI is imported lazily)
    """A stand-in for ``mpsclip serve``'s app: the same JSON contract over :func:`_items`."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, Response

    items = {item["id"]: item for item in _items()}
    scene = {"index": 0, "name": "scene0", "bounds": BOUNDS, "quicklook_url": "/scenes/geo/0/quicklook"}
    stores = {
        "geo": {"name": "geo", "items": len(items), "model": {"family": "mpsclip", "arch": "MPS-Tiny"},
                "checkpoint_sha256": "0" * 64, "settings": {}, "georeferenced": True,
                "scenes": [scene]},
        "empty": {"name": "empty", "items": 0, "model": {"family": "mpsclip", "arch": "MPS-Tiny"},
                  "checkpoint_sha256": "0" * 64, "settings": {}, "georeferenced": False, "scenes": []},
    }
    app = FastAPI()

    def hit(rank: int, score: float, item: dict) -> dict:
        url = f"/items/geo/{quote(item['id'], safe='')}/thumbnail"
        return {"rank": rank, "score": score, "id": item["id"], "store": "geo", "keywords": item["keywords"],
                "footprint": item["footprint"], "thumbnail_url": url, "scene": "scene0"}

    def inside(item: dict, bbox: list[float] | None) -> bool:
        if bbox is None:
            return True
        ring = item["footprint"]["coordinates"][0]
        lons, lats = [p[0] for p in ring], [p[1] for p in ring]
        return min(lons) < bbox[2] and max(lons) > bbox[0] and min(lats) < bbox[3] and max(lats) > bbox[1]

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}")
    def static(name: str) -> FileResponse:
        if name not in {"app.js", "style.css", "index.html"}:
            raise HTTPException(404, "no such file")
        return FileResponse(STATIC / name)

    @app.get("/stores")
    def list_stores() -> dict:
        return {"stores": list(stores.values())}

    @app.post("/search")
    async def search(request: Request) -> dict:
        body = await request.json()
        k = body.get("k", 10)
        if not isinstance(k, int) or not 1 <= k <= 1000:
            raise HTTPException(422, f"k: must be an integer in 1..1000, got {k!r}")
        if body.get("store", "geo") not in stores:
            raise HTTPException(404, f"store: unknown store {body['store']!r}")
        if "item_id" in body and body["item_id"] not in items:
            raise HTTPException(404, f"item_id: unknown item {body['item_id']!r}")
        query = body.get("text") or f"like:{body.get('item_id')}"
        pool = [item for item in items.values() if inside(item, body.get("bbox"))]
        ranked = sorted(pool, key=lambda item: -_score(query, item["id"]))[:k]
        hits = [hit(rank, _score(query, item["id"]), item) for rank, item in enumerate(ranked, 1)]
        return {"store": "geo", "mode": body.get("mode", "fused"), "k": k,
                "took_ms": {"encode": 1.0, "score": 1.0, "total": 2.0}, "hits": hits}

    @app.get("/items/{store}/{item_id}/thumbnail")
    def thumbnail(store: str, item_id: str) -> Response:
        if item_id not in items:
            raise HTTPException(404, "unknown item")
        shade = int(_score("thumb", item_id) * 200) + 30
        return Response(_png((40, shade, 255 - shade), 64), media_type="image/png")

    @app.get("/items/{store}/{item_id}")
    def item(store: str, item_id: str) -> dict:
        if item_id not in items:
            raise HTTPException(404, f"id: unknown item {item_id!r}")
        found = items[item_id]
        meta = {"caption": f"<i>caption of</i> {item_id}"}
        return {**found, "store": store, "meta": meta, "thumbnail_url": hit(1, 0.0, found)["thumbnail_url"]}

    @app.get("/scenes/{store}/{index}/quicklook")
    def quicklook(store: str, index: int) -> Response:
        return Response(_png((70, 110, 80), 256), media_type="image/png")

    return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    require("fastapi")
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(contract_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "test server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def page(monkeypatch):  # noqa: ANN201
    executable = shutil.which("chromium")
    expect(executable is not None, "Debian's `chromium` is not installed (`make test` installs it with apt-get)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        expect(False, "the `playwright` Python package is not installed (it is in the dev extra)")
    # A per-test TMPDIR for Chromium's profile and sockets; short, because a unix socket path has ~108 bytes.
    browser_tmp = tempfile.mkdtemp(prefix="mpsclip-pw-")
    monkeypatch.setenv("TMPDIR", browser_tmp)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1200, "height": 800}, accept_downloads=True)
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda err: errors.append(str(err)))
        tab.set_default_timeout(10_000)
        yield tab
        browser.close()
    shutil.rmtree(browser_tmp, ignore_errors=True)
    assert not errors, f"JavaScript errors on the page: {errors}"


def _query(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlparse(url).query).items()}


def test_search_details_more_like_this_bbox_and_url_state(page, server_url, tmp_path):
    shots = tmp_path / "screenshots"
    page.goto(server_url + "/")
    page.wait_for_selector("#store option", state="attached")
    page.fill("#k", "16")
    page.fill("#query", "a harbour with boats")
    page.press("#query", "Enter")
    page.wait_for_selector(".hit")
    assert page.locator(".hit").count() == 16
    assert page.locator("#scenes polygon.footprint").count() == 16
    # Data is text, never markup: the hostile id and keyword show literally and nothing ran.
    assert page.locator(".hit .id", has_text=XSS_ID).count() == 1
    assert page.locator(".hit .keywords", has_text="<b>harbour</b>").count() == 1
    assert page.evaluate("window.pwned") is None
    page.screenshot(path=str(shots / "1-results.png"))

    first = page.locator(".hit .id").first.inner_text()
    page.locator(".hit").first.click()
    page.wait_for_selector("#details:not([hidden]) dd")
    assert page.locator("#details-id").inner_text() == first
    assert "caption of" in page.locator("#details-meta").inner_text()
    page.screenshot(path=str(shots / "2-details.png"))

    page.click("#more-like-this")
    page.wait_for_function("document.getElementById('message').textContent.includes('like')")
    assert page.locator(".hit").count() == 16

    box = page.locator("#scenes svg").bounding_box()  # drag over the scene's top-left quarter: 2 x 2 tiles
    page.mouse.move(box["x"] + box["width"] * 0.02, box["y"] + box["height"] * 0.02)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3, steps=5)
    page.mouse.move(box["x"] + box["width"] * 0.48, box["y"] + box["height"] * 0.48, steps=5)
    page.mouse.up()
    page.wait_for_function("document.querySelectorAll('.hit').length === 4")
    ids = sorted(page.locator(".hit .id").all_inner_texts())
    assert ids == ["tile_0_0", "tile_0_1", "tile_1_0", "tile_1_1"]
    west, south, east, north = map(float, _query(page.url)["bbox"].split(","))
    assert west == pytest.approx(10.008, abs=1e-3) and north == pytest.approx(45.392, abs=1e-3)
    assert east == pytest.approx(10.192, abs=1e-3) and south == pytest.approx(45.208, abs=1e-3)
    page.screenshot(path=str(shots / "3-bbox.png"))

    with page.expect_download() as download:
        page.click("#geojson")
    geojson = json.loads(Path(download.value.path()).read_text())
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) == 4
    assert geojson["features"][0]["geometry"]["coordinates"][0][0][0] == pytest.approx(10.0)  # lon first

    # The URL is shareable: reloading it restores the query, k, mode and bbox and runs the search again.
    page.select_option("#mode", "global")
    state = _query(page.url)
    assert state["q"] == "a harbour with boats" and state["mode"] == "global" and state["k"] == "16"
    page.goto(page.url)
    page.wait_for_function("document.querySelectorAll('.hit').length === 4")
    assert page.input_value("#query") == "a harbour with boats" and page.input_value("#mode") == "global"
    page.locator(".hit").first.click()
    page.wait_for_selector("#details:not([hidden]) dd")
    page.screenshot(path=str(shots / "4-reloaded.png"))
    page.screenshot(path=str(README_SHOT), type="png")  # README illustration, made by this test
    assert all((shots / f).stat().st_size > 0 for f in ("1-results.png", "2-details.png", "3-bbox.png"))


def test_errors_and_empty_store_are_explained(page, server_url):
    page.goto(server_url + "/?q=forest&k=5000")
    page.wait_for_selector("#message.error")
    assert "k: must be an integer" in page.locator("#message").inner_text()
    page.goto(server_url + "/?store=empty")
    page.wait_for_selector("#message.error")
    assert "empty" in page.locator("#message").inner_text()
