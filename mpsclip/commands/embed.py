"""Embed an image archive (folders, path lists, WebDataset shards, GeoTIFF scenes) into a Parquet store for search.

The store is a folder of shard-NNNNN.parquet files (fp16 embeddings) with manifest.json and failures.jsonl.
A killed run resumes where it stopped when started again with the same arguments; a store made with another
checkpoint or other settings is refused. Unreadable images are skipped and listed in failures.jsonl.
With --tile-size, georeferenced GeoTIFF scenes are cut into tiles (needs rasterio: pip install 'mpsclip[geo]');
each tile's meta has its scene, window, CRS and EPSG:4326 footprint (for 'mpsclip search --bbox/--format geojson');
--resolution M reads tiles resampled to M-metre pixels (projected CRS only).
SOURCE may also be a WebDataset .tar shard or a quoted brace pattern of shards ('shards-{0000..0099}.tar'),
one item per sample with a jpg/png/tif image; .tar shards inside a folder are read too.

example:
  mpsclip embed archive/ --out archive.store --checkpoint runs/best.safetensors
  mpsclip embed images/ --out store --checkpoint best.safetensors --perspectives from-dir --sub-root subimages
  mpsclip embed images/ --out store --checkpoint best.safetensors --perspectives zero-shot --keywords-top-k 3
  mpsclip embed images/ --out store --checkpoint best.safetensors --engine onnxruntime --engine-dir exported/
  mpsclip embed scenes/ --out tiles.store --checkpoint best.safetensors --tile-size 224 --stride 224 --bands 4,3,2
  mpsclip embed scenes/ --out tiles.store --checkpoint best.safetensors --tile-size 224 --resolution 10
  mpsclip embed 'shards/train-{0000..0099}.tar' --out web.store --checkpoint best.safetensors
  mpsclip embed archive/ --out archive.store --checkpoint best.safetensors --ray --ray-address auto
  mpsclip embed /shared/archive --out /shared/store --checkpoint /shared/best.safetensors --ray \
      --ray-address 10.0.0.1:6379 --ray-log shards.jsonl   # on the head node of a cluster
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mpsclip.archive.items import TileSettings
from mpsclip.choices import DECODERS, PERSPECTIVES, RUNTIMES
from mpsclip.commands._args import DeprecatedOption, add_checkpoint, add_device, add_out, add_quiet, warn_deprecated
from mpsclip.errors import MPSCLIPError

HELP = "embed an image archive into a Parquet store for text search"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        type=Path,
        metavar="SOURCE",
        help="folder of images (and .tar shards), a .txt list of paths, a .tar shard or 'shards-{0000..0099}.tar'",
    )
    add_out(parser, "store folder (created/resumed)", required=True, metavar="STORE")
    add_checkpoint(parser, required=True)
    parser.add_argument("--arch", default=None, help="architecture, for checkpoints that do not record it")
    add_quiet(parser)
    _perspective_arguments(parser.add_argument_group("perspectives (sub-images)"))
    _speed_arguments(parser.add_argument_group("speed and engines"))
    _tile_arguments(parser.add_argument_group("GeoTIFF scenes (needs rasterio)"))
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
        action=EngineKind,
        default="torch",
        metavar="KIND",
        help=f"image-tower engine: {', '.join(RUNTIMES)} (torch: fast fused runtime on a GPU; others: --engine-dir)",
    )
    group.add_argument(
        "--engine-dir", type=Path, default=None, metavar="DIR", help="an 'mpsclip export' folder for --engine"
    )
    group.add_argument("--runtime", dest="engine", action=DeprecatedOption, new="--engine", choices=RUNTIMES)
    group.add_argument(
        "--decode",
        choices=DECODERS,
        default="auto",
        help="JPEG decoding: cpu (PIL in the workers) or device (torchvision on the GPU); auto: device on a GPU",
    )
    group.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    group.add_argument("--shard-size", type=int, default=1024, help="items per shard (default: 1024)")
    group.add_argument("--workers", type=int, default=2, help="image-reading processes (default: 2; 0 = none)")


class EngineKind(argparse.Action):
    """``--engine KIND``; a value that is no kind but a folder is the old ``--engine DIR`` (deprecated)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str,
        option_string: str | None = None,
    ) -> None:
        if values in RUNTIMES:
            namespace.engine = values
        elif Path(values).is_dir():
            warn_deprecated(parser, "--engine DIR", "--engine-dir DIR")
            namespace.engine_dir = Path(values)
        else:
            parser.error(f"argument --engine: {values!r} is not one of {', '.join(RUNTIMES)}")


