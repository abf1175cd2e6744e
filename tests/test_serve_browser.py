"""The search page in a real headless Chromium (Debian's ``chromium``, driven by Playwright for Python) against
the real ``mpsclip serve --no-triton`` (a subprocess) on a tiny georeferenced store built here.

Under ``make test`` / CI a missing browser or Playwright fails the test with the reason; elsewhere it skips.
Screenshots go to the test's tmp folder (``screenshots/``); ``MPSCLIP_README_SHOT=1`` also copies the last one
to ``docs/serve-page.png``, the README's illustration.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from extras import expect, require

pytestmark = [pytest.mark.browser, pytest.mark.slow]

require("rasterio")
require("fastapi")

import georef  # noqa: E402

from mpsclip.archive.items import TileSettings  # noqa: E402
from mpsclip.archive.job import EmbedSettings, embed_archive  # noqa: E402
from mpsclip.archive.search import encode_queries, load_search_model, search_store  # noqa: E402
from mpsclip.archive.store_reader import open_store  # noqa: E402

README_SHOT = Path(__file__).parents[1] / "docs" / "serve-page.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
QUERY = "a harbour with a pier"
START_TIMEOUT_S = 180  # importing torch and loading the model on a loaded 2-core CI machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def geo_store(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two scenes of :mod:`georef` cut into 32 px tiles (15 items) and embedded with the tiny model."""
    root = georef.two_scenes(tmp_path_factory.mktemp("scenes") / "src")
    store = tmp_path_factory.mktemp("stores") / "geo"
    settings = EmbedSettings(tiles=TileSettings(32, 32), batch_size=8, device="cpu")
    embed_archive(root, store, ckpt, settings=settings, progress=False)
    return store


@pytest.fixture(scope="module")
def server_url(geo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mpsclip serve STORE --no-triton`` (towers in the server's process) in a subprocess on a free loopback
    port; stopped with SIGTERM afterwards, which must end it with status 0 and free the port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "MPSCLIP_API_KEY"}
    command = [sys.executable, "-m", "mpsclip", "serve", str(geo_store), "--port", str(port), "--device", "cpu",
               "--no-triton"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"mpsclip serve exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"mpsclip serve not ready in {START_TIMEOUT_S} s:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"mpsclip serve did not stop within 30 s of SIGTERM:\n{log.read_text()}") from None
    assert code == 0, f"mpsclip serve ended with {code} after SIGTERM:\n{log.read_text()}"
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "something still listens on the server's port"


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201  (a Playwright Page)
    executable = shutil.which("chromium")
    expect(executable is not None, "Debian's `chromium` is not installed (`make test` installs it with apt-get)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        expect(False, "the `playwright` Python package is not installed (it is in the dev extra)")
    # Each run its own TMPDIR for Chromium's profile and sockets; short, because a unix socket path has ~108 bytes.
    browser_tmp = tempfile.mkdtemp(prefix="mpsclip-pw-")
    monkeypatch.setenv("TMPDIR", browser_tmp)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            tab = context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda err: errors.append(str(err)))
            tab.set_default_timeout(20_000)
            yield tab
            browser.close()
    finally:
        shutil.rmtree(browser_tmp, ignore_errors=True)
    assert not errors, f"JavaScript errors on the page: {errors}"


def url_state(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlparse(url).query).items()}


def shown(page) -> list[tuple[str, float]]:  # noqa: ANN001
    """(id, score) of each result card, in order (the score as the page prints it, 4 decimals)."""
    ids = page.locator(".hit .id").all_inner_texts()
    scores = [float(text.split("·")[1]) for text in page.locator(".hit .score").all_inner_texts()]
    return list(zip(ids, scores, strict=True))


def assert_same_hits(page, hits: list[dict]) -> None:  # noqa: ANN001
    got = shown(page)
    assert [item_id for item_id, _ in got] == [h["id"] for h in hits]
    assert [score for _, score in got] == pytest.approx([h["score"] for h in hits], abs=6e-5)


