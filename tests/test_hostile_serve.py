"""What a hostile web page or client cannot make 'mpsclip serve' do (issue 21), against live servers.

The real ``mpsclip serve --no-triton`` in a subprocess (its stderr captured): foreign Host headers get 400, a
cross-site POST to /admin/reload gets 403 without any API key while the server's own page and non-browser clients
pass, a client that disconnects mid-body is one INFO line and no ERROR, error bodies name files relative to the
store. The app under uvicorn in this process (so that a render or a decode can be watched): eight concurrent cold
quicklooks render once; /healthz answers while an upload is being decoded. And the start-up rules: Triton refused
when numpy breaks nvidia-pytriton's declared pin, readiness only from a real answer of the towers.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from extras import require

require("rasterio")
require("fastapi")
uvicorn = require("uvicorn")

import georef  # noqa: E402
from mpsclip.serve import quicklook, routes_search  # noqa: E402
from mpsclip.serve.app import create_app  # noqa: E402
from mpsclip.serve.catalog import Catalog  # noqa: E402
from mpsclip.serve.guard import allowed_hosts, host_name  # noqa: E402
from PIL import Image  # noqa: E402

from mpsclip.archive.items import TileSettings  # noqa: E402
from mpsclip.archive.job import EmbedSettings, embed_archive  # noqa: E402
from mpsclip.archive.search import load_search_model  # noqa: E402

START_TIMEOUT_S = 180  # importing torch and loading the model on a loaded 2-core CI machine
FOREIGN = "http://evil.example"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
            ) -> tuple[int, bytes]:
    """One HTTP request with exactly these headers (http.client sends ``Host`` only when not given)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = dict(headers or {})
        connection.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for name, value in {**headers, "Content-Length": str(len(body or b""))}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def geo(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, source folder): the two scenes of :mod:`georef` and a third, ``gone.tif``, removed after embedding."""
    root = georef.two_scenes(tmp_path_factory.mktemp("hostile") / "src")
    georef.harbour(root / "gone.tif")
    store = root.parent / "geo"
    embed_archive(root, store, ckpt, settings=EmbedSettings(tiles=TileSettings(32, 32), batch_size=8, device="cpu"),
                  progress=False)
    (root / "gone.tif").unlink()
    return store, root


@pytest.fixture(scope="module")
def live(geo: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """``mpsclip serve STORE --no-triton --allowed-host search.example.org`` on a free port: (port, its log)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "MPSCLIP_API_KEY"}
    command = [sys.executable, "-m", "mpsclip", "serve", str(geo[0]), "--port", str(port), "--device", "cpu",
               "--no-triton", "--reload-every", "0", "--allowed-host", "search.example.org"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"mpsclip serve exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"mpsclip serve not ready in {START_TIMEOUT_S} s:\n{log.read_text()}"
            with contextlib.suppress(OSError):
                if request(port, "GET", "/readyz")[0] == 200:
                    break
            time.sleep(0.5)
        assert "serving geo" in log.read_text()  # said once the start-up query was answered
        yield port, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_host_names(live: tuple[int, Path]) -> None:
    port, _ = live
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST.", "search.example.org"]:
        assert request(port, "GET", "/stores", {"Host": host})[0] == 200, host
    for host in [f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example", f"10.1.2.3:{port}"]:
        status, body = request(port, "GET", "/stores", {"Host": host})
        assert status == 400 and "--allowed-host" in json.loads(body)["detail"], (host, body)
    assert request(port, "GET", "/healthz", {"Host": "evil.example"})[0] == 400  # a rebound name learns nothing
    assert host_name("[::1]:8000") == "::1" and host_name("Example.ORG.:80") == "example.org"
    assert host_name("::1") == "::1"
    wide = allowed_hosts("0.0.0.0", ["a.example"])
    assert {"127.0.0.1", "localhost", "::1", "a.example", socket.gethostname().lower()} <= wide


def test_cross_site_state_changes_are_refused_without_an_api_key(live: tuple[int, Path]) -> None:
    port, _ = live
    own = f"http://127.0.0.1:{port}"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for headers in [{"Origin": FOREIGN, **form}, {"Origin": "null"}, {"Origin": f"http://localhost:{port}"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}]:
        status, body = request(port, "POST", "/admin/reload", headers, b"x=1")
        assert status == 403 and "refused" in json.loads(body)["detail"], (headers, body)
    for headers in [{}, {"Origin": own}, {"Origin": own, "Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},
                    {"Origin": f"https://127.0.0.1:{port}"}]:  # its own page through a TLS proxy
        assert request(port, "POST", "/admin/reload", headers)[0] == 200, headers
    search = json.dumps({"text": "a harbour", "k": 1}).encode()  # a read: harmless from any page
    status, body = request(port, "POST", "/search", {"Origin": FOREIGN, "Content-Type": "application/json"}, search)
    assert status == 200 and len(json.loads(body)["hits"]) == 1


def test_a_client_gone_mid_body_is_one_info_line(live: tuple[int, Path]) -> None:
    port, log = live
    for path, kind in [("/search", "application/json"), ("/search/upload", "multipart/form-data; boundary=XX")]:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {kind}\r\n"
                         "Content-Length: 100000\r\n\r\n".encode() + b"x" * 1000)
            time.sleep(0.3)
    deadline = time.monotonic() + 30
    while log.read_text().count("the client went away") < 2:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    text = log.read_text()
    assert request(port, "GET", "/healthz")[0] == 200
    lines = [line for line in text.splitlines() if "the client went away" in line]
    assert len(lines) == 2 and all(line.startswith("INFO:") and "1000 of 100000" in line for line in lines), lines
    assert "ERROR" not in text and "Traceback" not in text, text


def test_error_bodies_name_no_absolute_path(live: tuple[int, Path], geo: tuple[Path, Path]) -> None:
    port, _ = live
    store, root = geo
    secret = str(root.parent)  # the folder holding the store and its sources: never in an answer
    status, body = request(port, "GET", "/stores")
    scenes = {s["name"]: s for s in json.loads(body)["stores"][0]["scenes"]}
    gone = scenes["gone.tif"]
    assert status == 200 and gone["quicklook_url"] is None and "gone.tif" in gone["error"]
    bodies = [body]
    status, body = request(port, "GET", f"/scenes/geo/{gone['index']}/quicklook")
    assert status == 404 and "gone.tif" in json.loads(body)["detail"]
    bodies.append(body)
    tile = _tile_of(port, "gone.tif")
    status, body = request(port, "GET", f"/items/geo/{tile}/thumbnail")
    assert status == 404 and tile in json.loads(body)["detail"]
    bodies.append(body)
    manifest = store / "manifest.json"
    good = manifest.read_bytes()
    try:
        manifest.write_text("{")  # a broken store: the reload fails and says why
        status, body = request(port, "POST", "/admin/reload")
        assert status == 200 and json.loads(body)["stores"]["geo"]["reload"].startswith("failed")
        bodies += [body, request(port, "GET", "/stores")[1]]
    finally:
        manifest.write_bytes(good)
        assert request(port, "POST", "/admin/reload")[0] == 200
    for answer in bodies:
        assert secret not in answer.decode() and "/tmp/" not in answer.decode(), answer


def _tile_of(port: int, scene: str) -> str:
    """The id of a tile of ``scene``, found by searching with a text query over every item."""
    _, body = request(port, "POST", "/search", {"Content-Type": "application/json"},
                      json.dumps({"text": "a harbour", "k": 1000}).encode())
    return next(hit["id"] for hit in json.loads(body)["hits"] if hit["scene"] == scene)


@contextlib.contextmanager
def in_process(app: object) -> Iterator[int]:
    """``app`` under uvicorn on a free loopback port, in a thread of this process; yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def test_concurrent_cold_quicklooks_render_once(geo: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each render takes a second here, so the eight requests all arrive while the first one renders."""
    renders: list[str] = []
    real = quicklook.render

    def slow(scene: quicklook.Scene) -> bytes:
        renders.append(scene.name)
        time.sleep(1.0)
        return real(scene)

    monkeypatch.setattr(quicklook, "render", slow)
    monkeypatch.setattr(quicklook, "CACHE", quicklook.RenderCache(size=2))
    with in_process(create_app(Catalog([geo[0]]))) as port:
        scenes = json.loads(request(port, "GET", "/stores")[1])["stores"][0]["scenes"]
        url = next(s["quicklook_url"] for s in scenes if s["name"] == "harbour.tif")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: request(port, "GET", url), range(8)))
        assert [status for status, _ in answers] == [200] * 8
        assert len({png for _, png in answers}) == 1 and renders == ["harbour.tif"]
        assert request(port, "GET", url) == answers[0] and len(renders) == 1  # from memory now
        other = next(s["quicklook_url"] for s in scenes if s["name"] == f"{georef.HOSTILE}.tif")
        assert request(port, "GET", other)[0] == 200 and len(renders) == 2