def _tile_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--tile-size", type=int, default=None, metavar="PX", help="cut GeoTIFF scenes into tiles")
    group.add_argument("--stride", type=int, default=None, metavar="PX", help="tile step (default: --tile-size)")
    group.add_argument("--bands", default=None, help="1-based bands as R,G,B or one grey band (default: 1,2,3)")
    group.add_argument(
        "--resolution", type=float, default=None, metavar="METRES", help="resample tiles to pixels of METRES"
    )


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
    if args.tile_size is None:
        if args.stride is not None or args.bands is not None or args.resolution is not None:
            raise MPSCLIPError("--stride, --bands and --resolution are only used with --tile-size; add it or drop them")
        return None
    bands = parse_bands(args.bands) if args.bands is not None else None
    return TileSettings(args.tile_size, args.stride or args.tile_size, bands, args.resolution)


def run(args: argparse.Namespace) -> int:
    from mpsclip.archive.job import EmbedSettings, embed_archive
    from mpsclip.archive.perspectives import ZeroShotSettings

    if args.workers < 0:
        raise MPSCLIPError(f"--workers must be 0 or more, got {args.workers}")
    if args.max_sub_images is not None and args.max_sub_images < 1:
        raise MPSCLIPError(f"--max-sub-images must be 1 or more, got {args.max_sub_images}")
    settings = EmbedSettings(
        perspectives=args.perspectives,
        sub_root=args.sub_root,
        max_sub_images=args.max_sub_images,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        workers=args.workers,
        device=args.device,
        tiles=tile_settings(args),
        runtime=args.engine,
        engine=args.engine_dir,
        decode=args.decode,
        zero_shot=ZeroShotSettings(
            vocabulary=args.vocabulary_file,
            top_k=args.keywords_top_k,
            threshold=args.keywords_threshold,
            saliency_k=args.saliency_k,
        ),
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
            on_shard=nodes.record,
        )
    elif args.ray_address is not None or args.ray_actors is not None or args.ray_log is not None:
        raise MPSCLIPError("--ray-address, --ray-actors and --ray-log are only used with --ray; add it or drop them")
    else:
        summary = embed_archive(
            args.source, args.out, args.checkpoint, arch=args.arch, settings=settings, progress=not args.quiet
        )
    rate = (summary.n_embedded / summary.seconds) if summary.seconds > 0 else 0.0
    print(
        f"store {summary.store}: {summary.n_embedded} of {summary.n_items} items embedded in "
        f"{summary.n_shards} shards ({summary.seconds:.1f} s, {rate:.1f} items/s overall)"
    )
    if summary.n_resumed_shards:
        print(f"  resumed after {summary.n_resumed_shards} existing shards")
    if summary.n_failed:
        print(f"  {summary.n_failed} unreadable items skipped, listed in {summary.store / 'failures.jsonl'}")
    if args.ray and nodes.shards:
        print("  shards per Ray node: " + ", ".join(f"{node} {n}" for node, n in sorted(nodes.shards.items())))
    return 0


class _NodeLog:
    """Counts the shards each Ray node embedded and appends each shard's record to ``--ray-log``."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.shards = path, Counter[str]()

    def record(self, record: Any) -> None:
        self.shards[record.node] += 1
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(asdict(record) | {"recorded_at": round(time.time(), 3)}) + "\n")
