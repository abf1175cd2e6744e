"""The towers on a real Triton Inference Server (PyTriton): tritonclient HTTP and gRPC answers equal the model's,
/search through Triton equals 'mpsclip search', dynamic batching merges requests, and 'mpsclip serve' stops cleanly.

One Triton server serves the module (each start costs 5-10 s here); the lifecycle test starts one more in a
subprocess.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from extras import expect, require
from fastapi.testclient import TestClient

from mpsclip.archive.search import encode_queries, load_search_model, search_store
from mpsclip.archive.store_reader import open_store

pytestmark = pytest.mark.triton

require("pytriton", "pip install 'mpsclip[serve]'")
http = require("tritonclient.http", "pip install 'mpsclip[serve]'")
grpc = require("tritonclient.grpc", "pip install 'mpsclip[serve]'")

from mpsclip.serve.app import create_app  # noqa: E402
from mpsclip.serve.catalog import Catalog  # noqa: E402
from mpsclip.serve.encoders import TritonEncoder  # noqa: E402
from mpsclip.serve.towers import TowerSet  # noqa: E402
from mpsclip.serve.triton import TritonSettings, TritonTowers, triton_availability  # noqa: E402

expect(triton_availability() is None, f"the bundled Triton server cannot run here: {triton_availability()}")

QUERIES = ["an airport", "a harbor with boats", "storage tanks"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def store(synth_store: Path) -> Path:
    return synth_store


@pytest.fixture(scope="module")
def catalog(store: Path) -> Catalog:
    return Catalog([store], lambda info: load_search_model(info.manifest, None))


@pytest.fixture(scope="module")
def towers(catalog: Catalog) -> TowerSet:
    return TowerSet().add(catalog)


@pytest.fixture(scope="module")
def triton(towers: TowerSet, tmp_path_factory: pytest.TempPathFactory):
    http_port, grpc_port, metrics_port = free_ports(3)
    workspace = tmp_path_factory.mktemp("pytriton") / "workspace"
    server = TritonTowers(towers.towers, TritonSettings(http_port, grpc_port, metrics_port, workspace=workspace))
    server.start()
    yield server
    server.stop()
    assert not any(listening(p) for p in (http_port, grpc_port, metrics_port))


def model_of(catalog: Catalog):
    return catalog.get(None).model


def images(synth: Path, n: int) -> list:
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted((synth / "images").glob("*.png"))[:n]]


def test_towers_answer_http_and_grpc_like_the_model(triton: TritonTowers, towers: TowerSet, catalog: Catalog,
                                                    synth: Path) -> None:
    model = model_of(catalog)
    tower = next(iter(towers.towers.values()))
    tokens = model.tokenize(QUERIES)
    pixels = tower.pixels(images(synth, 3))
    with torch.no_grad():
        want_text = model.encode_text(tokens).numpy()
        want_image = model.encode_image(pixels).numpy()
        none = torch.zeros(3, 1, dtype=torch.bool)
        want_views = model.perspectives(pixels, torch.zeros(3, 1, *pixels.shape[1:]), none).numpy()
    for client_module, url in ((http, triton.http_url), (grpc, triton.grpc_url)):
        client = client_module.InferenceServerClient(url)
        try:
            text_in = client_module.InferInput("tokens", list(tokens.shape), "INT64")
            text_in.set_data_from_numpy(tokens.numpy())
            got_text = client.infer("text_encoder", [text_in]).as_numpy("embedding")
            image_in = client_module.InferInput("pixels", list(pixels.shape), "FP32")
            image_in.set_data_from_numpy(pixels.numpy())
            result = client.infer("image_encoder", [image_in])
        finally:
            client.close()
        np.testing.assert_allclose(got_text, want_text, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("embedding"), want_image, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("perspectives"), want_views, atol=1e-5)


@pytest.mark.parametrize("mode", ["fused", "global", "max-response"])
def test_search_through_triton_equals_search_store(
    triton: TritonTowers, towers: TowerSet, catalog: Catalog, store: Path, synth: Path, mode: str
) -> None:
    info = open_store(store)
    want = search_store(info, encode_queries(model_of(catalog), QUERIES), 4, mode)
    encoder = TritonEncoder(towers, triton.grpc_url, triton.names)
    with TestClient(create_app(catalog, encoder=encoder)) as client:
        batch = client.post("/search/batch", json={"queries": [{"text": q, "k": 4, "mode": mode} for q in QUERIES]})
        for query, hits, in_batch in zip(QUERIES, want, batch.json()["results"], strict=True):
            got = client.post("/search", json={"text": query, "k": 4, "mode": mode}).json()
            assert [h["id"] for h in got["hits"]] == [h.id for h in hits]
            assert [h["score"] for h in got["hits"]] == pytest.approx([h.score for h in hits], abs=1e-3)
            assert [h["id"] for h in in_batch["hits"]] == [h["id"] for h in got["hits"]]
        first = sorted((synth / "images").glob("*.png"))[0]
        png = base64.b64encode(first.read_bytes()).decode()
        by_image = client.post("/search", json={"image": png, "k": 1, "mode": "global"}).json()
        assert by_image["hits"][0]["id"] == first.name


def test_dynamic_batching_merges_concurrent_requests(
    triton: TritonTowers, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the tower is busy, requests queue and Triton hands them over together. The tiny model answers in
    well under a millisecond on a quiet CPU, faster than 32 clients send, so each call is made to take 30 ms."""
    for bound in triton.bound.values():
        encode = bound.tower.encode_text
        monkeypatch.setattr(bound.tower, "encode_text", lambda t, encode=encode: time.sleep(0.03) or encode(t))
    tokens = model_of(catalog).tokenize([f"query number {i}" for i in range(64)]).numpy()
    before = len(triton.batch_sizes("text"))
    client = http.InferenceServerClient(triton.http_url, concurrency=32)
    try:
        pending = []
        for row in tokens:
            request = http.InferInput("tokens", [1, tokens.shape[1]], "INT64")
            request.set_data_from_numpy(row[None])
            pending.append(client.async_infer("text_encoder", [request]))
        got = np.concatenate([p.get_result().as_numpy("embedding") for p in pending])
    finally:
        client.close()
    sizes = triton.batch_sizes("text")[before:]
    assert sum(sizes) == 64 and max(sizes) > 1, sizes  # 64 single-row requests, merged into fewer calls
    with torch.no_grad():
        np.testing.assert_allclose(got, model_of(catalog).encode_text(torch.from_numpy(tokens)).numpy(), atol=1e-5)


