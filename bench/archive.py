"""Archive embedding throughput next to the model's own throughput, in one run.

    python -m mpsclip.bench.archive --out bench/results                  # on a GPU machine
    python -m mpsclip.bench.archive --images 256 --batch 32 --device cpu  # a smoke run on a CPU

Writes a folder of synthetic JPEG tiles (``--images`` of ``--tile`` px, smooth colour fields with texture, so
they compress like aerial imagery), builds a random-weight MPS-CLIP of ``--arch``, and measures

* ``model``: the image tower alone as the embedder runs it (the fast runtime on a GPU) on a resident batch;
* ``pipeline/<perspectives>``: the whole :class:`~mpsclip.archive.embedder.Embedder` path — reading in worker
  processes, decoding (on the GPU with ``--decode device``), towers, fp16 rows and Parquet shards — for
  ``none`` (global only) and ``zero-shot`` perspectives, after one warm-up shard (compilation and CUDA graph
  capture are not timed).

Writes ``<out>/<device>-archive.json`` and ``.md`` with the device name, dtype, batch size and worker count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mpsclip.archive.embedder import Embedder, EmbedSettings
from mpsclip.archive.job import LocalExecutor, list_items, open_job, run_job
from mpsclip.archive.perspectives import ZeroShotSettings
from mpsclip.checkpoints import file_sha256
from mpsclip.io import atomic_write
from mpsclip.model import MPSCLIP


def _write_tile(args: tuple[Path, int, int]) -> None:
    path, size, seed = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    texture = rng.normal(0, 12, (size, size, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + texture, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_tiles(folder: Path, count: int, size: int, workers: int) -> None:
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


def pipeline_rate(embedder: Embedder, source: Path, store: Path, checkpoint: Path) -> dict[str, float]:
    """Items per second of the whole embedding path into a fresh store, after a warm-up shard."""
    items = list_items(source, embedder.settings)
    embedder.embed(items[: embedder.settings.shard_size])  # warm-up: compile, graph capture, worker start-up
    _synchronize(embedder.device)
    start = time.perf_counter()
    job = open_job(source, store, checkpoint, None, embedder.settings, embedder.decode, items)
    summary = run_job(job, LocalExecutor(checkpoint, None, embedder.settings, embedder), progress=False)
    seconds = time.perf_counter() - start
    return {"items": summary.n_embedded, "seconds": round(seconds, 3), "items_per_s": round(len(items) / seconds, 1)}


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# Archive embedding on {meta['device']}",
        "",
        f"{meta['images']} JPEG tiles of {meta['tile']} px, {meta['arch']} (random weights), {meta['dtype']}, "
        f"batch {meta['batch']}, {meta['workers']} reading workers, decode={meta['decode']}, torch {meta['torch']}.",
        "",
        "| what | images/s | vs model alone |",
        "|---|---:|---:|",
    ]
    model = rows[0]["items_per_s"]
    lines += [f"| {r['what']} | {r['items_per_s']:,.0f} | {r['items_per_s'] / model:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the results (e.g. bench/results)")
    parser.add_argument("--images", type=int, default=131_072, help="JPEG tiles to embed (default: 131072)")
    parser.add_argument("--tile", type=int, default=256, help="tile side in px (default: 256)")
    parser.add_argument("--arch", default="ViT-B-32-quickgelu")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=16_384)
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode", choices=("auto", "cpu", "device"), default="auto")
    parser.add_argument("--perspectives", default="none,zero-shot", help="comma-separated: none, zero-shot")
    parser.add_argument("--work-dir", type=Path, default=None, help="where tiles and stores go (default: a temp dir)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> None:
    settings = EmbedSettings(
        batch_size=args.batch, shard_size=args.shard_size, workers=args.workers, device=args.device, decode=args.decode
    )
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        write_tiles(work / "tiles", args.images, args.tile, max(1, os.cpu_count() or 1))
        checkpoint = MPSCLIP(args.arch).save(work / "model")
        sha = file_sha256(checkpoint)
        base = Embedder(MPSCLIP.from_checkpoint(checkpoint), settings, sha)
        rows = [{"what": "model alone (image tower)", "items_per_s": round(model_rate(base, args.batch, 20), 1)}]
        for perspectives in args.perspectives.split(","):
            zero_shot = ZeroShotSettings(threshold=0.0)  # random weights: no probability clears a threshold
            chosen = dataclasses.replace(settings, perspectives=perspectives, zero_shot=zero_shot)
            embedder = base if perspectives == "none" else Embedder(base.model, chosen, sha)
            result = pipeline_rate(embedder, work / "tiles", work / f"store-{perspectives}", checkpoint)
            rows.append({"what": f"pipeline, perspectives={perspectives}", **result})
        device = base.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
        meta = {
            "device": name,
            "dtype": "fp16" if device.type == "cuda" and settings.runtime == "torch" else "fp32",
            "batch": args.batch,
            "workers": args.workers,
            "decode": base.decode,
            "images": args.images,
            "tile": args.tile,
            "arch": args.arch,
            "torch": torch.__version__,
        }
    stem = args.out / name.replace(" ", "-").replace("/", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(f"{stem}-archive.json"), json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    atomic_write(Path(f"{stem}-archive.md"), markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
