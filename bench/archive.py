"""``mpsclip bench archive``: archive embedding throughput next to the image tower's own, in one run.

* ``model alone``: the image tower as the embedder runs it (the fast runtime on a GPU) on one resident batch
  of ``batch``, after warm-up calls: the ceiling the pipeline is measured against;
* ``pipeline``: for each perspectives × decode × workers setting, the whole
  :class:`~mpsclip.archive.embedder.Embedder` path (reading in ``workers`` processes, decoding with PIL there
  or on the device, towers, fp16 rows and Parquet shards) of SOURCE into a fresh temporary store, after one
  warm-up shard (compilation, CUDA graph capture and worker start-up are not timed). Zero-shot perspectives
  use threshold 0, so every item gets its top-k keywords' sub-images: the path's full cost.

Each engine of :func:`engine_choices` (``--engine``, ``--engine-dir``, ``--precision``, as ``mpsclip embed`` takes
them: torch at one or more precisions, or several export folders, an int8 and an fp32 one say) gets its own
model-alone row and pipeline rows; the engines take turns at each setting, and ``vs first engine`` sets each
row against the first engine's row of the same setting (on a shared machine, compare these ratios).

``synthetic`` writes that many JPEG tiles (smooth colour fields with texture, so they compress like aerial
imagery) instead of reading SOURCE. Results: ``results.json`` (schema :data:`SCHEMA`), ``results.md`` and
``throughput.png`` in the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpsclip.bench.report import command_line, load_average, machine, save_png
from PIL import Image

from mpsclip.archive.embedder import Embedder, EmbedSettings
from mpsclip.archive.job import LocalExecutor, list_items, open_job, run_job
from mpsclip.archive.perspectives import ZeroShotSettings
from mpsclip.checkpoints import file_sha256
from mpsclip.devices import resolve_device
from mpsclip.engines.manifest import read_export
from mpsclip.errors import MPSCLIPError
from mpsclip.factory import load_model
from mpsclip.io import atomic_write

SCHEMA = "mpsclip-bench-archive/1"


@dataclass(frozen=True)
class ArchiveSettings:
    checkpoint: Path
    source: str | None = None
    synthetic: int | None = None
    tile: int = 256
    batch: int = 64
    shard_size: int = 1024
    workers: tuple[int, ...] = (0, 2)
    decode: tuple[str, ...] | None = None
    """None: ``cpu``, and ``device`` too on a GPU."""
    perspectives: tuple[str, ...] = ("none", "zero-shot")
    model_repeats: int = 20
    device: str = "auto"
    engine: str = "torch"
    engine_dirs: tuple[Path, ...] = ()
    """Export folders of ``engine`` (not torch), each measured at the precision its manifest says."""
    precisions: tuple[str, ...] | None = None
    """The precisions to measure (None: the engine's own, or each folder's)."""


def engine_choices(settings: ArchiveSettings) -> list[tuple[Path | None, str | None]]:
    """The (export folder, precision) of each engine to measure, in order; a precision None is the engine's own.

    torch takes no folder and runs at each precision; an exported engine runs each folder, or, with
    ``precisions``, the folder exported at each of them."""
    if settings.engine == "torch":
        if settings.engine_dirs:
            raise MPSCLIPError("--engine-dir is only used with --engine onnxruntime or tensorrt; drop it")
        return [(None, p) for p in settings.precisions or (None,)]
    if not settings.engine_dirs:
        raise MPSCLIPError(f"--engine {settings.engine} needs --engine-dir DIR (repeat it for several), folders "
                           "written by mpsclip export")
    own = {folder: read_export(folder, settings.engine).precision for folder in settings.engine_dirs}
    if settings.precisions is None:
        return [(folder, precision) for folder, precision in own.items()]
    chosen = []
    for precision in settings.precisions:
        folders = [folder for folder, p in own.items() if p == precision]
        if not folders:
            have = ", ".join(f"{folder} ({p})" for folder, p in own.items())
            raise MPSCLIPError(f"--precision {precision}: no --engine-dir was exported in {precision} (given: {have}); "
                               f"export one with mpsclip export --precision {precision}")
        chosen += [(folder, precision) for folder in folders]
    return chosen


def _write_tile(args: tuple[Path, int, int]) -> None:
    path, size, seed = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    texture = rng.normal(0, 12, (size, size, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + texture, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_tiles(folder: Path, count: int, size: int, workers: int) -> None:
    """``count`` seeded synthetic JPEG tiles of ``size`` px in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"tile-{i:07d}.jpg", size, i) for i in range(count)]
    with Pool(workers) as pool:
        pool.map(_write_tile, jobs, chunksize=64)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def model_rate(embedder: Embedder, batch: int, repeats: int) -> float:
    """Images per second of the image tower alone on one resident batch (after warm-up calls)."""
    size = embedder.model.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(embedder.device)
    for _ in range(3):
        embedder.encode(images)
    _synchronize(embedder.device)
    start = time.perf_counter()
    for _ in range(repeats):
        embedder.encode(images)
    _synchronize(embedder.device)
    return batch * repeats / (time.perf_counter() - start)


