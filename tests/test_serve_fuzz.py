"""Property-based fuzzing of the search API (schemathesis over the OpenAPI schema + hand-made malformed requests)
against a real uvicorn server: no request gets a 5xx and the worker survives. A short seeded run; the longer one
is ``python -m mpsclip.bench.serve_fuzz`` (bench/results/serve-fuzz.json)."""

from __future__ import annotations

from pathlib import Path

import pytest
from extras import require


@pytest.mark.slow
def test_fuzzed_requests_get_no_server_error(synth_store: Path) -> None:
    require("schemathesis", "the dev extra: pip install 'mpsclip[dev]'")
    from mpsclip.bench.serve_fuzz import fuzz_store

    result = fuzz_store(synth_store, examples=12, seed=0)
    print(f"fuzzing: {result['requests']} requests, {result['server_errors']} server errors, {result['statuses']}")
    assert result["server_errors"] == 0, result["first_server_errors"]
    assert result["worker_alive"]
    assert result["requests"] >= 200 and len(result["statuses"]) >= 4  # 200, 404, 413/422 ... all seen
    sources = set(result["by_source"])
    for route in ["POST /search", "POST /search/batch", "POST /search/upload", "GET /items/{store}/{item_id}"]:
        assert f"schemathesis positive {route}" in sources
    assert {"malformed POST /search", "malformed POST /search/upload", "malformed GET /items/..."} <= sources
