"""python -m mpsclip.bench.serve with tiny bounds: the output schema, files naming their command, clean stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from extras import require
from mpsclip.bench.serve import SCHEMA, main

require("aiohttp", "pip install 'mpsclip[bench]'")
require("matplotlib", "pip install 'mpsclip[bench]'")


@pytest.mark.slow
def test_bench_serve_writes_schema_and_files(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path), "--configs", "no-triton", "--concurrency", "1,2", "--requests", "4",
            "--seconds", "5", "--images", "4"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "serve-load.json").read_text())
    assert result["schema"] == SCHEMA
    assert result["command"] == "python -m mpsclip.bench.serve " + " ".join(argv)
    assert {"cpu", "cores", "load_average", "load_average_end"} <= set(result["machine"])
    cells = {(r["config"], r["kind"], r["concurrency"]) for r in result["rows"]}
    assert cells == {("no-triton", kind, c) for kind in ("text", "image") for c in (1, 2)}
    for row in result["rows"]:
        assert row["requests"] == 4 and row["ok"] == 4 and row["error_rate"] == 0
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] and row["requests_per_s"] > 0
        # one query a request: a tower call merges at most `concurrency` of them, and holds exactly one when alone
        assert 1 <= row["rows_per_tower_call"] <= row["concurrency"]
        assert row["concurrency"] > 1 or row["rows_per_tower_call"] == 1
    assert [(s["config"], s["exit_code"]) for s in result["servers"]] == [("no-triton", 0)]
    assert result["servers"][0]["start_s"] > 0 and result["servers"][0]["stop_s"] > 0
    assert result["acceptance"]["met"] is None  # needs both Triton configurations
    md = (tmp_path / "serve-load.md").read_text()
    assert f"`{result['command']}`" in md and "| no-triton | text | 2 | 4 |" in md
    assert (tmp_path / "serve-load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