def test_healthz_answers_while_an_upload_is_decoded(geo: tuple[Path, Path], synth: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode is held until /healthz has answered: on the event loop it would block /healthz (and time out)."""
    decoding, release = threading.Event(), threading.Event()
    real = routes_search.decode_image

    def held(data: bytes, field: str) -> Image.Image:
        decoding.set()
        release.wait(60)
        return real(data, field)

    monkeypatch.setattr(routes_search, "decode_image", held)
    catalog = Catalog([geo[0]], lambda info: load_search_model(info.manifest, None))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(buffer, "PNG")
    body = (b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + buffer.getvalue() + b"\r\n--XX--\r\n")
    with in_process(create_app(catalog)) as port, ThreadPoolExecutor(1) as pool:
        upload = pool.submit(request, port, "POST", "/search/upload",
                             {"Content-Type": "multipart/form-data; boundary=XX"}, body)
        assert decoding.wait(60), "the upload never reached the decoder"
        try:
            assert request(port, "GET", "/healthz") == (200, b'{"status":"ok"}')
            assert not upload.done()  # answered while the decode was still in progress
        finally:
            release.set()
        status, answer = upload.result(60)
        assert status == 200 and json.loads(answer)["hits"], answer


def test_triton_is_refused_when_numpy_breaks_pytriton(synth_store: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    require("pytriton", "pip install 'mpsclip[serve]'")
    from mpsclip.serve import server, triton

    from mpsclip.cli import main

    # The rule itself: this environment (make venv / CI: pip install of the extras) must satisfy PyTriton's pin,
    # and numpy 2 (what geopandas>=1.2 or pandas>=3.1 installed later bring) must be named as breaking it.
    assert triton.numpy_conflict() is None, "this environment's numpy breaks nvidia-pytriton: see numpy_conflict"
    reason = triton.numpy_conflict("2.4.6")
    assert reason is not None and "numpy 2.4.6 is installed" in reason and "nvidia-pytriton 0." in reason
    assert "numpy<2" in reason
    monkeypatch.setattr(triton, "numpy_conflict", lambda installed=None: reason)
    started: list = []
    monkeypatch.setattr(server, "serve", lambda catalog, towers, settings, make_app: started.append(settings) or 0)
    argv = ["serve", str(synth_store), "--device", "cpu", "--port", str(free_port())]
    assert main(argv) == 0 and started[-1].triton is False  # by default: the towers in-process, and why
    assert "running the towers in-process (--no-triton): nvidia-pytriton" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(triton, "numpy_conflict", lambda installed=None: reason)
    assert main([*argv, "--triton"]) != 0  # asked for: refused, naming the versions, before anything listens
    assert "cannot start Triton: nvidia-pytriton" in capsys.readouterr().err


class WrongTowers:
    """An encoder whose towers answer zeros, as PyTriton with numpy 2 answered nothing."""

    depth = 0

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def encode(self, store: object, kind: str, query: object) -> torch.Tensor:
        return torch.zeros(store.info.dim)  # type: ignore[attr-defined]


def test_readiness_comes_from_a_real_answer(synth_store: Path) -> None:
    from fastapi.testclient import TestClient
    from mpsclip.serve.server import ServerSettings, serve
    from mpsclip.serve.towers import TowerSet

    catalog = Catalog([synth_store], lambda info: load_search_model(info.manifest, None))
    with TestClient(create_app(catalog, encoder=WrongTowers())) as client:
        answer = client.get("/readyz")
        assert answer.status_code == 503 and "norm 0, expected 1" in answer.json()["reason"]
        assert "numpy" in answer.json()["reason"]  # the installed versions are named
    with TestClient(create_app(catalog)) as client:
        assert client.get("/readyz").json() == {"ready": True}
    out = io.StringIO()
    settings = ServerSettings(port=free_port(), triton=False)
    code = serve(catalog, TowerSet(), settings, lambda _: create_app(catalog, encoder=WrongTowers()), out=out)
    assert code == 1 and "not serving: the towers did not answer a test query" in out.getvalue()
    assert "serving s;" not in out.getvalue()

