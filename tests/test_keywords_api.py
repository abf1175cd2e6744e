import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mpsclip.keywords.api import ApiBackend, ApiConfig


class FakeEndpoint(BaseHTTPRequestHandler):
    """Chat-completions fake; the caption picks the behaviour: "flaky" fails with 500 once, "garbage" always
    answers prose, "down" always fails with 503, anything else answers its words as a JSON list."""

    requests: list[str] = []
    failed_once: set[str] = set()

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        caption = body["messages"][0]["content"].rsplit("Caption: ", 1)[1]
        FakeEndpoint.requests.append(caption)
        if caption == "down" or (caption == "flaky" and caption not in FakeEndpoint.failed_once):
            FakeEndpoint.failed_once.add(caption)
            self.send_error(503 if caption == "down" else 500)
            return
        content = "no idea" if caption == "garbage" else json.dumps(caption.split())
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def endpoint() -> Iterator[str]:
    FakeEndpoint.requests = []
    FakeEndpoint.failed_once = set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def make_backend(url: str, cache: Path) -> ApiBackend:
    config = ApiConfig.from_options(url, "fake-model", "secret", cache, concurrency=3)
    config = ApiConfig(**{**vars(config), "retries": 2, "backoff_s": 0.0})
    return ApiBackend(config, progress=False, sleep=lambda _: None)


def test_retry_cache_and_failures(endpoint: str, tmp_path: Path) -> None:
    captions = ["a pond", "flaky road", "flaky", "garbage", "down", "a pond"]
    outcomes = make_backend(endpoint, tmp_path / "cache").extract(captions)
    assert outcomes[0].nouns == ["a", "pond"] and outcomes[5].nouns == ["a", "pond"]
    assert outcomes[2].nouns == ["flaky"]
    assert "no JSON list" in (outcomes[3].error or "")
    assert "HTTP 503" in (outcomes[4].error or "")
    assert FakeEndpoint.requests.count("flaky") == 2  # 500, then OK
    assert FakeEndpoint.requests.count("garbage") == 2  # one re-prompt
    assert FakeEndpoint.requests.count("down") == 3  # first try + 2 retries
    assert FakeEndpoint.requests.count("a pond") == 1  # duplicates are asked once

    FakeEndpoint.requests = []
    second = make_backend(endpoint, tmp_path / "cache")
    again = second.extract(["a pond", "flaky road", "flaky"])
    assert [o.nouns for o in again] == [["a", "pond"], ["flaky", "road"], ["flaky"]]
    assert FakeEndpoint.requests == [] and second.requests_made == 0 and second.cache_hits == 3


def test_cli_api_writes_failure_report(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpsclip.cli import main

    monkeypatch.setenv("MPSCLIP_API_URL", endpoint)
    monkeypatch.setenv("MPSCLIP_API_MODEL", "fake-model")
    source = tmp_path / "captions.txt"
    source.write_text("a pond\ngarbage\n")
    output = tmp_path / "out.json"
    assert main(["keywords", str(source), "-o", str(output), "--backend", "api", "--quiet"]) == 0
    assert json.loads(output.read_text()) == [{"caption": "a pond", "nouns": ["a", "pond"]}, {"caption": "garbage"}]
    report = json.loads((tmp_path / "out.json.failures.json").read_text())
    assert [(item["index"], item["caption"]) for item in report] == [(1, "garbage")]
    assert len(list((tmp_path / "out.json.cache").glob("*.json"))) == 1


def test_api_config_needs_url_and_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpsclip.errors import MPSCLIPError

    monkeypatch.delenv("MPSCLIP_API_URL", raising=False)
    monkeypatch.delenv("MPSCLIP_API_MODEL", raising=False)
    with pytest.raises(MPSCLIPError, match="--api-url"):
        ApiConfig.from_options(None, "m", None, tmp_path)
    with pytest.raises(MPSCLIPError, match="--api-model"):
        ApiConfig.from_options("http://x", None, None, tmp_path)
    assert ApiConfig.from_options("http://x/v1/", "m", None, tmp_path).url == "http://x/v1/chat/completions"
