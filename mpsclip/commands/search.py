"""Search an embedding store made by 'mpsclip embed' with text and image queries.

Queries: QUERY arguments, --queries-file (one per line; all are encoded and scored in batches) and --image
PATH (repeatable; embedded with the store's model like the archive's images). Results are listed per query,
text queries first; an image query is labelled by its path.
Modes: fused (retrieval embedding, default), global, max-response (best of global and valid perspectives).
The checkpoint defaults to the one recorded in the store; another file with a different hash is refused.
Exhaustive search streams the store shard by shard (bounded memory) and scores on the GPU when there is one.
If the store has an index made by 'mpsclip index', it is used: the index's top --candidates rows (default
10 x -k) are scored exactly in the chosen mode; --exact searches exhaustively instead. --bbox always searches
exhaustively among the items whose footprint intersects it, reading only the shards' row groups whose bbox
statistics meet the box. --datetime START/END (RFC 3339: 2024-05-01T10:20:30Z or a date 2024-05-01, meaning that
whole day in UTC; '..' for an open end; both ends included) keeps the items dated within it, --max-cloud PCT those
whose eo:cloud_cover is at most PCT percent; items without a date (or cloud cover) are left out when the filter is
given. Like --bbox, they search exhaustively and skip the row groups whose statistics exclude them; all three
combine.
--format geojson writes the hits that have a 'footprint' ([west, south, east, north], EPSG:4326) as RFC 7946
polygons (lon/lat, counter-clockwise; a footprint across the antimeridian as a MultiPolygon split at 180°);
--format html writes a contact sheet of the hits' thumbnails (inline PNG) with rank, score, id and keywords,
read from the embedded SOURCE folder; --source-root DIR says where that folder is now when the store or its
images moved to another folder or machine (item paths are stored relative to it).
--out FILE writes the output atomically to FILE instead of stdout.

example:
  mpsclip search archive.store "a harbor with many boats" -k 20
  mpsclip search archive.store --queries-file queries.txt --format json > hits.json
  mpsclip search archive.store --image example.png "an airport" --mode max-response
  mpsclip search tiles.store "an airport" --bbox 5.9,45.8,10.5,47.8 --format geojson > hits.geojson
  mpsclip search tiles.store "a marina" --bbox -78.9,23.5,-77.7,25.5 --format geojson --out hits.geojson
  mpsclip search s2.store "a flooded field" --datetime 2024-05-01/2024-05-31 --max-cloud 20
  mpsclip search s2.store "a wildfire scar" --datetime 2024-07-01T00:00:00Z/.. --bbox 5.9,45.8,10.5,47.8
  mpsclip search tiles.store "ships in a harbor" -k 24 --format html --out hits.html
  mpsclip search /mnt/copy/tiles.store "ships" --format html --source-root /mnt/copy/tiles --out hits.html
  mpsclip search big.store "a stadium" --candidates 500 --nprobe 64      # with an index from 'mpsclip index'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mpsclip.archive.dates import interval_arg
from mpsclip.choices import MODES, SEARCH_FORMATS
from mpsclip.commands._args import add_bbox, add_checkpoint, add_device, add_out, add_quiet
from mpsclip.errors import MPSCLIPError

if TYPE_CHECKING:
    from mpsclip.archive.index import StoreIndex
    from mpsclip.archive.store_reader import StoreInfo

HELP = "search an embedding store with text or image queries"


def percent(text: str) -> float:
    """A percentage 0..100 as an argparse type (``--max-cloud``)."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a percentage, a number from 0 to 100") from err
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a percentage from 0 to 100")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, metavar="STORE", help="store folder made by 'mpsclip embed'")
    parser.add_argument("queries", nargs="*", metavar="QUERY", help="text queries")
    parser.add_argument("--queries-file", type=Path, default=None, help="more queries, one per line")
    parser.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    parser.add_argument("--mode", choices=MODES, default="fused", help="scoring")
    parser.add_argument("--format", choices=SEARCH_FORMATS, default="table", help="output format")
    add_out(parser, "write to FILE (default: stdout)", metavar="FILE")
    add_bbox(parser, "west,south,east,north (EPSG:4326 degrees, negative west/south): keep items whose footprint "
             "intersects")
    parser.add_argument(
        "--datetime", type=interval_arg, default=None, metavar="START/END",
        help="keep items dated in this RFC 3339 interval (2024-05-01/2024-05-31, 2024-05-01T10:00:00Z/.., one date "
        "or datetime; dates are whole UTC days, ends included); items without a date are left out",
    )
    parser.add_argument(
        "--max-cloud", type=percent, default=None, metavar="PCT",
        help="keep items whose eo:cloud_cover is at most PCT percent; items without one are left out",
    )
    add_checkpoint(parser, "model (default: the store's)")
    parser.add_argument(
        "--image", type=Path, action="append", default=[], metavar="PATH", help="an image query (repeatable)"
    )
    parser.add_argument(
        "--source-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the embedded SOURCE folder is now, if the store or its images moved (for --format html)",
    )
    add_device(parser)
    parser.add_argument("--exact", action="store_true", help="exhaustive search even if the store has an index")
    parser.add_argument(
        "--candidates", type=int, default=None, metavar="N", help="index candidates re-ranked per query (10 x -k)"
    )
    parser.add_argument("--nprobe", type=int, default=None, metavar="N", help="inverted lists the index visits")
    add_quiet(parser)


