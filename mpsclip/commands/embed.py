"""Embed an image archive (an image, folders, path lists, WebDataset shards, GeoTIFF scenes) into a Parquet store.

The store is a folder of shard-NNNNN.parquet files (fp16 embeddings) with manifest.json and failures.jsonl.
Shards are made from item ids: running embed again on a source that gained items embeds only the new items, into
new shards, and leaves the existing shards as they are; a killed run resumes where it stopped when started again
with the same arguments; a store made with another checkpoint or other settings is refused. Unreadable images
are skipped and listed in failures.jsonl (--retry-failed tries them again); --prune lists the stored items whose
source disappeared in pruned.jsonl, and searches skip them. Every item's file must lie inside SOURCE (a single
image file: inside its folder).
With --tile-size, georeferenced GeoTIFF scenes are cut into tiles (needs rasterio: pip install 'mpsclip[geo]');
each tile's meta has its scene, window, CRS and EPSG:4326 footprint (for 'mpsclip search --bbox/--format geojson');
--resolution M reads tiles resampled to M-metre pixels (projected CRS only). Other images larger than a tile
(JPEG, PNG, WEBP, TIFF without georeferencing) are cut the same way in their own pixels (--bands and
--resolution are the scenes' alone), with no footprint; an image that fits in one tile stays whole.
SOURCE may also be a WebDataset .tar shard or a quoted brace pattern of shards ('shards-{0000..0099}.tar'),
one item per sample with a jpg/png/tif image; .tar shards inside a folder are read too.
SOURCE may also be a STAC Catalog, Collection, Item or ItemCollection (a .json file, an http(s):// or s3:// URL),
a stac-geoparquet file, an image URL or a .txt list of image URLs; or, with --stac-api, a STAC API search. Each
STAC item is one item (id <collection>/<item id>) read remotely by window, with --assets chosen by key or band
common name (default: visual, else red,green,blue); its date, platform and cloud cover are kept (needs
pip install 'mpsclip[stac]'). s3:// reads the standard AWS environment (AWS_ENDPOINT_URL or AWS_S3_ENDPOINT).

example:
  mpsclip embed archive/ --out archive.store --checkpoint runs/best.safetensors
  mpsclip embed scene.tif --out scene.store --checkpoint runs/best.safetensors --tile-size 224
  mpsclip embed photo.jpg --out photo.store --checkpoint runs/best.safetensors --tile-size 224 --stride 112
  mpsclip embed archive/ --out archive.store --checkpoint runs/best.safetensors --prune --retry-failed
  mpsclip embed images/ --out store --checkpoint best.safetensors --perspectives from-dir --sub-root subimages
  mpsclip embed images/ --out store --checkpoint best.safetensors --perspectives zero-shot --keywords-top-k 3
  mpsclip embed images/ --out store --checkpoint best.safetensors --engine onnxruntime --engine-dir exported/
  mpsclip embed images/ --out store --checkpoint m.safetensors --engine onnxruntime --engine-dir q8/ --precision int8
  mpsclip embed scenes/ --out tiles.store --checkpoint best.safetensors --tile-size 224 --stride 224 --bands 4,3,2
  mpsclip embed scenes/ --out tiles.store --checkpoint best.safetensors --tile-size 224 --resolution 10
  mpsclip embed 'shards/train-{0000..0099}.tar' --out web.store --checkpoint best.safetensors
  mpsclip embed archive/ --out archive.store --checkpoint best.safetensors --ray --ray-address auto
  mpsclip embed https://example.com/stac/catalog.json --out s2.store --checkpoint best.safetensors --assets visual
  mpsclip embed s3://bucket/stac/catalog.json --out s2.store --checkpoint best.safetensors --assets red,green,blue \
      --tile-size 224 --resolution 10
  mpsclip embed --stac-api https://earth-search.aws.element84.com/v1 --collections sentinel-2-l2a \
      --bbox 15.0,45.0,15.2,45.2 --datetime 2024-05-01/2024-05-31 --query 'eo:cloud_cover<20' --assets visual \
      --out s2.store --checkpoint best.safetensors --tile-size 224
  mpsclip embed /shared/archive --out /shared/store --checkpoint /shared/best.safetensors --ray \
      --ray-address 10.0.0.1:6379 --ray-log shards.jsonl   # on the head node of a cluster
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpsclip.choices import DECODERS, PERSPECTIVES, PRECISIONS, RUNTIMES
from mpsclip.commands._args import add_checkpoint, add_device, add_out, add_quiet, bbox
from mpsclip.errors import MPSCLIPError

if TYPE_CHECKING:
    from mpsclip.archive.items import TileSettings
    from mpsclip.archive.job import EmbedSummary

HELP = "embed an image archive into a Parquet store for text search"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        nargs="?",
        default=None,
        metavar="SOURCE",
        help="an image file (JPEG, PNG, TIFF, WEBP), a folder of images (and .tar shards), a .txt list of paths "
        "or URLs, a .tar shard, "
        "'shards-{0000..0099}.tar', a STAC catalog/collection/item(s) (.json, http(s)://, s3://) or a "
        "stac-geoparquet file (not with --stac-api)",
    )
    add_out(parser, "store folder (created/resumed)", required=True, metavar="STORE")
    add_checkpoint(parser, required=True)
    parser.add_argument("--arch", default=None, help="architecture, for checkpoints that do not record it")
    add_quiet(parser)
    parser.add_argument(
        "--prune", action="store_true", help="list stored items whose source disappeared in pruned.jsonl (skipped)"
    )
    parser.add_argument("--retry-failed", action="store_true", help="embed the items of failures.jsonl again")
    _perspective_arguments(parser.add_argument_group("perspectives (sub-images)"))
    _speed_arguments(parser.add_argument_group("speed and engines"))
    _tile_arguments(parser.add_argument_group("tiles (of GeoTIFF scenes: needs rasterio)"))
    parser.add_argument(
        "--gdal-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a GDAL option for remote reads (repeatable), e.g. GDAL_HTTP_TIMEOUT=60 or AWS_S3_ENDPOINT=host:port",
    )
    _stac_arguments(parser.add_argument_group("STAC catalogs and APIs (pip install 'mpsclip[stac]')"))
    _ray_arguments(parser.add_argument_group("Ray Data (needs ray)"))


def _perspective_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--perspectives",
        choices=PERSPECTIVES,
        default="none",
        help="none: global embedding only; zero-shot: keywords chosen by the model and clip-saliency sub-images "
        "cut in the same pass (no files written); from-dir: sub-images from --sub-root/<id without extension>/",
    )
    group.add_argument("--keywords-top-k", type=int, default=3, help="zero-shot: nouns per image (default: 3)")
    group.add_argument(
        "--keywords-threshold", type=float, default=0.02, help="zero-shot: least noun probability (default: 0.02)"
    )
    group.add_argument("--saliency-k", type=float, default=1.0, help="zero-shot: mask threshold in std units")
    group.add_argument("--vocabulary-file", type=Path, default=None, help="zero-shot nouns (default: packaged)")
    group.add_argument("--sub-root", type=Path, default=None, help="folder of sub-images (with from-dir)")
    group.add_argument("--max-sub-images", type=int, default=None, help="sub-images per item (default: all)")


def _speed_arguments(group: argparse._ArgumentGroup) -> None:
    add_device(group)
    group.add_argument(
        "--engine",
        choices=RUNTIMES,
        default="torch",
        metavar="KIND",
        help=f"image-tower engine: {', '.join(RUNTIMES)} (torch: fast fused runtime on a GPU; others: --engine-dir)",
    )
    group.add_argument(
        "--engine-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="an 'mpsclip export' folder for --engine (its aoti and tensorrt files are code: load folders you trust)",
    )
    group.add_argument(
        "--precision", choices=PRECISIONS, default=None,
        help="the image engine's precision (default: its own; int8 needs an int8 export in --engine-dir)",
    )
    group.add_argument(
        "--decode",
        choices=DECODERS,
        default="auto",
        help="JPEG decoding: cpu (PIL in the workers) or device (torchvision on the GPU); auto: device on a GPU",
    )
    group.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    group.add_argument("--shard-size", type=int, default=1024, help="items per shard (default: 1024)")
    group.add_argument(
        "--workers", type=int, default=None,
        help="image-reading processes (0 = none; default: 0 on up to 2 cores, else half the cores, at most 8)",
    )


def _tile_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--tile-size", type=int, default=None, metavar="PX",
        help="cut GeoTIFF scenes and images larger than PX into tiles of PX",
    )
    group.add_argument("--stride", type=int, default=None, metavar="PX", help="tile step (default: --tile-size)")
    group.add_argument(
        "--bands", default=None, help="GeoTIFF scenes: 1-based bands as R,G,B or one grey band (default: 1,2,3)"
    )
    group.add_argument(
        "--resolution", type=float, default=None, metavar="METRES",
        help="GeoTIFF scenes: resample tiles to pixels of METRES",
    )


def _stac_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--assets",
        default=None,
        metavar="KEYS",
        help="the assets of each STAC item to embed: one RGB asset (visual) or three bands (red,green,blue, by key "
        "or eo:bands common name); default: visual, else red,green,blue",
    )
    group.add_argument("--stac-api", default=None, metavar="URL", help="search this STAC API instead of a SOURCE")
    group.add_argument("--collections", default=None, metavar="C,...", help="with --stac-api: collection ids")
    group.add_argument("--bbox", type=bbox, default=None, metavar="W,S,E,N", help="with --stac-api: area in degrees")
    group.add_argument(
        "--datetime", default=None, metavar="START/END", help="with --stac-api: RFC 3339 interval ('..': open end)"
    )
    group.add_argument(
        "--query",
        action="append",
        default=None,
        metavar="EXPR",
        help="with --stac-api: query extension, 'eo:cloud_cover<20' (repeatable) or a JSON object",
    )
    group.add_argument(
        "--filter", default=None, metavar="CQL2", help="with --stac-api: CQL2 text, or CQL2 JSON when it starts with {"
    )


def embed_source(args: argparse.Namespace) -> str:
    """SOURCE as ``embed_archive`` takes it: the path or URL given, or the GET URL of the ``--stac-api`` search;
    ``#assets=...`` appended for ``--assets`` (part of the store's identity)."""
    from mpsclip.archive import stac

    searching = [f for f in ("collections", "bbox", "datetime", "query", "filter") if getattr(args, f) is not None]
    if args.stac_api is not None:
        if args.source is not None:
            raise MPSCLIPError(f"give SOURCE ({args.source}) or --stac-api ({args.stac_api}), not both")
        source = stac.StacSearch(
            api=args.stac_api,
            collections=tuple(c for c in (args.collections or "").split(",") if c),
            bbox=args.bbox,
            datetime=args.datetime,
            query=stac.parse_query(args.query or []),
            filter=stac.parse_filter(args.filter),
        ).url()
    elif args.source is None:
        raise MPSCLIPError("give a SOURCE (an image, a folder, list, shards, STAC catalog or URL) or --stac-api URL")
    elif searching:
        flags = ", ".join("--" + f for f in searching)
        raise MPSCLIPError(f"{flags}: only used with --stac-api URL; add it or drop them")
    else:
        source = stac.checked_source(str(args.source))
    if args.assets is None:
        return source
    if not stac.is_stac_source(source):
        raise MPSCLIPError(f"--assets: {source} is not a STAC catalog, item(s), stac-geoparquet file or search")
    source = stac.with_assets(source, [a.strip() for a in args.assets.split(",") if a.strip()])
    stac.split_assets(source)  # refuses a choice of 2 or 4 assets now rather than after listing
    return source


