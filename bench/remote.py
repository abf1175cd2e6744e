"""Remote reading throughput: the same COG tiles read from local disk, over loopback HTTP (Debian's nginx) and
over loopback HTTP with every request delayed (:func:`mpsclip.bench.servers.delaying_proxy`), in interleaved
rounds.

What is timed is the embedder's reading stage, the code ``mpsclip embed`` runs in its reading processes
(:class:`mpsclip.archive.embedder._ItemDataset`: a batch's items read, 8 at a time for remote items, and
resized and normalised to the model's input), one process, batches of ``--batch`` items: the towers are left
out, so what differs between the three sources is all that is measured. Local tiles are ``geotiff-window``
items of the files (read from the page cache after the first round), remote ones ``remote-window`` items of the
same files; each round reads the remote files under new URLs, so GDAL's caches of earlier rounds do not help.

Bytes and requests per tile come from nginx's access log (``$body_bytes_sent`` of each request made while the
tiles were read; the listing's requests are counted apart), against the compressed bytes of the COG blocks each
tile covers (from the TIFF's tile byte counts). The machine's load average is recorded at the start and end.

    python -m mpsclip.bench.remote --out bench/results/CPU-x2-remote --scenes 4 --size 1024 --tile 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from affine import Affine
from mpsclip.bench.report import load_average, write_json
from mpsclip.bench.servers import delaying_proxy, nginx

from mpsclip.archive import remote
from mpsclip.archive.embedder import _ItemDataset
from mpsclip.archive.geotiff import scene_tiles
from mpsclip.archive.items import Item, TileSettings
from mpsclip.io import atomic_write

SCHEMA = "mpsclip-bench-remote/1"
MODEL_INPUT = 224


def write_scene(path: Path, size: int, tile: int, seed: int) -> None:
    """A ``size`` px RGB uint8 COG (``tile`` px blocks, deflate, overviews) of smooth colour fields with texture,
    which compresses like aerial imagery."""
    from PIL import Image
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + rng.normal(0, 12, (size, size, 3)), 1, 255)
    plain = path.with_suffix(".plain.tif")
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": "EPSG:32633"}
    profile["transform"] = Affine(10.0, 0.0, 500000.0 + seed * size * 10, 0.0, -10.0, 5000000.0)
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(pixels.astype(np.uint8).transpose(2, 0, 1))
    cog = {**cog_profiles.get("deflate"), "blockxsize": tile, "blockysize": tile}
    cog_translate(str(plain), str(path), cog, quiet=True)
    plain.unlink()


def compressed_bytes(path: Path, window: list[int]) -> int:
    """Compressed bytes of the COG blocks (all bands) a window ``[col, row, width, height]`` covers."""
    col, row, width, height = window
    with rasterio.open(path) as src:
        bh, bw = src.block_shapes[0]
        pixel_interleaved = src.interleaving is None or src.interleaving.value == "PIXEL"
        bands = [1] if pixel_interleaved else list(src.indexes)  # a pixel-interleaved block holds every band
        rows = range(row // bh, (row + height - 1) // bh + 1)
        cols = range(col // bw, (col + width - 1) // bw + 1)
        return sum(src.block_size(b, i, j) for b in bands for i in rows for j in cols)


def read_rate(items: list[Item], batch: int, threads: int | None = None) -> float:
    """Items per second through the embedder's reading stage (all items must read); with ``threads``, each batch
    read that many at a time whatever the items' kind (the stricter local baseline)."""
    dataset = _ItemDataset(items, MODEL_INPUT, None, None, raw_jpeg=False)
    pool = ThreadPoolExecutor(threads) if threads else None
    start = time.perf_counter()
    for first in range(0, len(items), batch):
        indices = list(range(first, min(first + batch, len(items))))
        loaded = list(pool.map(dataset.__getitem__, indices)) if pool else dataset.__getitems__(indices)
        errors = [x.error for x in loaded if x.error]
        if errors:
            raise RuntimeError(f"bench remote: a tile failed to read: {errors[0]}")
    rate = len(items) / (time.perf_counter() - start)
    if pool:
        pool.shutdown()
    return rate