def test_towers_run_an_exported_engine(
    catalog: Catalog, store: Path, ckpt: Path, tmp_path: Path
) -> None:
    require("onnxruntime", "pip install 'mpsclip[onnx]'")
    from mpsclip.export import export
    from mpsclip.serve.towers import load_tower

    from mpsclip.errors import MPSCLIPError

    onnx_dir = export(ckpt, "onnx", tmp_path / "onnx", min_batch=1, opt_batch=2, max_batch=4)
    towers = TowerSet("onnxruntime", onnx_dir, torch.device("cpu")).add(catalog)
    tower = next(iter(towers.towers.values()))
    assert tower.engine.kind == "onnxruntime"
    model = model_of(catalog)
    texts = [f"query {i}" for i in range(6)]
    with torch.no_grad():
        np.testing.assert_allclose(tower.encode_text(model.tokenize(texts)).numpy(),
                                   model.encode_text(model.tokenize(texts)).numpy(), atol=1e-4)
    capped = load_tower(model, tower.key, "torch", None, torch.device("cpu"))
    capped.engine.batch_sizes = (1, 4)  # as a TensorRT engine exported with --max-batch 4: 6 rows go in 2 calls
    np.testing.assert_allclose(capped.encode_text(model.tokenize(texts)).numpy(),
                               tower.encode_text(model.tokenize(texts)).numpy(), atol=1e-4)
    from mpsclip.serve.encoders import InProcessEncoder

    want = search_store(open_store(store), encode_queries(model, QUERIES), 4, "fused")
    with TestClient(create_app(catalog, encoder=InProcessEncoder(towers))) as client:
        for query, hits in zip(QUERIES, want, strict=True):
            got = client.post("/search", json={"text": query, "k": 4}).json()
            assert [h["id"] for h in got["hits"]] == [h.id for h in hits]
    with pytest.raises(MPSCLIPError, match="--engine-dir"):
        load_tower(model, tower.key, "aoti", None, torch.device("cpu"))
    with pytest.raises(MPSCLIPError, match="--engine must be one of"):
        load_tower(model, tower.key, "jax", None, torch.device("cpu"))
    with pytest.raises(MPSCLIPError, match="checkpoint"):  # an export of another checkpoint is refused
        load_tower(model, "0" * 64, "onnxruntime", onnx_dir, torch.device("cpu"))


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int], wait_s: float = 5.0) -> dict[int, str]:
    """The command lines of the ``pids`` still running after up to ``wait_s`` (helpers take a moment to exit)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = {}
        for pid in pids:
            try:
                left[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def test_serve_command_drains_and_stops_everything_on_sigint(
    store: Path, catalog: Catalog, synth: Path, tmp_path: Path
) -> None:
    api, *triton_ports = free_ports(4)
    home = tempfile.mkdtemp(prefix="pyt", dir="/tmp")  # short: PyTriton puts AF_UNIX sockets (108 bytes) below it
    env = {**os.environ, "PYTRITON_HOME": home}
    cmd = [sys.executable, "-m", "mpsclip", "serve", str(store), "--port", str(api), "--triton",
           "--triton-http-port", str(triton_ports[0]), "--triton-grpc-port", str(triton_ports[1]),
           "--triton-metrics-port", str(triton_ports[2])]
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while not listening(api):  # the API listens once the towers on Triton are ready
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        base = f"http://127.0.0.1:{api}"
        want = search_store(open_store(store), encode_queries(model_of(catalog), QUERIES[:1]), 4, "fused")[0]
        status, got = post(f"{base}/search", {"text": QUERIES[0], "k": 4})
        assert status == 200 and [h["id"] for h in got["hits"]] == [h.id for h in want]
        children = descendants(proc.pid)
        assert children, "tritonserver should run as a child process"

        png = base64.b64encode(sorted((synth / "images").glob("*.png"))[0].read_bytes()).decode()
        in_flight: dict[str, object] = {}

        def slow_request() -> None:  # 64 image queries, one after another on the server: busy past the signal
            in_flight["answer"] = post(f"{base}/search/batch", {"queries": [{"image": png, "k": 1}] * 64})
            in_flight["done"] = time.monotonic()

        worker = threading.Thread(target=slow_request)
        worker.start()
        time.sleep(0.3)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        worker.join(60)
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
        stopped_in = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)
    status, answer = in_flight["answer"]  # type: ignore[misc]
    assert status == 200 and len(answer["results"]) == 64
    assert in_flight["done"] > signalled  # the request was in flight when the signal came, and was answered
    assert stopped_in < 60
    assert not any(listening(p) for p in (api, *triton_ports))
    left = alive(children)
    assert not left, f"child processes left running: {left}"
    output = (tmp_path / "serve.log").read_text()
    assert f"http://127.0.0.1:{api}/docs" in output and f"127.0.0.1:{triton_ports[1]}" in output


def test_busy_api_port_fails_before_triton_starts() -> None:
    from mpsclip.serve.server import bind_socket

    from mpsclip.errors import MPSCLIPError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(MPSCLIPError, match="--port"):
            bind_socket("127.0.0.1", taken.getsockname()[1])
    sock = bind_socket("127.0.0.1", 0)
    try:  # asyncio sets TCP_NODELAY on accepted connections only when the listener says TCP
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
