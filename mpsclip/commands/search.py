"""Search an embedding store made by 'mpsclip embed' with text queries (exact scoring on CPU).

Modes: fused (retrieval embedding, default), global, max-response (best of global and valid perspectives).
The checkpoint defaults to the one recorded in the store; another file with a different hash is refused.
--format geojson writes the hits that have a 'footprint' ([minx, miny, maxx, maxy], EPSG:4326) as polygons;
--format html writes a contact sheet of the hits' thumbnails (inline PNG) with rank, score and id.
--out FILE writes the output atomically to FILE instead of stdout.

example:
  mpsclip search archive.store "a harbor with many boats" -k 20
  mpsclip search archive.store --queries-file queries.txt --format json > hits.json
  mpsclip search tiles.store "an airport" --bbox 5.9,45.8,10.5,47.8 --format geojson > hits.geojson
  mpsclip search tiles.store "ships in a harbor" -k 24 --format html --out hits.html
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mpsclip.errors import MPSCLIPError

HELP = "search an embedding store with text queries"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, metavar="STORE", help="store folder made by 'mpsclip embed'")
    parser.add_argument("queries", nargs="*", metavar="QUERY", help="text queries")
    parser.add_argument("--queries-file", type=Path, default=None, help="more queries, one per line")
    parser.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    parser.add_argument("--mode", choices=("fused", "global", "max-response"), default="fused", help="scoring")
    parser.add_argument("--format", choices=("table", "json", "geojson", "html"), default="table", help="output format")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE", help="write to FILE (default: stdout)")
    parser.add_argument("--bbox", default=None, help="minx,miny,maxx,maxy: keep items whose footprint intersects")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model (default: the store's)")


def read_queries(args: argparse.Namespace) -> list[str]:
    queries = [q.strip() for q in args.queries if q.strip()]
    if args.queries_file is not None:
        if not args.queries_file.is_file():
            raise MPSCLIPError(f"{args.queries_file}: no such queries file")
        lines = args.queries_file.read_text(encoding="utf-8").splitlines()
        queries += [line.strip() for line in lines if line.strip()]
    if not queries:
        raise MPSCLIPError("no queries: give QUERY arguments or --queries-file")
    return queries


def emit(text: str, out: Path | None) -> None:
    """``text`` to stdout, or atomically to ``out``."""
    if out is None:
        print(text)
        return
    from mpsclip.io import atomic_write_text

    atomic_write_text(out, text if text.endswith("\n") else text + "\n")
    print(f"wrote {out}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from mpsclip.archive.search import (
        encode_queries,
        format_table,
        load_search_model,
        parse_bbox,
        rows_in_bbox,
        search,
        to_geojson,
        to_html,
        to_json,
    )
    from mpsclip.archive.store import load_store

    queries = read_queries(args)
    if args.k < 1:
        raise MPSCLIPError(f"-k must be 1 or more, got {args.k}")
    data = load_store(args.store)
    rows = None
    if args.bbox is not None:
        rows = rows_in_bbox(data, parse_bbox(args.bbox))
        print(f"{len(rows)} of {len(data.ids)} items intersect --bbox", file=sys.stderr)
    model = load_search_model(data, args.checkpoint)
    results = search(data, encode_queries(model, queries), args.k, args.mode, rows)
    if args.format == "table":
        emit(format_table(queries, results), args.out)
    elif args.format == "json":
        emit(json.dumps(to_json(queries, results, args.mode, args.k), indent=2), args.out)
    elif args.format == "html":
        emit(to_html(queries, results, data.manifest, args.mode), args.out)
    else:
        collection, skipped = to_geojson(queries, results)
        if skipped:
            print(f"{skipped} hits have no footprint in their meta and are not in the GeoJSON", file=sys.stderr)
        emit(json.dumps(collection), args.out)
    return 0