def log_since(log: Path, offset: int) -> tuple[list[tuple[str, int]], int]:
    """(status, body bytes) of the access-log lines written after byte ``offset``, and the new offset."""
    time.sleep(0.2)  # nginx writes its log line after the answer
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode()
        end = f.tell()
    rows = []
    for line in text.splitlines():
        parts = line.split()
        rows.append((parts[2], int(parts[3])))
    return rows, end


def remote_tiles(base_url: str, names: list[str], tiles: TileSettings, root: Path) -> list[Item]:
    items = []
    for name in names:
        items += remote.remote_items(name, [f"{base_url}/{name}"], {}, tiles, root)
    return items


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)  # as in the DataLoader's reading processes, which this stage runs in
    tiles = TileSettings(args.tile, args.tile)
    started = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        www = Path(tmp) / "www"
        www.mkdir()
        names = [f"scene-{i}.tif" for i in range(args.scenes)]
        for i, name in enumerate(names):
            write_scene(www / name, args.size, args.tile, i)
        local = [it for i, name in enumerate(names) for it in scene_tiles(www / name, name, tiles, www)]
        compressed = [compressed_bytes(it.path, it.meta["window"]) for it in local]
        scene_bytes = round(statistics.mean((www / name).stat().st_size for name in names))
        for r in range(args.rounds):
            for mode in ("http", "delayed"):
                (www / f"{mode}-{r}").mkdir()
                for name in names:
                    (www / f"{mode}-{r}" / name).symlink_to(www / name)
        rates: dict[str, list[float]] = {
            "local disk": [],
            "local disk, 8 at a time": [],
            "http (loopback)": [],
            "http (+delay)": [],
        }
        read_rate(local, args.batch)  # warm-up: imports, the page cache, GDAL's drivers
        traffic: dict[str, list[tuple[str, int]]] = {"listing": [], "reading": []}
        listing_s: dict[str, list[float]] = {"http": [], "delayed": []}
        with nginx(www, Path(tmp) / "nginx") as server, delaying_proxy(server.port, args.delay_ms / 1000) as port:
            offset = 0
            for r in range(args.rounds):
                rates["local disk"].append(read_rate(local, args.batch))
                rates["local disk, 8 at a time"].append(read_rate(local, args.batch, threads=8))
                for mode, base in (("http", server.url), ("delayed", f"http://127.0.0.1:{port}")):
                    start = time.perf_counter()
                    items = remote_tiles(f"{base}/{mode}-{r}", names, tiles, www)
                    listing_s[mode].append((time.perf_counter() - start) / len(names))
                    assert len(items) == len(local), "remote listing differs from the local one"
                    listed, offset = log_since(server.access_log, offset)
                    rate = read_rate(items, args.batch)
                    read, offset = log_since(server.access_log, offset)
                    rates["http (loopback)" if mode == "http" else "http (+delay)"].append(rate)
                    if mode == "http":
                        traffic["listing"] += listed
                        traffic["reading"] += read
                print(
                    f"bench remote: round {r + 1}/{args.rounds}: "
                    + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items()),
                    file=sys.stderr,
                    flush=True,
                )
    n_read = len(local) * args.rounds

    def ratio(rates_of: list[float], baseline: str) -> float:
        """The median of per-round ratios (rounds are interleaved, so each ratio shares the round's load)."""
        return round(statistics.median(x / b for x, b in zip(rates_of, rates[baseline], strict=True)), 3)

    rows = [
        {
            "source": name,
            "items_per_s_median": round(statistics.median(v), 1),
            "items_per_s": [round(x, 1) for x in v],
            "vs_local": ratio(v, "local disk"),
            "vs_local_8": ratio(v, "local disk, 8 at a time"),
        }
        for name, v in rates.items()
    ]
    read_bytes = sum(b for _, b in traffic["reading"])
    return {
        "schema": SCHEMA,
        "command": "python -m mpsclip.bench.remote " + " ".join(sys.argv[1:]),
        "machine": {
            "cores": os.cpu_count(),
            "load_average_start": started,
            "load_average_end": load_average(),
            "gdal": rasterio.__gdal_version__,
            "rasterio": rasterio.__version__,
        },
        "settings": {
            "scenes": args.scenes,
            "size": args.size,
            "tile": args.tile,
            "batch": args.batch,
            "rounds": args.rounds,
            "delay_ms_per_request": args.delay_ms,
            "tiles_per_round": len(local),
            "read_threads": 8,
            "gdal_options": remote.gdal_options(),
        },
        "rows": rows,
        "traffic": {
            "tiles_read_over_http": n_read,
            "compressed_bytes_per_tile": round(statistics.mean(compressed)),
            "fetched_bytes_per_tile": round(read_bytes / n_read),
            "fetched_vs_compressed": round(read_bytes / n_read / statistics.mean(compressed), 3),
            "requests_per_tile": round(len(traffic["reading"]) / n_read, 2),
            "statuses_while_reading": sorted({s for s, _ in traffic["reading"]}),
            "listing_requests_per_scene": round(len(traffic["listing"]) / (len(names) * args.rounds), 2),
            "listing_bytes_per_scene": round(sum(b for _, b in traffic["listing"]) / (len(names) * args.rounds)),
            "scene_file_bytes": scene_bytes,
            "listing_seconds_per_scene": {k: round(statistics.median(v), 3) for k, v in listing_s.items()},
        },
    }


