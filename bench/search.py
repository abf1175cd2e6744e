"""Exact (streamed) against FAISS search on a synthetic store: recall@10 and latency on this machine.

    python -m mpsclip.bench.search --rows 100000 --out bench/results

Builds a store of clustered random fp16 vectors with the store writer (fused, global and ``--views``
perspective embeddings per item), then times exhaustive search and, for each ``--faiss`` factory and
``--nprobe``, index search (candidates re-ranked exactly), with recall@10 against exhaustive search for
``--queries`` noisy cluster-centre queries. Writes ``<out>/cpu-search.json`` and ``<out>/cpu-search.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mpsclip.archive.index import IndexSettings, build_index, load_index, recall_at_k
from mpsclip.archive.search import exact_topk, to_hits
from mpsclip.archive.store import ShardRows, StoreInfo, open_store, shard_path, write_manifest, write_shard
from mpsclip.io import atomic_write

K = 10


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clustered(rng: np.random.Generator, centres: np.ndarray, basis: np.ndarray, n: int) -> np.ndarray:
    """``n`` unit vectors: a random centre plus noise with a decaying spectrum in the ``basis`` subspace and
    a little isotropic noise, so that clusters overlap like embeddings of similar kinds of scenes."""
    rank, dim = basis.shape
    spectrum = (1 + np.arange(rank)) ** -0.5
    noise = (rng.standard_normal((n, rank)) * spectrum) @ basis
    noise = 0.8 * _unit(noise) + 0.2 * _unit(rng.standard_normal((n, dim)))
    return _unit(centres[rng.integers(len(centres), size=n)] + noise)


def _space(seed: int, dim: int, clusters: int, rank: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Cluster centres and the noise subspace shared by :func:`synthetic_store` and :func:`synthetic_queries`."""
    rng = np.random.default_rng(seed)
    centres = _unit(_unit(rng.standard_normal(dim)) + _unit(rng.standard_normal((clusters, dim))))  # in a cone
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T
    return centres, basis