def pipeline_rate(embedder: Embedder, source: Path, store: Path, checkpoint: Path, progress: bool
                  ) -> dict[str, float]:
    """Items per second of the whole embedding path into a fresh store, after a warm-up shard."""
    items = list_items(source, embedder.settings)
    embedder.embed(items[: embedder.settings.shard_size])  # warm-up: compile, graph capture, worker start-up
    _synchronize(embedder.device)
    start = time.perf_counter()
    job = open_job(source, store, checkpoint, None, embedder.settings, embedder.decode, items)
    summary = run_job(job, LocalExecutor(checkpoint, None, embedder.settings, embedder), progress=progress)
    seconds = time.perf_counter() - start
    return {"items": summary.n_embedded, "failed": summary.n_failed, "seconds": round(seconds, 3),
            "items_per_s": round(len(items) / seconds, 1)}


def decoders(settings: ArchiveSettings, device: torch.device) -> tuple[str, ...]:
    return settings.decode or (("cpu", "device") if device.type == "cuda" else ("cpu",))


def measure(settings: ArchiveSettings, source: Path, work: Path, progress: bool) -> tuple[list[dict], dict]:
    """One model-alone row per engine, then per perspectives × decode × workers one pipeline row per engine (the
    engines take turns); the resolved settings."""
    device = resolve_device(settings.device)
    base = EmbedSettings(batch_size=settings.batch, shard_size=settings.shard_size, device=str(device),
                         engine=settings.engine)
    sha = file_sha256(settings.checkpoint)
    model = load_model(settings.checkpoint)
    engines = []
    for folder, precision in engine_choices(settings):
        chosen = dataclasses.replace(base, engine_dir=folder, precision=precision)
        engines.append((chosen, Embedder(model, chosen, sha)))
    rows: list[dict[str, Any]] = []
    for _, alone in engines:
        rows.append({"what": f"model alone (image tower), {_engine_name(alone)}", **_engine_columns(alone),
                     "perspectives": None, "decode": None, "workers": None,
                     "items_per_s": round(model_rate(alone, settings.batch, settings.model_repeats), 1)})
    for perspectives in settings.perspectives:
        for decode in decoders(settings, device):
            for workers in settings.workers:
                for chosen, alone in engines:
                    setting = dataclasses.replace(chosen, perspectives=perspectives, decode=decode, workers=workers,
                                                  zero_shot=ZeroShotSettings(threshold=0.0))
                    print(f"bench archive: {_engine_name(alone)} perspectives={perspectives} decode={decode} "
                          f"workers={workers} ...", file=sys.stderr, flush=True)
                    embedder = Embedder(alone.model, setting, sha)
                    store = work / f"store-{len(rows)}"
                    result = pipeline_rate(embedder, source, store, settings.checkpoint, progress)
                    rows.append({"what": f"pipeline, perspectives={perspectives}, decode={decode}, workers={workers}, "
                                 f"{_engine_name(alone)}", **_engine_columns(alone), "perspectives": perspectives,
                                 "decode": decode, "workers": workers, **result})
    _ratios(rows)
    first = engines[0][1]
    resolved = {"dtype": first.precision.precision, "runtime": first.engine.kind,
                "engines": [_engine_name(alone) for _, alone in engines],
                "items": len(list_items(source, base)), "arch": str(model.config_dict()["arch"])}
    return rows, resolved


