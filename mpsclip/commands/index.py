"""Build a FAISS index over a store's retrieval embeddings, for stores too large for exhaustive search.

--faiss takes any faiss index_factory string (inner-product metric); the default is Flat below 50,000 items
and IVF<about 4 sqrt(n) lists>,PQ<dim/8> above. The index is trained on a seeded sample of the store
(--train-rows) and written into the store folder: index.faiss, index.<column>.npy (a memory-mapped copy of
the embeddings, used to re-rank candidates exactly; about the size of the shards) and index.json (factory,
nprobe, store identity, recall). 'mpsclip search' then uses it unless given --exact; an index whose store
has changed is refused until 'mpsclip index' runs again. Needs faiss: pip install 'mpsclip[index]'.
After building, recall@10 against exact search on the same store is measured and recorded, per mode, for a
seeded sample of the store's own global embeddings as queries and for --queries-file text queries if given.
A store that grew ('mpsclip embed' appended new shards) keeps its index: running 'mpsclip index' again adds the new
shards' items to it without training again (a trained IVF keeps its centroids and codes; Flat just adds), measures
recall again and records it with the update in index.json; until then searches refuse the index and say to run it.
The index is built from scratch instead with --rebuild, with another --faiss, or when shards it covers changed
(it checks their sha256). After much growth, --rebuild retrains the IVF on the store as it is now.

example:
  mpsclip index archive.store
  mpsclip index archive.store --faiss "IVF1024,PQ64" --nprobe 32 --queries-file queries.txt
  mpsclip index archive.store --faiss "HNSW32,Flat"
  mpsclip index archive.store            # again after 'mpsclip embed' appended shards: adds their items
  mpsclip index archive.store --rebuild  # train the index again on the whole store
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpsclip.commands._args import add_checkpoint, add_device, add_quiet

if TYPE_CHECKING:
    import torch

HELP = "build a FAISS index over a store for fast approximate search"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, metavar="STORE", help="store folder made by 'mpsclip embed'")
    parser.add_argument(
        "--faiss", default=None, metavar="FACTORY", help="faiss index_factory string (default: the index's, or auto)"
    )
    parser.add_argument("--nprobe", type=int, default=None, help="default inverted lists visited per search")
    parser.add_argument("--train-rows", type=int, default=100_000, help="training sample size (default: 100000)")
    parser.add_argument("--recall-queries", type=int, default=200, help="store rows used as recall queries")
    parser.add_argument("--queries-file", type=Path, default=None, help="text queries for recall, one per line")
    add_checkpoint(parser, "model for --queries-file (default: the store's)")
    add_device(parser, "model for --queries-file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training and query samples")
    parser.add_argument(
        "--rebuild", action="store_true", help="build from scratch even if the index can take the new shards"
    )
    add_quiet(parser)


def _text_queries(args: argparse.Namespace, manifest: dict[str, Any]) -> torch.Tensor:
    from mpsclip.archive.search import encode_queries, load_search_model
    from mpsclip.commands.search import read_queries_file
    from mpsclip.devices import resolve_device

    texts = read_queries_file(args.queries_file)
    return encode_queries(load_search_model(manifest, args.checkpoint, resolve_device(args.device)), texts).cpu()


def run(args: argparse.Namespace) -> int:
    from mpsclip.archive.index import IndexSettings, IndexUpdate, build_index, update_index
    from mpsclip.archive.store_reader import open_store
    from mpsclip.errors import MPSCLIPError

    for name in ("nprobe", "train_rows", "recall_queries"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MPSCLIPError(f"--{name.replace('_', '-')} must be 1 or more, got {value}")
    info = open_store(args.store)
    texts = _text_queries(args, info.manifest) if args.queries_file is not None else None
    settings = IndexSettings(args.faiss, args.nprobe, args.train_rows, args.recall_queries, args.seed)
    if args.rebuild:
        done = IndexUpdate(build_index(info, settings, texts, progress=not args.quiet), "built", "--rebuild")
    else:
        done = update_index(info, settings, texts, progress=not args.quiet)
    record = done.record
    probe = f", nprobe {record['nprobe']}" if record["nprobe"] is not None else ""
    if done.action == "current":
        print(f"index {record['factory']}{probe}: already covers all {info.n_rows} items; nothing to add "
              "(--rebuild builds it again)")
        return 0
    if done.action == "added":
        seconds = record["updates"][-1]["seconds"]
        print(f"index {record['factory']}{probe}: added {done.rows_added} new items (not retrained; trained on "
              f"{record['rows_at_training']} items), now {info.n_rows} items, in {seconds:.1f}s")
    else:
        why = f" ({done.reason})" if done.reason else ""
        print(f"index {record['factory']}{probe} over {info.n_rows} items in {record['build_seconds']:.1f}s{why}")
    for name, recall in record["recall@10"].items():
        figures = ", ".join(f"{mode} {value:.3f}" for mode, value in recall.items())
        print(f"recall@10 against exact search ({record['recall_queries'][name]} {name} queries): {figures}")
    return 0