def markdown(result: dict[str, Any]) -> str:
    s, m, t = result["settings"], result["machine"], result["traffic"]
    lines = [
        "# Remote COG reading: local disk vs loopback HTTP (nginx) vs HTTP with a delay per request",
        "",
        f"`{result['command']}`",
        "",
        f"{s['scenes']} COGs of {s['size']} px ({s['tile']} px deflate blocks), {s['tiles_per_round']} tiles of "
        f"{s['tile']} px a round, {s['rounds']} interleaved rounds, batches of {s['batch']}; the embedder's reading "
        f"stage (read, resize to {MODEL_INPUT} px, normalise; one torch thread, as in a reading process), "
        f"{s['read_threads']} reads in flight for remote items. "
        f"Delay: {s['delay_ms_per_request']} ms added to every request by a proxy. "
        f"{m['cores']} cores, load average {m['load_average_start']} at the start and {m['load_average_end']} at "
        f"the end (a shared machine: ratios within a round matter more than absolute rates). GDAL {m['gdal']}.",
        "",
        "Local tiles are read one at a time by the reading stage (as `mpsclip embed` reads local items); the row "
        "`local disk, 8 at a time` reads them with as many in flight as remote items get, the stricter baseline. "
        "Ratios are medians of per-round ratios.",
        "",
        "| source | items/s (median) | per round | vs local | vs local, 8 at a time |",
        "|---|---:|---|---:|---:|",
    ]
    for row in result["rows"]:
        per_round = ", ".join(f"{x:.1f}" for x in row["items_per_s"])
        lines.append(
            f"| {row['source']} | {row['items_per_s_median']:.1f} | {per_round} | {row['vs_local']:.2f} "
            f"| {row['vs_local_8']:.2f} |"
        )
    lines += [
        "",
        "| traffic while reading tiles over HTTP | value |",
        "|---|---:|",
        f"| compressed bytes of the blocks a tile covers (mean) | {t['compressed_bytes_per_tile']} |",
        f"| bytes fetched per tile (nginx body bytes) | {t['fetched_bytes_per_tile']} |",
        f"| fetched / compressed | {t['fetched_vs_compressed']:.3f} |",
        f"| HTTP requests per tile | {t['requests_per_tile']:.2f} |",
        f"| listing: requests per scene (header, overview scan) | {t['listing_requests_per_scene']:.2f} |",
        f"| listing: bytes per scene | {t['listing_bytes_per_scene']} (file: {t['scene_file_bytes']}) |",
        f"| listing: seconds per scene, loopback / +delay (one request at a time: the delay shows) "
        f"| {t['listing_seconds_per_scene']['http']} / {t['listing_seconds_per_scene']['delayed']} |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="scene side in pixels")
    parser.add_argument("--tile", type=int, default=256, help="tile (and COG block) side in pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=30.0, help="added to every HTTP request")
    args = parser.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    atomic_write(args.out / "results.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