def read_queries_file(path: Path) -> list[str]:
    """The non-blank lines of a queries file, stripped."""
    if not path.is_file():
        raise MPSCLIPError(f"{path}: no such queries file")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_queries(args: argparse.Namespace) -> list[str]:
    queries = [q.strip() for q in args.queries if q.strip()]
    if args.queries_file is not None:
        queries += read_queries_file(args.queries_file)
    if not queries and not args.image:
        raise MPSCLIPError("no queries: give QUERY arguments, --queries-file or --image")
    return queries


def emit(text: str, out: Path | None) -> None:
    """``text`` to stdout, or atomically to ``out``."""
    if out is None:
        print(text)
        return
    from mpsclip.io import atomic_write

    atomic_write(out, text if text.endswith("\n") else text + "\n")
    print(f"wrote {out}", file=sys.stderr)


def open_index(args: argparse.Namespace, info: StoreInfo) -> StoreIndex | None:
    """The store's index, unless there is none or --exact or a filter (--bbox, --datetime, --max-cloud) asks for
    exhaustive search."""
    from mpsclip.archive.index import index_answers, load_index

    answers = index_answers(args.exact, args.bbox, args.datetime, args.max_cloud)
    index = load_index(info) if answers else None
    if index is None and (args.candidates is not None or args.nprobe is not None):
        raise MPSCLIPError(
            "--candidates and --nprobe are only used with an index ('mpsclip index'), without --exact, --bbox, "
            "--datetime or --max-cloud"
        )
    if index is not None:
        record = index.record
        recall = record["recall@10"]["store sample"][args.mode]
        print(
            f"searching with the index ({record['factory']}, recall@10 {recall:.3f} at build); --exact to search all",
            file=sys.stderr,
        )
    return index


def run(args: argparse.Namespace) -> int:
    import torch

    from mpsclip.archive.render import format_table, to_geojson, to_html, to_json
    from mpsclip.archive.search import encode_images, encode_queries, exact_topk, load_search_model, to_hits
    from mpsclip.archive.store_reader import open_store
    from mpsclip.devices import resolve_device
    from mpsclip.engines.precision import precision_note

    texts = read_queries(args)
    labels = texts + [str(path) for path in args.image]
    if args.k < 1:
        raise MPSCLIPError(f"-k must be 1 or more, got {args.k}")
    info = open_store(args.store, source_root=args.source_root)
    index = open_index(args, info)
    model = load_search_model(info.manifest, args.checkpoint, resolve_device(args.device))
    if (note := precision_note(info.manifest.get("engine_precision"), "fp32")) is not None:
        print(note, file=sys.stderr)
    queries = torch.cat([encode_queries(model, texts), encode_images(model, args.image)])
    if index is None:
        scores, rows = exact_topk(
            info, queries, args.k, args.mode, args.bbox, not args.quiet, args.datetime, args.max_cloud
        )
    else:
        scores, rows = index.search(queries, args.k, args.mode, args.candidates, args.nprobe)
    results = to_hits(info, scores, rows)
    if args.format == "table":
        emit(format_table(labels, results), args.out)
    elif args.format == "json":
        emit(json.dumps(to_json(labels, results, args.mode, args.k), indent=2), args.out)
    elif args.format == "html":
        emit(to_html(labels, results, info.manifest, args.mode), args.out)
    else:
        collection, skipped = to_geojson(labels, results)
        if skipped:
            print(f"{skipped} hits have no footprint in their meta and are not in the GeoJSON", file=sys.stderr)
        emit(json.dumps(collection), args.out)
    return 0
