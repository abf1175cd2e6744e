"""One ``mpsclip bench`` run: load the checkpoints, check every engine, print the estimate, time, write."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mpsclip.bench.engines import (
    ROTATING_INPUTS,
    GridSettings,
    estimate_seconds,
    prepare,
    records_json,
    rows_json,
    run_grid,
)
from mpsclip.bench.report import SCHEMA, command_line, machine, write_all

from mpsclip.checkpoints import file_sha256
from mpsclip.devices import resolve_device
from mpsclip.factory import load_model


def model_name(checkpoint: Path, arch: str, taken: set[str]) -> str:
    name = arch if arch not in taken else f"{arch} ({checkpoint.stem})"
    taken.add(name)
    return name


def bench(checkpoints: list[Path], settings: GridSettings, out: Path, progress: bool = True,
          note: str | None = None) -> dict[str, Any]:
    """Measure ``settings``' grid for each checkpoint and write results.json, results.md and the plots to ``out``."""
    device = resolve_device(settings.device)
    info = machine(device)
    grids, models, taken = [], [], set()
    try:
        for checkpoint in checkpoints:
            model = load_model(checkpoint)
            arch = str(model.config_dict()["arch"])
            name = model_name(checkpoint, arch, taken)
            models.append({"name": name, "arch": arch, "family": model.family, "checkpoint": str(checkpoint),
                           "sha256": file_sha256(checkpoint)})
            print(f"bench: loading and checking engines for {name} ...", file=sys.stderr)
            grids.append(prepare(name, checkpoint, model, settings, device))
        for grid in grids:
            for r in grid.records:
                if r.status == "skipped":
                    print(f"bench: {grid.name}: {r.engine} {r.precision} skipped: {r.reason}", file=sys.stderr)
        cells = sum(len(g.cells) for g in grids)
        print(f"bench: {cells} cells, estimated {estimate_seconds(grids, settings):.0f} s of timing", file=sys.stderr)
        rows = run_grid(grids, settings, device, progress)
    finally:
        for grid in grids:
            grid.stack.close()
    result = {
        "schema": SCHEMA,
        "command": command_line(),
        "note": note,
        "machine": info,
        "settings": {**asdict(settings), "rotating_inputs": ROTATING_INPUTS},
        "models": models,
        "engines": [e for g in grids for e in records_json(g.records)],
        "rows": rows_json(rows),
    }
    for path in write_all(out, result):
        print(f"bench: wrote {path}", file=sys.stderr)
    return result