def wait_for_search(page, text: str) -> None:  # noqa: ANN001
    """Wait until the status line reports a finished search mentioning ``text``."""
    page.wait_for_function(
        "t => { const m = document.getElementById('message').textContent; return m.includes(t) && "
        "(m.includes(' results ') || m.startsWith('No results') || m.startsWith('Search failed')); }",
        arg=text,
    )


def intersects(footprint: dict, bbox: list[float]) -> bool:
    ring = footprint["coordinates"][0]
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    return min(lons) <= bbox[2] and bbox[0] <= max(lons) and min(lats) <= bbox[3] and bbox[1] <= max(lats)


def drag(page, selector: str, start: tuple[float, float], end: tuple[float, float]) -> None:  # noqa: ANN001
    """Press at ``start`` and release at ``end``, given as fractions of the element's box."""
    target = page.locator(selector)
    target.scroll_into_view_if_needed()
    box = target.bounding_box()

    def at(fraction: tuple[float, float]) -> tuple[float, float]:
        return box["x"] + box["width"] * fraction[0], box["y"] + box["height"] * fraction[1]

    page.mouse.move(*at(start))
    page.mouse.down()
    page.mouse.move(*at(((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)), steps=4)
    page.mouse.move(*at(end), steps=4)
    page.mouse.up()


def test_search_more_like_this_bbox_geojson_and_reload(page, server_url: str, geo_store: Path, tmp_path: Path):  # noqa: ANN001
    import shapely.geometry

    shots = tmp_path / "screenshots"
    stores = json.load(urllib.request.urlopen(server_url + "/stores", timeout=30))["stores"]
    (store,) = stores
    scenes = {scene["name"]: scene for scene in store["scenes"]}
    assert set(scenes) == {"harbour.tif", f"{georef.HOSTILE}.tif"}

    page.goto(server_url + "/")
    page.wait_for_selector(".scene img")  # before any search: every scene's quicklook
    assert page.locator(".scene").count() == 2
    # Names are text, never markup: the hostile scene name shows literally and nothing ran.
    assert page.locator(".scene .name", has_text=f"{georef.HOSTILE}.tif").count() == 1
    assert page.locator("img[src='x']").count() == 0
    page.fill("#k", "8")
    page.fill("#query", QUERY)
    page.press("#query", "Enter")
    wait_for_search(page, QUERY)
    api = post(server_url + "/search", {"text": QUERY, "k": 8, "mode": "fused"})["hits"]
    assert len(api) == 8
    assert_same_hits(page, api)  # the page shows the API's top-k...
    info = open_store(geo_store)  # ...which is 'mpsclip search' on the store
    want = search_store(info, encode_queries(load_search_model(info.manifest, None), [QUERY]), 8, "fused")[0]
    assert [h["id"] for h in api] == [h.id for h in want]
    assert [h["score"] for h in api] == pytest.approx([h.score for h in want], abs=1e-3)
    assert page.locator("#scenes polygon.footprint").count() == 8
    assert page.evaluate("window.pwned") is None
    page.screenshot(path=str(shots / "1-results.png"), full_page=True)

    first = api[0]["id"]
    page.locator(".hit").first.click()
    page.wait_for_selector("#details:not([hidden]) dd")
    assert page.locator("#details-id").inner_text() == first
    assert "geotiff-window" in page.locator("#details-meta").inner_text()
    assert page.locator("polygon.footprint.selected").count() == 1
    page.screenshot(path=str(shots / "2-details.png"), full_page=True)

    page.click("#more-like-this")
    wait_for_search(page, f"like {first}")
    assert_same_hits(page, post(server_url + "/search", {"item_id": first, "k": 8, "mode": "fused"})["hits"])
    assert url_state(page.url)["like"] == first and "q" not in url_state(page.url)
    assert page.input_value("#query") == f"like: {first}"  # the box says what is searched, not the old text

    # A box over the harbour scene's west half: the search runs again, limited to tiles touching the box.
    harbour = scenes["harbour.tif"]
    drag(page, f".scene[data-scene='{harbour['index']}'] svg", (0.05, 0.1), (0.45, 0.9))
    page.wait_for_function("new URLSearchParams(location.search).has('bbox')")
    wait_for_search(page, "inside the box")
    bbox = [float(v) for v in url_state(page.url)["bbox"].split(",")]
    west, south, east, north = harbour["bounds"]
    width, height = east - west, north - south
    assert bbox == pytest.approx([west + 0.05 * width, north - 0.9 * height, west + 0.45 * width,
                                  north - 0.1 * height], abs=0.01 * width)
    boxed = post(server_url + "/search", {"item_id": first, "k": 8, "mode": "fused", "bbox": bbox})["hits"]
    assert_same_hits(page, boxed)
    assert boxed and all(intersects(hit["footprint"], bbox) for hit in boxed)
    assert len(boxed) < 8 and all(hit["scene"] == "harbour.tif" for hit in boxed)
    page.screenshot(path=str(shots / "3-bbox.png"), full_page=True)

    with page.expect_download() as download:
        page.click("#geojson")
    geojson = json.loads(Path(download.value.path()).read_text())
    assert geojson["type"] == "FeatureCollection" and [f["id"] for f in geojson["features"]] == [h["id"] for h in boxed]
    for feature, hit in zip(geojson["features"], boxed, strict=True):
        assert feature["type"] == "Feature" and feature["properties"]["rank"] == hit["rank"]
        shape = shapely.geometry.shape(feature["geometry"])
        assert shape.geom_type == "Polygon" and shape.is_valid and shape.exterior.is_ccw  # RFC 7946 right-hand rule
        lon, lat = feature["geometry"]["coordinates"][0][0]
        assert 14.9 < lon < 15.1 and 45.1 < lat < 45.2  # longitude first
        assert intersects(feature["geometry"], bbox)

    # The URL is shareable: reloading it restores mode, k, bbox and the "more like this" search.
    before = shown(page)
    page.goto(page.url)
    wait_for_search(page, "inside the box")
    assert shown(page) == before and page.input_value("#k") == "8" and page.input_value("#query") == f"like: {first}"
    assert page.locator(".scene rect.bbox").count() == 1
    page.locator(".hit").first.click()
    page.wait_for_selector("#details:not([hidden]) dd")
    page.wait_for_function("[...document.querySelectorAll('img')].every(i => i.complete)")
    page.screenshot(path=str(shots / "4-reloaded.png"), full_page=True)
    assert all((shots / f"{n}").stat().st_size > 10_000 for n in ("1-results.png", "3-bbox.png", "4-reloaded.png"))
    if os.environ.get("MPSCLIP_README_SHOT") == "1":
        shutil.copyfile(shots / "4-reloaded.png", README_SHOT)


def test_image_query_by_file(page, server_url: str, tmp_path: Path) -> None:  # noqa: ANN001
    """A chosen image file searches by image: the page shows what POST /search answers for the same bytes."""
    import base64

    from PIL import Image

    path = tmp_path / "pier.png"
    Image.open(urllib.request.urlopen(server_url + "/scenes/geo/1/quicklook", timeout=30)).convert("RGB").crop(
        (16, 32, 80, 64)).save(path)
    page.goto(server_url + "/?k=5")
    page.wait_for_selector(".scene img")
    page.set_input_files("#file", str(path))
    wait_for_search(page, "by image pier.png")
    image = base64.b64encode(path.read_bytes()).decode()
    assert_same_hits(page, post(server_url + "/search", {"image": image, "k": 5, "mode": "fused"})["hits"])


def test_errors_are_explained(page, server_url: str) -> None:  # noqa: ANN001
    page.goto(server_url + "/?q=forest&k=5000")
    page.wait_for_selector("#message.error")
    assert "k: Input should be less than or equal to 1000" in page.locator("#message").inner_text()
    page.goto(server_url + "/?store=nope")
    page.wait_for_selector("#message.error")
    assert "“nope” is not served here (served: geo)" in page.locator("#message").inner_text()
    page.goto(server_url + "/?like=no-such-tile")
    page.wait_for_selector("#message.error")
    assert "item_id: no item 'no-such-tile' in store 'geo'" in page.locator("#message").inner_text()
    page.goto(server_url + "/?q=forest&bbox=0,0,1,1")  # far from every scene
    wait_for_search(page, "forest")
    assert "No results for “forest” inside the box: clear the box" in page.locator("#message").inner_text()
    page.click("#bbox-clear")  # the same search without the box: the page's default k
    page.wait_for_function("document.querySelectorAll('.hit').length === 10")
    assert "bbox" not in url_state(page.url) and "10 results for “forest”" in page.locator("#message").inner_text()


def test_date_range_filters_and_is_kept_in_the_url(page, server_url: str) -> None:  # noqa: ANN001
    """The page's date range goes into POST /search as ``datetime`` (dates: whole UTC days); these tiles carry no
    date, so a range leaves none of them, and clearing it brings the hits back."""
    page.goto(server_url + "/?q=forest&from=2030-01-01&cloud=20")
    wait_for_search(page, "forest")
    assert page.input_value("#date-from") == "2030-01-01" and page.input_value("#max-cloud") == "20"
    message = page.locator("#message").inner_text()
    assert "No results for “forest” in the date range with at most 20% cloud: widen or clear the dates" in message
    assert url_state(page.url)["from"] == "2030-01-01"
    page.fill("#max-cloud", "")
    page.fill("#date-from", "")
    page.wait_for_function("document.querySelectorAll('.hit').length === 10")
    assert "from" not in url_state(page.url) and "10 results for “forest”" in page.locator("#message").inner_text()


NARROW = 420  # CSS pixels: a phone held upright


def page_width(page) -> int:  # noqa: ANN001
    """The page's width in CSS pixels, sideways overflow included."""
    return page.evaluate("document.documentElement.scrollWidth")


def test_narrow_window_and_the_search_box_during_more_like_this(page, server_url: str) -> None:  # noqa: ANN001
    """At 420 px wide nothing overflows sideways, through results, details (the hostile scene's long ids) and
    "more like this"; the search box then shows "like: <id>", which submitted again gives the same hits, and
    typed text searches the text again."""
    page.set_viewport_size({"width": NARROW, "height": 900})
    page.goto(server_url + "/?k=6")
    page.wait_for_selector(".scene img")
    assert page_width(page) <= NARROW
    page.fill("#query", QUERY)
    page.press("#query", "Enter")
    wait_for_search(page, QUERY)
    assert page_width(page) <= NARROW
    hostile = page.locator(".hit", has_text=georef.HOSTILE).first  # an id without a space, 50 characters long
    item = hostile.locator(".id").inner_text()
    hostile.click()
    page.wait_for_selector("#details:not([hidden]) dd")
    assert page.locator("#details-id").inner_text() == item and page_width(page) <= NARROW
    page.click("#more-like-this")
    wait_for_search(page, f"like {item}")
    assert page.input_value("#query") == f"like: {item}" and page_width(page) <= NARROW
    liked = post(server_url + "/search", {"item_id": item, "k": 6, "mode": "fused"})["hits"]
    assert_same_hits(page, liked)
    page.evaluate("document.getElementById('results').replaceChildren()")
    page.press("#query", "Enter")  # the box's "like: <id>" submitted: the same search again
    page.wait_for_function("document.querySelectorAll('.hit').length === 6")
    assert_same_hits(page, liked)
    assert url_state(page.url)["like"] == item
    page.fill("#query", "a forest")
    page.press("#query", "Enter")
    wait_for_search(page, "“a forest”")
    state = url_state(page.url)
    assert state["q"] == "a forest" and "like" not in state and page_width(page) <= NARROW
