"""Property-based fuzzing of the search API against a real uvicorn server on 127.0.0.1: no request gets a 5xx.

Two sources of requests, both seeded Hypothesis strategies:

- schemathesis: every operation of the app's OpenAPI schema, with schema-valid (positive) and schema-violating
  (negative) parameters and bodies;
- hand-made malformed requests: broken or truncated JSON, wrong JSON types in every field, huge and negative k,
  NaN/inf numbers, bad base64, non-image bytes, images of odd modes and a decompression bomb, bad bboxes, huge
  batches, unknown stores and item ids (with slashes, dots, percent escapes), uploads of random bytes.

Every request carries the server's API key (so requests reach the routes behind it). The worker must survive:
after the run ``/healthz`` answers and a text query is encoded and scored. Writes ``serve-fuzz.json`` (with the
command that made it) under ``--out``; exits 1 if any request got a 5xx or the worker died.

example:
  python -m mpsclip.bench.serve_fuzz --out bench/results --examples 400
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import platform
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch

from mpsclip.choices import MODES
from mpsclip.io import atomic_write

API_KEY = "fuzz-key"
FUZZ_MODES = [*MODES, "best", ""]  # the API's modes and two it refuses
STORES = ["s", "other", "", "..", "s/..", "%2e%2e"]
NO_ANSWER = 0  # the status recorded when the server did not answer (a dead or hung worker)


def failed(status: int) -> bool:
    """A server error: a 5xx, or no answer at all."""
    return status >= 500 or status == NO_ANSWER


@dataclass
class Tally:
    """What the fuzzed requests got back."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_source: Counter[str] = field(default_factory=Counter)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    not_negatable: list[str] = field(default_factory=list)

    def send(self, source: str, method: str, path: str, call: Callable[[], Any]) -> None:
        """Make one request with ``call()`` and record its status; no answer at all counts as status 0."""
        import requests

        try:
            response = call()
        except (requests.ConnectionError, requests.Timeout) as err:
            return self.record(source, method, path, NO_ANSWER, f"{type(err).__name__}: {err}")
        self.record(source, method, path, response.status_code, response.text)

    def record(self, source: str, method: str, path: str, status: int, body: str) -> None:
        self.requests += 1
        self.statuses[status] += 1
        self.by_source[source] += 1
        if failed(status) and len(self.server_errors) < 20:
            self.server_errors.append({"source": source, "method": method, "path": path, "status": status,
                                       "body": body[:300]})


@contextmanager
def running(app: Any) -> Iterator[str]:
    """``app`` under uvicorn in a thread on a free loopback port: yields its base URL, stops it afterwards."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=server.run, name="fuzzed-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fuzzed server did not start within 60 s")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def run_examples(strategy: Any, examples: int, seed: int, send: Callable[[Any], None]) -> None:
    """``send`` each of ``examples`` values drawn from ``strategy`` (seeded; no shrinking: nothing raises)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as with_seed

    @with_seed(seed)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def each(value: Any) -> None:
        send(value)

    each()