def synthetic_store(
    path: Path,
    rows: int,
    dim: int = 512,
    views: int = 2,
    shard_size: int = 1024,
    clusters: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> StoreInfo:
    """A complete store of ``rows`` clustered unit vectors (every other item with valid perspectives), each
    item with a small footprint; returns it opened."""
    centres, basis = _space(seed, dim, clusters)
    rng = np.random.default_rng(seed + 1)
    n_shards = (rows + shard_size - 1) // shard_size
    for shard in tqdm(range(n_shards), desc="synthetic store", unit="shard", disable=not progress):
        start, stop = shard * shard_size, min(rows, (shard + 1) * shard_size)
        n = stop - start
        retrieval = _clustered(rng, centres, basis, n)
        glob = _unit(retrieval + 0.3 * _unit(rng.standard_normal((n, dim))))
        persp = _unit(glob[:, None, :] + 0.5 * _unit(rng.standard_normal((n, views, dim))))
        valid = np.repeat((np.arange(start, stop) % 2 == 0)[:, None], views, axis=1)
        metas = [json.dumps({"footprint": [i % 360 - 180.0, i % 170 - 85.0, i % 360 - 179.9, i % 170 - 84.9]})
                 for i in range(start, stop)]
        ids = [f"tile_{i:07d}.png" for i in range(start, stop)]
        write_shard(shard_path(path, shard), ShardRows(ids, metas, retrieval, glob, persp, valid), dim, views)
    counts = {"items": rows, "embedded": rows, "failed": 0, "shards": n_shards}
    write_manifest(
        path,
        {"complete": True, "counts": counts, "dim": dim, "views": views, "checkpoint": "synthetic",
         "checkpoint_sha256": "synthetic", "arch": None, "precision": "fp16", "seed": seed},
    )
    return open_store(path)


def synthetic_queries(n: int, dim: int = 512, clusters: int = 1000, seed: int = 0) -> torch.Tensor:
    """Unit queries drawn like the items of :func:`synthetic_store` with the same ``seed`` (new draws)."""
    centres, basis = _space(seed, dim, clusters)
    return torch.from_numpy(_clustered(np.random.default_rng(seed + 2), centres, basis, n).astype(np.float32))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def _row(
    name: str, mode: str, search: Callable[[torch.Tensor], Any], info: StoreInfo, queries: torch.Tensor, alone: int
) -> dict:
    """Latency of ``search`` (queries → (scores, rows)) for the first ``alone`` queries one by one (rows only,
    then to hits) and for the whole batch to hits."""
    single_rows = [_timed_ms(lambda i=i: search(queries[i : i + 1])) for i in range(alone)]
    single_hits = [_timed_ms(lambda i=i: to_hits(info, *search(queries[i : i + 1]))) for i in range(len(single_rows))]
    batch_ms = _timed_ms(lambda: to_hits(info, *search(queries)))
    return {"search": name, "mode": mode, "ms_1_query_rows": statistics.median(single_rows),
            "ms_1_query_hits": statistics.median(single_hits), "ms_per_query_batch": batch_ms / len(queries),
            "queries_timed_alone": len(single_rows)}


def bench_exact(info: StoreInfo, queries: torch.Tensor, modes: list[str]) -> tuple[list[dict], dict[str, Any]]:
    """Latency of exhaustive search per mode, and the exact rows of all queries."""
    rows, exact = [], {}
    for mode in modes:
        exact[mode] = exact_topk(info, queries, K, mode)[1]
        row = _row("exact (streamed)", mode, lambda q, mode=mode: exact_topk(info, q, K, mode), info, queries, 3)
        rows.append({**row, f"recall@{K}": 1.0})
    return rows, exact


def bench_index(
    info: StoreInfo, queries: torch.Tensor, exact: dict[str, Any], factory: str, nprobes: list[int], seed: int
) -> tuple[dict[str, Any], list[dict]]:
    """Build one index, then recall@10 and latency for every nprobe (the default too) and mode."""
    record = build_index(info, IndexSettings(factory=factory, seed=seed), progress=False)
    index = load_index(info)
    assert index is not None
    rows = []
    for nprobe in [None] if record["nprobe"] is None else sorted({record["nprobe"], *nprobes}):
        name = record["factory"] if nprobe is None else f"{record['factory']} nprobe {nprobe}"
        faiss_only = recall_at_k(torch.from_numpy(index.candidates(queries, K, nprobe)), exact["fused"])
        for mode, want in exact.items():
            recall = recall_at_k(index.search(queries, K, mode, nprobe=nprobe)[1], want)
            row = _row(name, mode, lambda q, m=mode, p=nprobe: index.search(q, K, m, nprobe=p), info, queries, 20)
            rows.append({**row, f"recall@{K}": recall, f"faiss_only_recall@{K}": faiss_only})
    return record, rows


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"# Search on a synthetic store: {s['rows']:,} items, {s['dim']}-d fp16, {s['views']} perspectives",
        "",
        f"Machine: {m['cpu']}, {m['nproc']} CPUs (nproc), torch {m['torch']} ({m['torch_threads']} threads), "
        f"faiss {m['faiss']}. {s['queries']} queries near the store's clusters; k = {K}; candidates re-ranked = "
        f"{K} x 10; shards of {s['shard_size']} items; load average {m['load_average']} at the start. Times are "
        "wall-clock ms after the query embedding: median for one query alone (`rows`: top-k store rows; `hits`: "
        "with ids and metas read from the shards) and the whole batch's time to hits over its size.",
        "",
        f"| search | mode | 1 query: rows | 1 query: hits | per query in a batch | recall@{K} "
        f"| FAISS alone recall@{K} (fused) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        faiss_only = f"{r[f'faiss_only_recall@{K}']:.3f}" if f"faiss_only_recall@{K}" in r else ""
        lines.append(
            f"| {r['search']} | {r['mode']} | {r['ms_1_query_rows']:.1f} | {r['ms_1_query_hits']:.1f} "
            f"| {r['ms_per_query_batch']:.2f} | {r[f'recall@{K}']:.3f} | {faiss_only} |"
        )
    lines += ["", "| index | build s | index.faiss MB | recall@10 at build (store-sample queries) |"]
    lines += ["|---|---|---|---|"]
    for b in result["builds"]:
        recall = ", ".join(f"{mode} {v:.3f}" for mode, v in b["recall@10"]["store sample"].items())
        lines.append(f"| {b['factory']} | {b['build_seconds']:.1f} | {b['index_mb']:.1f} | {recall} |")
    return "\n".join(lines) + "\n"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--faiss", action="append", default=None, help="factory strings (default: the auto one)")
    parser.add_argument("--nprobe", type=int, action="append", default=None, help="extra nprobe values")
    parser.add_argument("--modes", default="fused,max-response")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for the results (e.g. bench/results)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the store goes (default: a temp dir)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    import faiss

    load_average = [round(x, 2) for x in os.getloadavg()]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mpsclip-bench-"))
    try:
        store = workdir / "store"
        shutil.rmtree(store, ignore_errors=True)
        info = synthetic_store(store, args.rows, args.dim, args.views, args.shard_size, seed=args.seed, progress=True)
        queries = synthetic_queries(args.queries, args.dim, seed=args.seed)
        rows, exact = bench_exact(info, queries, args.modes.split(","))
        builds = []
        for factory in args.faiss or [None]:
            record, index_rows = bench_index(info, queries, exact, factory, args.nprobe or [], args.seed)
            record["index_mb"] = (store / "index.faiss").stat().st_size / 2**20
            builds.append(record)
            rows += index_rows
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "machine": {"cpu": cpu_model(), "nproc": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
                    "load_average": load_average},
        "settings": {"rows": args.rows, "dim": args.dim, "views": args.views, "shard_size": args.shard_size,
                     "queries": args.queries, "seed": args.seed, "k": K},
        "rows": rows,
        "builds": builds,
    }
    atomic_write(args.out / "cpu-search.json", json.dumps(result, indent=2) + "\n")
    atomic_write(args.out / "cpu-search.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
