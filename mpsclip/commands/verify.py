"""Check a whole store: shard digests, Parquet page checksums, embedding norms, ids and item paths.

Every shard is read in full and compared with the SHA-256 its manifest records, its Parquet pages are checked
against their checksums, every embedding must have unit norm (stores of 'mpsclip embed'), an item id must be in
one shard only, every item's file must lie inside the store's source folder (absolute paths, '..' and links
leading out are reported), and failures.jsonl and pruned.jsonl must name existing shards. Opening a store
('mpsclip search', 'mpsclip serve') checks the digests only; this reads everything. Each problem names its file
and what to do. Exit status: 0 when the store is sound, 1 when a problem was found.

example:
  mpsclip verify archive.store
  mpsclip verify archive.store --quiet && echo sound
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpsclip.commands._args import add_quiet

HELP = "check a store's shards in full: digests, page checksums, norms, ids and item paths"
SHOWN = 20
"""Problems printed; the rest are counted."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, metavar="STORE", help="store folder made by 'mpsclip embed'")
    add_quiet(parser)


def run(args: argparse.Namespace) -> int:
    from mpsclip.archive.store_reader import verify_store

    report = verify_store(args.store)
    if not args.quiet:
        for note in report.notes:
            print(f"note: {note}")
    for problem in report.problems[:SHOWN]:
        print(f"problem: {problem}")
    if len(report.problems) > SHOWN:
        print(f"... and {len(report.problems) - SHOWN} more problems")
    n = len(report.problems)
    verdict = "sound" if not n else f"{n} problem{'s' if n > 1 else ''}"
    print(f"store {report.store}: {report.shards} shards, {report.rows} rows checked: {verdict}")
    return 1 if report.problems else 0