def fuzz_schema(base: str, session: Any, tally: Tally, examples: int, seed: int) -> None:
    """schemathesis cases of every operation, positive and negative, ``examples`` of each."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(session.get(f"{base}/openapi.json").json())
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            source = f"schemathesis {mode.value} {operation.method.upper()} {operation.path}"

            def send(case: Any, source: str = source) -> None:
                call = lambda: case.call(base_url=base, session=session, timeout=60)  # noqa: E731
                tally.send(source, case.method, case.formatted_path, call)

            try:
                run_examples(operation.as_strategy(generation_mode=mode), examples, seed, send)
            except Unsatisfiable:  # nothing to get wrong: an operation with no parameters and no body
                tally.not_negatable.append(f"{operation.method.upper()} {operation.path}")


def can_write(fmt: str, mode: str) -> bool:
    """Whether this Pillow writes ``mode`` images as ``fmt``."""
    from PIL import Image

    try:
        Image.new(mode, (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError):
        return False
    return True


def image_bytes() -> Any:
    """Hypothesis strategy: encoded images of odd modes and sizes, random bytes, and truncated images."""
    from hypothesis import strategies as st
    from PIL import Image

    def encode(mode: str, width: int, height: int, fmt: str, cut: int) -> bytes:
        buffer = io.BytesIO()
        Image.new(mode, (width, height)).save(buffer, format=fmt)
        data = buffer.getvalue()
        return data[: len(data) - cut] if cut < len(data) else data

    modes = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
    writable = [(fmt, mode) for fmt in ("PNG", "TIFF", "JPEG") for mode in modes if can_write(fmt, mode)]
    images = st.sampled_from(writable).flatmap(
        lambda fm: st.builds(encode, st.just(fm[1]), st.integers(1, 48), st.integers(1, 48), st.just(fm[0]),
                             st.sampled_from([0, 0, 0, 1, 10, 100]))
    )
    headers = st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"GIF89a", b"BM"])
    return st.one_of(images, st.binary(max_size=200), st.builds(lambda h, b: h + b, headers, st.binary(max_size=100)))


def request_strategy(ids: list[str], dim: int, bomb: bytes, png: bytes) -> Any:
    """Hypothesis strategy of ``(method, path, requests kwargs)`` for malformed and odd requests."""
    from hypothesis import strategies as st

    blobs = {"bomb": bomb, "png": png}  # drawn by name: Hypothesis would print the bytes in its reprs
    named_image = st.sampled_from(sorted(blobs)).map(blobs.__getitem__)

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                               | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)
    b64 = st.one_of((image_bytes() | named_image).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=60),
                    st.sampled_from(["not base64!", "QUJD=", "===="]))
    floats = st.floats(allow_nan=True, allow_infinity=True)
    query = st.fixed_dictionaries({}, optional={
        "text": st.text(max_size=1200) | json_values,
        "image": b64 | json_values,
        "item_id": st.sampled_from(ids) | st.text(max_size=30) | json_values,
        "embedding": st.lists(floats, min_size=dim, max_size=dim) | st.lists(floats, max_size=dim + 2) | json_values,
        "k": st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, 1000, 1001]) | json_values,
        "mode": st.sampled_from(FUZZ_MODES) | json_values,
        "bbox": st.lists(floats, max_size=6) | st.lists(st.text(max_size=5), max_size=4) | json_values,
        "store": st.sampled_from(STORES) | st.text(max_size=20) | json_values,
    })
    as_json = query.map(lambda q: json.dumps(q, allow_nan=True))
    broken_json = st.one_of(
        st.binary(max_size=300), st.text(max_size=200).map(str.encode),
        st.tuples(as_json, st.integers(0, 50)).map(lambda t: t[0][: max(0, len(t[0]) - t[1] - 1)].encode()),
    )
    segment = st.sampled_from(ids + STORES) | st.text(max_size=30)
    json_type = {"content-type": "application/json"}
    return st.one_of(
        st.tuples(st.just("POST"), st.just("/search"), query.map(lambda q: {"data": json.dumps(q, allow_nan=True),
                                                                            "headers": json_type})),
        st.tuples(st.just("POST"), st.just("/search"), broken_json.map(lambda b: {"data": b, "headers": json_type})),
        st.tuples(st.just("POST"), st.just("/search/batch"),
                  (st.lists(query, max_size=70).map(lambda qs: {"queries": qs}) | json_values).map(
                      lambda v: {"data": json.dumps(v, allow_nan=True), "headers": json_type})
                  | broken_json.map(lambda b: {"data": b, "headers": json_type})),
        st.tuples(st.just("POST"), st.just("/search/upload"), st.builds(
            lambda data, form: {"files": {"file": ("q.bin", data)}, "data": form},
            image_bytes() | named_image,
            st.fixed_dictionaries({}, optional={"k": st.text(max_size=8), "mode": st.sampled_from(FUZZ_MODES),
                                                "bbox": st.text(max_size=30), "store": st.sampled_from(STORES)}))),
        st.tuples(st.just("POST"), st.just("/search/upload"), broken_json.map(lambda b: {"data": b})),
        st.tuples(st.just("GET"), st.builds(lambda s, i: f"/items/{quote(s, safe='')}/{quote(i, safe='/')}",
                                            segment, segment), st.just({})),
        st.tuples(st.just("GET"), st.builds(lambda s, i: f"/items/{quote(s, safe='')}/{quote(i, safe='/')}/thumbnail",
                                            segment, segment), st.just({})),
        st.tuples(st.just("GET"), st.builds(lambda s, n: f"/scenes/{quote(s, safe='')}/{quote(n, safe='')}/quicklook",
                                            segment, st.text(max_size=6) | st.integers().map(str)), st.just({})),
    )


def fuzz_malformed(base: str, session: Any, tally: Tally, examples: int, seed: int, store: Any) -> None:
    """``examples`` hand-made malformed requests (see :func:`request_strategy`)."""
    from PIL import Image

    from mpsclip.archive.items import item_from_meta
    from mpsclip.archive.readers import open_item

    bomb, png = io.BytesIO(), io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 Mpx in about 20 kB
    open_item(item_from_meta(store.ids[0], store.metas[0], store.info.manifest)).save(png, format="PNG")
    strategy = request_strategy(store.ids, store.info.dim, bomb.getvalue(), png.getvalue())

    def send(request: tuple[str, str, dict[str, Any]]) -> None:
        method, path, kwargs = request
        route = path if path.startswith("/search") else "/" + path.split("/")[1] + "/..."
        tally.send(f"malformed {method} {route}", method, path,
                   lambda: session.request(method, base + path, timeout=60, **kwargs))

    run_examples(strategy, examples, seed, send)


def worker_alive(base: str, session: Any) -> bool:
    """The server still answers health checks and still encodes and scores a text query."""
    health = session.get(f"{base}/healthz", timeout=30)
    search = session.post(f"{base}/search", json={"text": "a harbour", "k": 3}, timeout=60)
    return health.status_code == 200 and search.status_code == 200 and len(search.json()["hits"]) > 0


def fuzz_store(store: Path, examples: int, seed: int = 0) -> dict[str, Any]:
    """Fuzz ``mpsclip serve`` (in-process towers, API key set) over ``store``: ``examples`` per schemathesis
    operation and mode, and ``examples`` × 8 malformed requests; the counts and any server errors."""
    import requests
    from mpsclip.serve.app import create_app
    from mpsclip.serve.catalog import Catalog

    from mpsclip.archive.search import load_search_model

    catalog = Catalog([store], lambda info: load_search_model(info.manifest, None, torch.device("cpu")))
    app = create_app(catalog, api_key=API_KEY, cors=["https://maps.example.org"])
    tally = Tally()
    start = time.perf_counter()
    with running(app) as base, requests.Session() as session:
        session.headers["X-API-Key"] = API_KEY
        fuzz_schema(base, session, tally, examples, seed)
        fuzz_malformed(base, session, tally, 8 * examples, seed, catalog.get(None))
        alive = worker_alive(base, session)
    return {
        "requests": tally.requests, "server_errors": sum(n for s, n in tally.statuses.items() if failed(s)),
        "worker_alive": alive, "seconds": round(time.perf_counter() - start, 1),
        "statuses": {str(s): n for s, n in sorted(tally.statuses.items())},
        "by_source": dict(sorted(tally.by_source.items())), "first_server_errors": tally.server_errors,
        "no_negative_cases": tally.not_negatable,
    }


def demo_store(work: Path) -> Path:
    """Twelve seeded synthetic scenes with sub-image perspectives, embedded with a random-weight MPS-Tiny."""
    from mpsclip.archive.job import EmbedSettings, embed_archive
    from mpsclip.data.synth import generate
    from mpsclip.model import MPSCLIP

    generate(work / "synth", n_train=0, n_test=12, seed=0, image_size=64, workers=1)
    torch.manual_seed(0)
    checkpoint = MPSCLIP("MPS-Tiny").eval().save(work / "ckpt" / "random")
    settings = EmbedSettings(perspectives="from-dir", sub_root=work / "synth" / "subimages", batch_size=12,
                             shard_size=5, device="cpu")
    embed_archive(work / "synth" / "images", work / "s", checkpoint, settings=settings, progress=False)
    return work / "s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for serve-fuzz.json")
    parser.add_argument("--examples", type=int, default=400,
                        help="examples per schemathesis operation and mode; 8x as many malformed requests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # one line per malformed multipart header
    with tempfile.TemporaryDirectory(prefix="mpsclip-fuzz-") as work:
        result = fuzz_store(demo_store(Path(work)), args.examples, args.seed)
    record = {
        "made_by": "python -m mpsclip.bench.serve_fuzz " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "seed": args.seed, "examples": args.examples, **result,
    }
    atomic_write(args.out / "serve-fuzz.json", json.dumps(record, indent=2) + "\n")
    print(f"{record['requests']} requests, {record['server_errors']} server errors, worker alive: "
          f"{record['worker_alive']} ({record['seconds']} s) -> {args.out / 'serve-fuzz.json'}")
    return 0 if record["server_errors"] == 0 and record["worker_alive"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
