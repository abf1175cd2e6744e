"""One ``mpsclip bench`` run: load the checkpoints, build exports, check and probe every engine, estimate, time,
write. The timing block of ``results.json`` holds the estimate printed before timing next to what it took."""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mpsclip.bench.builds import build_all
from mpsclip.bench.engines import ROTATING_INPUTS, GridSettings, ModelGrid, export_jobs, prepare, records_json
from mpsclip.bench.report import SCHEMA, command_line, load_average, machine, write_all
from mpsclip.bench.timing import estimate, estimate_message, run_grid

from mpsclip.checkpoints import file_sha256
from mpsclip.devices import resolve_device
from mpsclip.factory import load_model


def model_name(checkpoint: Path, arch: str, taken: set[str]) -> str:
    name = arch if arch not in taken else f"{arch} ({checkpoint.stem})"
    taken.add(name)
    return name


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def bench(checkpoints: list[Path], settings: GridSettings, out: Path, progress: bool = True,
          note: str | None = None) -> dict[str, Any]:
    """Measure ``settings``' grid for each checkpoint and write results.json, results.md and the plots to ``out``."""
    started = time.perf_counter()
    device = resolve_device(settings.device)
    info = machine(device)
    loaded, models, taken = [], [], set()
    for checkpoint in checkpoints:
        model = load_model(checkpoint)
        arch = str(model.config_dict()["arch"])
        name = model_name(checkpoint, arch, taken)
        sha = file_sha256(checkpoint)
        models.append({"name": name, "arch": arch, "family": model.family, "checkpoint": str(checkpoint),
                       "sha256": sha})
        loaded.append((name, checkpoint, model, sha))
    grids: list[ModelGrid] = []
    with tempfile.TemporaryDirectory(prefix="mpsclip-bench-") as tmp:
        jobs = export_jobs([(name, checkpoint) for name, checkpoint, _, _ in loaded], settings, device, Path(tmp))
        workers = settings.workers(len(jobs))
        if jobs:
            say(f"exporting {len(jobs)} towers on the fly in {workers} process(es) ...")
        export_start = time.perf_counter()
        seconds = build_all(jobs, workers)
        exports_s = time.perf_counter() - export_start
        exports = {job.key: (job.folder, seconds[job.key]) for job in jobs}
        for name, _, model, sha in loaded:
            say(f"loading, checking and probing engines for {name} ...")
            grids.append(prepare(name, model, sha, settings, device, exports))
        for grid in grids:
            for r in grid.records:
                if r.status == "skipped":
                    say(f"{grid.name}: {r.engine} {r.precision} skipped: {r.reason}")
        cells = [c for g in grids for c in g.cells]
        prepared_s = time.perf_counter() - started
        expected = estimate(cells, settings.timing)
        say(f"{len(cells)} cells; preparing took {prepared_s:.0f} s; {estimate_message(expected, settings.timing)} "
            f"(whole run about {prepared_s + expected.total_s:.0f} s)")
        timing_start = time.perf_counter()
        rows = run_grid(cells, settings.timing, device, progress)
        timing_s = time.perf_counter() - timing_start
    result = {
        "schema": SCHEMA,
        "command": command_line(),
        "note": note,
        "machine": {**info, "load_average_end": load_average()},
        "settings": {**asdict(settings), "rotating_inputs": ROTATING_INPUTS, "build_workers": workers},
        "timing": {"exports_s": round(exports_s, 3), "prepare_s": round(prepared_s, 3),  # ms: a tiny run takes < 0.1 s
                   "estimated_timing_s": round(expected.total_s, 3), "timing_s": round(timing_s, 3),
                   "total_s": round(time.perf_counter() - started, 3)},
        "models": models,
        "engines": [e for g in grids for e in records_json(g.records)],
        "rows": [asdict(r) for r in rows],
    }
    for path in write_all(out, result):
        say(f"wrote {path}")
    return result
