"""``make demo``: the end-to-end job on a fresh machine with no weights and no data.

1. generate a synthetic remote-sensing set (``mpsclip synth``);
2. train a tiny MPS-CLIP from scratch on the CPU (``mpsclip train --config tiny``);
3. evaluate it on held-out synthetic images in the three scoring modes, next to the chance level, and name the
   best mode of this run (at the demo's size that is global, not the authors' fused: see :data:`FUSED_NOTE`);
4. run a few text queries, scored in that mode, and show their top images;
5. archive search: the test images as georeferenced GeoTIFF mosaics, tiled, embedded into a store and searched,
   with precision@1 and the hits as GeoJSON and HTML in ``<out>/archive/`` (needs rasterio, ``mpsclip[geo]``),
   then again with zero-shot perspectives (keywords and sub-images cut during embedding);
6. serve: ``mpsclip serve`` on the archive's store for a few seconds, one query over HTTP (its top hit must be
   the one ``mpsclip search`` gives), then Ctrl-C (SIGINT) and a clean stop.

Run with ``python -m mpsclip.demo --out demo_out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mpsclip.data.annotations import load_eval
from mpsclip.data.synth import dataset_paths, generate
from mpsclip.evaluate import embed_eval_set, markdown_table, mode_similarity, score_all_modes, write_results
from mpsclip.factory import load_model
from mpsclip.metrics import chance_r_mean
from mpsclip.train import TrainConfig, train

if TYPE_CHECKING:
    from mpsclip.archive.job import EmbedSettings
    from mpsclip.data.annotations import EvalImage
    from mpsclip.evaluate import EvalEmbeddings
    from mpsclip.model import MPSCLIP

# archive step: 4 mosaics of 4 x 4 tiles of 224 px (two test images of every class each), 10 m pixels, EPSG:32633
MOSAICS, GRID, TILE_PX, PIXEL_M = 4, 4, 224, 10.0
ARCHIVE_QUERIES = {
    "ships in a harbor": "harbor",
    "white storage tanks next to a factory": "industrial",
    "cars in a parking lot": "parking",
    "planes parked near the terminal": "airport",
    "a bridge crosses the river": "river",
    "houses with brown roofs line the road": "residential",
    "a dense forest of green trees": "forest",
    "green fields arranged in neat rows": "farmland",
}

QUERIES = [
    "white storage tanks next to a factory",
    "ships in a harbor",
    "a bridge crosses the river",
    "planes parked near the terminal",
    "cars in a parking lot",
]


def run_demo(out: Path, n_train: int, n_test: int, epochs: int) -> dict[str, dict[str, float]]:
    data, run_dir = out / "data", out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own previous run: start it afresh
    start = time.perf_counter()
    summary = generate(data, n_train=n_train, n_test=n_test, seed=0)
    print(f"[1/4] synthetic set: {n_train} training and {n_test} test images in {summary.seconds:.1f}s -> {data}")

    paths = dataset_paths(data)
    cfg = TrainConfig.from_yaml("tiny", **{k: str(v) for k, v in paths.items() if k != "eval_file"}, epochs=epochs)
    print(f"[2/4] training a tiny MPS-CLIP from scratch on the CPU ({epochs} epochs) -> {run_dir}")
    train(cfg, run_dir)

    print("[3/4] evaluating on held-out synthetic images")
    model = load_model(run_dir / "last.safetensors").eval()
    images = load_eval(paths["eval_file"])
    emb, results = evaluate_step(model, images, paths, cfg.max_sub_images, cfg.num_workers, out / "eval")
    best = best_mode(results)
    print(f"[4/4] text queries against the held-out images ({best} scoring, the best mode above)")
    query_step(model, emb, images, best)
    if archive_step(out, run_dir / "last.safetensors", data) is not None:
        serve_step(out / "archive" / "store", run_dir / "last.safetensors", QUERIES[0])
    print(f"demo finished in {time.perf_counter() - start:.0f}s; results in {out}")
    return results


FUSED_NOTE = (
    "fused averages the global embedding with the embedding of the image's black-background sub-image. The loss "
    "trains the global embedding directly, the sub-image one only through the MPR head's terms (weight 0.2), and "
    "this tiny tower is trained from scratch on whole scenes: on their own its sub-image embeddings score far "
    "below the global ones, so averaging them in dilutes the global embedding (bench/results/demo-modes.md). "
    "The authors' fused embedding starts from a pretrained CLIP."
)


def best_mode(results: dict[str, dict[str, float]]) -> str:
    """The scoring mode with the highest mR (ties: the first in ``results``' order)."""
    return max(results, key=lambda mode: results[mode]["r_mean"])


def headline(results: dict[str, dict[str, float]], chance: float) -> str:
    """The demo's summary of the evaluation: the best mode's mR against chance, the others beside it, and why
    fused (the authors' retrieval embedding) trails when it does."""
    best = best_mode(results)
    others = ", ".join(f"{mode} {m['r_mean']:.2f}" for mode, m in results.items() if mode != best)
    r_mean = results[best]["r_mean"]
    line = f"best mode: {best} mR {r_mean:.2f} = {r_mean / chance:.1f}x chance (chance {chance:.2f}; {others})"
    if best != "fused":
        line += f"\n{textwrap.fill(FUSED_NOTE, 116, initial_indent='  ', subsequent_indent='  ')}"
    return line


def evaluate_step(
    model: MPSCLIP, images: list[EvalImage], paths: dict[str, Path], max_sub_images: int | None, num_workers: int,
    out: Path,
) -> tuple[EvalEmbeddings, dict[str, dict[str, float]]]:
    """Embed the held-out images, print every mode's metrics and the :func:`headline`, write ``out``.json/.md."""
    emb = embed_eval_set(model, images, paths["image_root"], paths["sub_root"], 64, num_workers, max_sub_images)
    results = score_all_modes(emb)
    chance = chance_r_mean(len(images), 5)
    print(markdown_table(results, chance))
    print(headline(results, chance))
    write_results(out, results, len(images), emb.text.shape[0])
    return emb, results


def query_step(model: MPSCLIP, emb: EvalEmbeddings, images: list[EvalImage], mode: str) -> list[list[str]]:
    """:data:`QUERIES` against the held-out images scored in ``mode``; prints and returns each one's top 3."""
    with torch.no_grad():
        queries = model.encode_text(model.tokenize(QUERIES))
    scores = mode_similarity(dataclasses.replace(emb, text=queries), mode).t()
    tops = []
    for query, row in zip(QUERIES, scores, strict=True):
        top = row.topk(3)
        names = [Path(images[i].image).name for i in top.indices]
        hits = ", ".join(f"{name} ({s:.2f})" for name, s in zip(names, top.values, strict=True))
        print(f"  {query!r}: {hits}")
        tops.append(names)
    return tops


def mosaic_layout(data_dir: Path) -> list[list[tuple[Path, str]]]:
    """Per mosaic, its ``GRID * GRID`` (image, class) tiles in row order: test images of every class in turn."""
    by_class: dict[str, list[Path]] = {}
    for entry in json.loads(dataset_paths(data_dir)["eval_file"].read_text(encoding="utf-8")):
        by_class.setdefault(entry["label_name"], []).append(data_dir / entry["image"])
    classes = sorted(by_class)
    cells = GRID * GRID
    layout = []
    for m in range(MOSAICS):
        tiles = []
        for cell in range(cells):
            cls = classes[(cell + m) % len(classes)]
            images = by_class[cls]
            tiles.append((images[(m * cells + cell) % len(images)], cls))
        layout.append(tiles)
    return layout


def write_mosaics(scenes: Path, layout: list[list[tuple[Path, str]]]) -> dict[str, str]:
    """One GeoTIFF per mosaic (side by side 10 km apart, UTM 33N); returns the class of every tile id."""
    import numpy as np
    import rasterio
    from affine import Affine
    from PIL import Image

    scenes.mkdir(parents=True, exist_ok=True)
    classes = {}
    side = GRID * TILE_PX
    for m, tiles in enumerate(layout):
        pixels = np.zeros((3, side, side), dtype=np.uint8)
        for cell, (image, cls) in enumerate(tiles):
            row, col = divmod(cell, GRID)
            with Image.open(image) as img:
                rgb = np.asarray(img.convert("RGB").resize((TILE_PX, TILE_PX)))
            pixels[:, row * TILE_PX : (row + 1) * TILE_PX, col * TILE_PX : (col + 1) * TILE_PX] = rgb.transpose(2, 0, 1)
            classes[f"mosaic_{m}.tif/r{row * TILE_PX:06d}_c{col * TILE_PX:06d}"] = cls
        transform = Affine(PIXEL_M, 0.0, 500000.0 + m * 10000.0, 0.0, -PIXEL_M, 5000000.0)
        profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8"}
        with rasterio.open(scenes / f"mosaic_{m}.tif", "w", crs="EPSG:32633", transform=transform, **profile) as dst:
            dst.write(pixels)
    return classes


def archive_step(out: Path, model_checkpoint: Path, data_dir: Path) -> float | None:
    """Mosaics of the test images -> tiles -> store -> class queries; prints and returns precision@1."""
    from mpsclip.archive.items import TileSettings
    from mpsclip.archive.job import EmbedSettings, embed_archive
    from mpsclip.archive.render import to_geojson, to_html
    from mpsclip.archive.search import encode_queries, load_search_model, search_store
    from mpsclip.archive.store_reader import open_store
    from mpsclip.io import atomic_write

    try:
        import rasterio  # noqa: F401
    except ImportError:
        print("[archive] skipped: needs rasterio (pip install 'mpsclip[geo]')")
        return None
    archive = out / "archive"
    shutil.rmtree(archive, ignore_errors=True)  # the demo's own previous archive
    start = time.perf_counter()
    classes = write_mosaics(archive / "scenes", mosaic_layout(data_dir))
    print(f"[archive] {MOSAICS} GeoTIFF mosaics of {GRID}x{GRID} tiles (EPSG:32633) -> {archive / 'scenes'}")
    tiles = TileSettings(TILE_PX, TILE_PX)
    settings = EmbedSettings(perspectives="none", batch_size=32, workers=0, device="cpu", tiles=tiles)
    summary = embed_archive(archive / "scenes", archive / "store", model_checkpoint, settings=settings, progress=False)
    print(f"[archive] {summary.n_embedded} tiles embedded in {summary.seconds:.1f}s -> {archive / 'store'}")
    store = open_store(archive / "store")
    queries = list(ARCHIVE_QUERIES)
    results = search_store(store, encode_queries(load_search_model(store.manifest, model_checkpoint), queries), 5)
    correct = 0
    for query, hits in zip(queries, results, strict=True):
        correct += classes[hits[0].id] == ARCHIVE_QUERIES[query]
        shown = ", ".join(f"{h.id} [{classes[h.id]}] ({h.score:.2f})" for h in hits[:3])
        print(f"  {query!r} (want {ARCHIVE_QUERIES[query]}): {shown}")
    precision = correct / len(queries)
    collection, _ = to_geojson(queries, results)
    atomic_write(archive / "hits.geojson", json.dumps(collection) + "\n")
    atomic_write(archive / "hits.html", to_html(queries, results, store.manifest, "fused"))
    chance = 1 / len(set(ARCHIVE_QUERIES.values()))
    print(f"[archive] precision@1 {precision:.2f} ({correct}/{len(queries)} queries; chance {chance:.2f})")
    zero_shot_step(archive, model_checkpoint, settings, classes)
    seconds = time.perf_counter() - start
    print(f"[archive] hits in {archive / 'hits.geojson'} and {archive / 'hits.html'} ({seconds:.1f}s)")
    return precision


def zero_shot_step(archive: Path, model_checkpoint: Path, settings: EmbedSettings, classes: dict[str, str]) -> None:
    """The same tiles with zero-shot perspectives (keywords and sub-images cut in the embedding pass), searched
    in max-response mode."""
    from mpsclip.archive.job import embed_archive
    from mpsclip.archive.search import encode_queries, load_search_model, search_store
    from mpsclip.archive.store_reader import open_store, read_ids_metas

    settings = dataclasses.replace(settings, perspectives="zero-shot")
    out = archive / "store-zero-shot"
    summary = embed_archive(archive / "scenes", out, model_checkpoint, settings=settings, progress=False)
    store = open_store(out)
    metas = read_ids_metas(store, list(range(store.n_rows)))
    with_keywords = sum(bool(meta.get("keywords")) for _, meta in metas.values())
    first_id, first_meta = metas[0]
    print(
        f"[archive] zero-shot perspectives: {with_keywords} of {summary.n_embedded} tiles got keyword sub-images "
        f"in {summary.seconds:.1f}s (e.g. {first_id} [{classes[first_id]}]: {', '.join(first_meta['keywords'])})"
    )
    queries = list(ARCHIVE_QUERIES)
    model = load_search_model(store.manifest, model_checkpoint)
    results = search_store(store, encode_queries(model, queries), 1, "max-response")
    correct = sum(classes[hits[0].id] == ARCHIVE_QUERIES[q] for q, hits in zip(queries, results, strict=True))
    precision = correct / len(queries)
    print(f"[archive] zero-shot store, max-response: precision@1 {precision:.2f} ({correct}/{len(queries)})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_step(store: Path, model_checkpoint: Path, query: str, timeout_s: float = 120.0) -> None:
    """``mpsclip serve STORE`` as a user starts it, one ``POST /search``, then SIGINT; fails loudly when the
    server does not come up, answers differently from ``mpsclip search``, or does not stop cleanly."""
    from mpsclip.archive.search import encode_queries, load_search_model, search_store
    from mpsclip.archive.store_reader import open_store

    info = open_store(store)
    want = search_store(info, encode_queries(load_search_model(info.manifest, model_checkpoint), [query]), 1)[0][0].id
    port = free_port()
    cmd = [sys.executable, "-m", "mpsclip", "serve", str(store), "--checkpoint", str(model_checkpoint),
           "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    print(f"[serve] mpsclip serve {store} --port {port}")
    start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(base, server, timeout_s)
        ready_s = time.perf_counter() - start
        body = json.dumps({"text": query, "k": 3}).encode()
        request = urllib.request.Request(f"{base}/search", body, {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            hits = json.load(response)["hits"]
        if hits[0]["id"] != want:
            raise RuntimeError(f"served top hit {hits[0]['id']} for {query!r}, 'mpsclip search' gave {want}")
        print(f"[serve] ready in {ready_s:.1f}s; POST /search {query!r}: {hits[0]['id']} ({hits[0]['score']:.2f}), "
              "the same top hit as 'mpsclip search'")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            _, stderr = server.communicate(timeout=60)  # Triton drains and stops in about 10 s
        except subprocess.TimeoutExpired:
            server.kill()
            _, stderr = server.communicate()
    if server.returncode != 0:
        raise RuntimeError(f"mpsclip serve exited {server.returncode} after SIGINT:\n{stderr[-2000:]}")
    print(f"[serve] stopped cleanly after SIGINT (exit 0) in {time.perf_counter() - start:.1f}s in all")


def wait_ready(base: str, server: subprocess.Popen[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mpsclip serve exited {server.returncode} before it was ready:\n"
                               f"{server.stderr.read()[-2000:] if server.stderr else ''}")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"mpsclip serve was not ready at {base}/readyz within {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything the demo writes")
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    run_demo(args.out, args.train_images, args.test_images, args.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
