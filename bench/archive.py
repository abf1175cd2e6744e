"""``mpsclip bench archive``: archive embedding throughput next to the image tower's own, in one run.

* ``model alone``: the image tower as the embedder runs it (the fast runtime on a GPU) on one resident batch
  of ``batch``, after warm-up calls: the ceiling the pipeline is measured against;
* ``pipeline``: for each perspectives × decode × workers setting, the whole
  :class:`~mpsclip.archive.embedder.Embedder` path (reading in ``workers`` processes, decoding with PIL there
  or on the device, towers, fp16 rows and Parquet shards) of SOURCE into a fresh temporary store, after one
  warm-up shard (compilation, CUDA graph capture and worker start-up are not timed). Zero-shot perspectives
  use threshold 0, so every item gets its top-k keywords' sub-images: the path's full cost.

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
    """The model-alone row and one pipeline row per perspectives × decode × workers; the resolved settings."""
    device = resolve_device(settings.device)
    base = EmbedSettings(batch_size=settings.batch, shard_size=settings.shard_size, device=str(device))
    sha = file_sha256(settings.checkpoint)
    model = load_model(settings.checkpoint)
    alone = Embedder(model, base, sha)
    rows: list[dict[str, Any]] = [{"what": "model alone (image tower)", "perspectives": None, "decode": None,
                                   "workers": None, "items_per_s": round(model_rate(alone, settings.batch,
                                                                                    settings.model_repeats), 1)}]
    for perspectives in settings.perspectives:
        for decode in decoders(settings, device):
            for workers in settings.workers:
                chosen = dataclasses.replace(base, perspectives=perspectives, decode=decode, workers=workers,
                                             zero_shot=ZeroShotSettings(threshold=0.0))
                print(f"bench archive: perspectives={perspectives} decode={decode} workers={workers} ...",
                      file=sys.stderr, flush=True)
                embedder = Embedder(alone.model, chosen, sha)
                store = work / f"store-{len(rows)}"
                result = pipeline_rate(embedder, source, store, settings.checkpoint, progress)
                rows.append({"what": f"pipeline, perspectives={perspectives}, decode={decode}, workers={workers}",
                             "perspectives": perspectives, "decode": decode, "workers": workers, **result})
    for row in rows:
        row["vs_model_alone"] = round(row["items_per_s"] / rows[0]["items_per_s"], 3)
    resolved = {"dtype": alone.precision.precision, "runtime": alone.engine.kind,
                "items": len(list_items(source, base)), "arch": str(model.config_dict()["arch"])}
    return rows, resolved


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
        f"{s['dtype']} on {m['device']} ({s['runtime']} engine), batch {s['batch']}, shards of {s['shard_size']}. "
        "Pipeline rows embed the whole source into a fresh store after one warm-up shard; `vs model alone` is "
        "the row's items/s over the image tower's own on a resident batch.",
        *(["", result["note"]] if result.get("note") else []),
        "",
        "| what | items/s | seconds | vs model alone |",
        "|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else ""
        lines.append(f"| {r['what']} | {r['items_per_s']:,.1f} | {seconds} | {r['vs_model_alone']:.2f}x |")
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