def _ray_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Data: one actor per GPU, across nodes (pip install 'mpsclip[ray]')",
    )
    group.add_argument(
        "--ray-address", default=None, help="with --ray: 'auto' or a cluster address (default: start a local Ray)"
    )
    group.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        metavar="N",
        help="with --ray: embedding actors (default: one per GPU, else as many as the CPUs hold)",
    )
    group.add_argument(
        "--ray-log",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --ray: append one JSON line per shard (shard, node address, items, seconds, time) to FILE",
    )


def parse_bands(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise MPSCLIPError(f"--bands {text!r}: expected band numbers such as 1,2,3 or 4,3,2") from err


def tile_settings(args: argparse.Namespace) -> TileSettings | None:
    """``--tile-size/--stride/--bands/--resolution`` as TileSettings (None without --tile-size)."""
    from mpsclip.archive.items import TileSettings

    if args.tile_size is None:
        if args.stride is not None or args.bands is not None or args.resolution is not None:
            raise MPSCLIPError("--stride, --bands and --resolution are only used with --tile-size; add it or drop them")
        return None
    bands = parse_bands(args.bands) if args.bands is not None else None
    return TileSettings(args.tile_size, args.stride or args.tile_size, bands, args.resolution)


def gdal_config(pairs: list[str]) -> dict[str, str]:
    """``--gdal-config KEY=VALUE`` flags as a dict (parsed without importing rasterio)."""
    if not pairs:
        return {}
    from mpsclip.archive.remote import parse_gdal_config

    return parse_gdal_config(pairs)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(cores: int) -> int:
    """Reading processes for ``cores`` cores: none on up to 2 (each worker starts its own interpreter and competes
    with the model's threads: a review's run on 2 cores was 3x slower with --workers 2 than with 0), else half
    the cores, at most 8."""
    return 0 if cores <= 2 else min(cores // 2, 8)


def run(args: argparse.Namespace) -> int:
    from mpsclip.archive.job import EmbedSettings, embed_archive
    from mpsclip.archive.perspectives import ZeroShotSettings

    workers = default_workers(available_cores()) if args.workers is None else args.workers
    if workers < 0:
        raise MPSCLIPError(f"--workers must be 0 or more, got {workers}")
    if args.max_sub_images is not None and args.max_sub_images < 1:
        raise MPSCLIPError(f"--max-sub-images must be 1 or more, got {args.max_sub_images}")
    args.source = embed_source(args)
    settings = EmbedSettings(
        perspectives=args.perspectives,
        sub_root=args.sub_root,
        max_sub_images=args.max_sub_images,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        workers=workers,
        device=args.device,
        tiles=tile_settings(args),
        engine=args.engine,
        engine_dir=args.engine_dir,
        decode=args.decode,
        precision=args.precision,
        zero_shot=ZeroShotSettings(
            vocabulary=args.vocabulary_file,
            top_k=args.keywords_top_k,
            threshold=args.keywords_threshold,
            saliency_k=args.saliency_k,
        ),
        gdal_config=tuple(gdal_config(args.gdal_config).items()),
    )
    if args.ray:
        from mpsclip.archive.ray_executor import embed_archive_ray

        nodes = _NodeLog(args.ray_log)

        summary = embed_archive_ray(
            args.source,
            args.out,
            args.checkpoint,
            arch=args.arch,
            settings=settings,
            address=args.ray_address,
            num_actors=args.ray_actors,
            progress=not args.quiet,
            prune=args.prune,
            retry_failed=args.retry_failed,
            on_shard=nodes.record,
        )
    elif args.ray_address is not None or args.ray_actors is not None or args.ray_log is not None:
        raise MPSCLIPError("--ray-address, --ray-actors and --ray-log are only used with --ray; add it or drop them")
    else:
        summary = embed_archive(
            args.source, args.out, args.checkpoint, arch=args.arch, settings=settings, progress=not args.quiet,
            prune=args.prune, retry_failed=args.retry_failed,
        )
    print(summary_line(summary))
    if summary.n_resumed_shards and summary.n_shards > summary.n_resumed_shards:
        print(f"  {summary.n_new} new items embedded after {summary.n_resumed_shards} existing shards")
    if summary.n_pruned:
        print(f"  {summary.n_pruned} stored items whose source disappeared are pruned (searches skip them)")
    if summary.n_failed:
        print(f"  {summary.n_failed} unreadable items skipped, listed in {summary.store / 'failures.jsonl'}")
    if args.ray and nodes.shards:
        print("  shards per Ray node: " + ", ".join(f"{node} {n}" for node, n in sorted(nodes.shards.items())))
    return 0


def summary_line(summary: EmbedSummary) -> str:
    """What a run did: the store's counts and the rate over the items this run embedded (a run that found every
    item embedded says so instead of dividing its listing time into them)."""
    if summary.n_shards == summary.n_resumed_shards:
        return (
            f"store {summary.store}: nothing to do: {summary.n_embedded} items already embedded in "
            f"{summary.n_shards} shards ({summary.seconds:.1f} s)"
        )
    rate = summary.n_new / summary.seconds if summary.seconds > 0 else 0.0
    return (
        f"store {summary.store}: {summary.n_embedded} of {summary.n_items} items embedded in {summary.n_shards} "
        f"shards ({summary.seconds:.1f} s, {rate:.1f} items/s over the {summary.n_new} embedded in this run)"
    )


class _NodeLog:
    """Counts the shards each Ray node embedded and appends each shard's record to ``--ray-log``."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.shards = path, Counter[str]()

    def record(self, record: Any) -> None:
        self.shards[record.node] += 1
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(asdict(record) | {"recorded_at": round(time.time(), 3)}) + "\n")