def _engine_name(embedder: Embedder) -> str:
    return f"{embedder.engine.kind} {embedder.engine.precision}"


def _engine_columns(embedder: Embedder) -> dict[str, Any]:
    folder = embedder.settings.engine_dir
    return {"engine": embedder.engine.kind, "precision": embedder.engine.precision,
            "engine_dir": str(folder) if folder is not None else None}


def _ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_model_alone``: over the same engine's model-alone row; ``vs_first_engine``: over the first engine's
    row of the same setting."""
    def setting(row: dict[str, Any]) -> tuple:
        return row["perspectives"], row["decode"], row["workers"]

    alone = {(r["engine"], r["precision"], r["engine_dir"]): r["items_per_s"] for r in rows if r["workers"] is None}
    first: dict[tuple, float] = {}
    for row in rows:
        first.setdefault(setting(row), row["items_per_s"])
        row["vs_model_alone"] = round(row["items_per_s"] / alone[(row["engine"], row["precision"],
                                                                  row["engine_dir"])], 3)
        row["vs_first_engine"] = round(row["items_per_s"] / first[setting(row)], 3)


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)"
    source = f"{s['synthetic']} synthetic {s['tile']}-px JPEG tiles" if s["synthetic"] else f"`{s['source']}`"
    lines = [
        "# mpsclip bench archive",
        "",
        f"Made by: `{result['command']}`",
        "",
        f"Machine: {where}; load average {m['load_average']} at the start; torch {m['torch']}. Source: {source} "
        f"({s['items']} items); model {result['model']['arch']} (`{result['model']['checkpoint']}`), "
        f"on {m['device']}, engines: {', '.join(s['engines'])}; batch {s['batch']}, shards of {s['shard_size']}. "
        "Pipeline rows embed the whole source into a fresh store after one warm-up shard; `vs model alone` is "
        "the row's items/s over the same engine's image tower on a resident batch; `vs first engine` is the row's "
        "items/s over the first engine's in the same setting (the engines take turns).",
        *(["", result["note"]] if result.get("note") else []),
        "",
        "| what | items/s | seconds | vs model alone | vs first engine |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else ""
        lines.append(f"| {r['what']} | {r['items_per_s']:,.1f} | {seconds} | {r['vs_model_alone']:.2f}x | "
                     f"{r['vs_first_engine']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(out: Path, result: dict[str, Any]) -> Path:
    """throughput.png: items/s of each row as horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ax.barh([r["what"] for r in rows][::-1], [r["items_per_s"] for r in rows][::-1],
            color=["tab:gray" if r["workers"] is None else "tab:blue" for r in rows][::-1])
    ax.set_xlabel("items / s")
    ax.set_title(f"archive embedding, {result['model']['arch']}, batch {result['settings']['batch']}")
    ax.grid(True, axis="x", alpha=0.3)
    path = save_png(fig, out / "throughput.png")
    plt.close(fig)
    return path


def bench_archive(settings: ArchiveSettings, out: Path, progress: bool = True, note: str | None = None
                 ) -> dict[str, Any]:
    """Measure and write ``out``/results.json, results.md and throughput.png."""
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="mpsclip-bench-archive-") as tmp:
        work = Path(tmp)
        if settings.synthetic is not None:
            source = work / "tiles"
            write_tiles(source, settings.synthetic, settings.tile, max(1, os.cpu_count() or 1))
        else:
            source = Path(str(settings.source))
        rows, resolved = measure(settings, source, work, progress)
    result = {
        "schema": SCHEMA,
        "command": command_line(),
        "note": note,
        "machine": {**machine(resolve_device(settings.device)), "load_average": load_start},
        "settings": {**dataclasses.asdict(settings), **resolved},
        "model": {"arch": resolved["arch"], "checkpoint": str(settings.checkpoint),
                  "sha256": file_sha256(settings.checkpoint)},
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write(out / "results.md", markdown(result))
    plot(out, result)
    print(markdown(result), end="")
    return result
