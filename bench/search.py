"""``mpsclip bench search``: search latency and recall@10 on a store, exact streamed, in memory and FAISS.

The store is a real one (read only: indexes are built in a scratch folder of links to its shards) or, with
``synthetic``, a store of clustered random fp16 vectors written with the store writer (fused, global and
``views`` perspective embeddings per item). Queries: a seeded sample of the store's own global embeddings
(for a synthetic store, new draws near its clusters). Each search is timed for single queries (median of
the first few, to top-k store rows, then with ids and metas) and for the whole query batch; recall@10 is
against exact search in the same mode. Results: ``results.json`` (schema :data:`SCHEMA`), ``results.md`` and
``recall_latency.png`` in the output folder.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpsclip.bench.report import command_line, load_average, machine, save_png
from tqdm import tqdm

from mpsclip.archive.index import IndexSettings, build_index, import_faiss, load_index, recall_at_k
from mpsclip.archive.search import Hit, exact_topk, to_hits
from mpsclip.archive.store import FAILURES, MANIFEST, ShardRows, shard_path, write_manifest, write_shard
from mpsclip.archive.store_reader import StoreData, StoreInfo, load_store, open_store, read_shard
from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write
from mpsclip.scoring import backend_for, mode_views, topk

SCHEMA = "mpsclip-bench-search/1"
K = 10
ALONE = {"exact (streamed)": 3, "in memory": 20, "faiss": 20}
"""Single queries timed one by one per kind of search (streamed exact search reads the whole store each time)."""


@dataclass(frozen=True)
class SearchSettings:
    store: Path | None = None
    synthetic: int | None = None
    dim: int = 512
    views: int = 2
    shard_size: int = 1024
    queries: int = 100
    factories: tuple[str | None, ...] = (None,)
    """FAISS factory strings; None: what ``mpsclip index`` picks for the store."""
    nprobes: tuple[int, ...] = (1, 4, 16, 64)
    modes: tuple[str, ...] = ("fused", "max-response")
    seed: int = 0


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


def scratch_store(store: Path, scratch: Path) -> StoreInfo:
    """A folder of links to ``store``'s shards with a copy of its manifest (and failures): an index built there
    leaves ``store`` as it was."""
    info = open_store(store)
    scratch.mkdir(parents=True)
    for shard in range(len(info.shard_rows)):
        shard_path(scratch, shard).symlink_to(shard_path(store, shard).absolute())
    for name in (MANIFEST, FAILURES):
        if (store / name).exists():
            shutil.copyfile(store / name, scratch / name)
    return open_store(scratch)


def store_queries(info: StoreInfo, n: int, seed: int) -> torch.Tensor:
    """A seeded sample of ``n`` of the store's global embeddings (fp32), in store order."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(info.n_rows, size=min(n, info.n_rows), replace=False))
    offsets = np.array(info.offsets())
    picked = []
    for shard in np.unique(np.searchsorted(offsets, rows, side="right") - 1):
        glob = read_shard(info, int(shard), ["global"]).columns["global"]
        mine = rows[(rows >= offsets[shard]) & (rows < offsets[shard] + info.shard_rows[shard])] - offsets[shard]
        picked.append(glob[mine])
    return torch.from_numpy(np.concatenate(picked).astype(np.float32))


def _timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


Search = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Hits = Callable[[torch.Tensor, torch.Tensor], list[list[Hit]]]


def timed_row(name: str, mode: str, search: Search, hits: Hits, queries: torch.Tensor, alone: int,
              exact: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Median ms of the first ``alone`` queries one by one (to rows, then to hits), the whole batch's ms per
    query to hits, and recall@10 against ``exact``."""
    alone = min(alone, len(queries))
    single_rows = [_timed_ms(lambda i=i: search(queries[i : i + 1])) for i in range(alone)]
    single_hits = [_timed_ms(lambda i=i: hits(*search(queries[i : i + 1]))) for i in range(alone)]
    found: list[tuple[torch.Tensor, torch.Tensor]] = []

    def whole_batch() -> None:
        scores, rows = search(queries)
        found.append((scores, rows))
        hits(scores, rows)

    batch_ms = _timed_ms(whole_batch)
    return {"search": name, "mode": mode, "ms_1_query_rows": round(statistics.median(single_rows), 3),
            "ms_1_query_hits": round(statistics.median(single_hits), 3),
            "ms_per_query_batch": round(batch_ms / len(queries), 3), "queries_timed_alone": alone,
            f"recall@{K}": round(recall_at_k(found[0], exact), 4)}


def memory_hits(data: StoreData) -> Hits:
    def hits(scores: torch.Tensor, rows: torch.Tensor) -> list[list[Hit]]:
        return [[Hit(rank=i + 1, score=float(s), id=data.ids[r], meta=data.metas[r])
                 for i, (s, r) in enumerate(zip(q_s, q_r, strict=True)) if r >= 0]
                for q_s, q_r in zip(scores.tolist(), rows.tolist(), strict=True)]

    return hits


def memory_search(data: StoreData, mode: str) -> Search:
    """Exact search over the store held in memory: one scored top-k over all rows (:func:`mpsclip.scoring.topk`
    along the backend of the queries' device), the views converted to fp32 once (as ``mpsclip serve`` holds them:
    a CPU has no fast fp16 matrix product)."""
    views, valid = mode_views(data.columns, mode)
    views, rows = views.float(), torch.arange(len(views))
    return lambda q: topk(q, views, valid, rows, K, backend_for(q.device, mode))


def nlist(index: Any) -> int | None:
    """The inverted lists of a FAISS index, or None when it has none."""
    try:
        return int(import_faiss().extract_index_ivf(index).nlist)
    except RuntimeError:
        return None


def say(text: str) -> None:
    print(f"bench search: {text}", file=sys.stderr, flush=True)


def measure(info: StoreInfo, queries: torch.Tensor, settings: SearchSettings, progress: bool
            ) -> tuple[list[dict], list[dict], float]:
    """Rows of every search × mode, index build records, and the seconds loading the store into memory."""
    hits_from_store: Hits = lambda s, r: to_hits(info, s, r)  # noqa: E731
    exact = {mode: exact_topk(info, queries, K, mode, progress=progress) for mode in settings.modes}
    rows = []
    say("exact streamed search ...")
    for mode in settings.modes:
        search: Search = lambda q, m=mode: exact_topk(info, q, K, m)  # noqa: E731
        rows.append(timed_row("exact (streamed)", mode, search, hits_from_store, queries, ALONE["exact (streamed)"],
                              exact[mode]))
    say("in-memory search ...")
    start = time.perf_counter()
    data = load_store(info.path)
    load_s = time.perf_counter() - start
    for mode in settings.modes:
        rows.append(timed_row("in memory", mode, memory_search(data, mode), memory_hits(data), queries,
                              ALONE["in memory"], exact[mode]))
    del data
    builds = []
    for factory in settings.factories:
        say(f"building the FAISS index {factory or '(default)'} ...")
        record = build_index(info, IndexSettings(factory=factory, seed=settings.seed), progress=progress)
        record["index_mb"] = round((info.path / "index.faiss").stat().st_size / 2**20, 2)
        builds.append(record)
        index = load_index(info)
        if index is None:
            raise MPSCLIPError(f"{info.path}: the index just built cannot be read back")
        lists = nlist(index.index)
        probes = [None] if lists is None else sorted({record["nprobe"], *(p for p in settings.nprobes if p <= lists)})
        for nprobe in probes:
            name = record["factory"] if nprobe is None else f"{record['factory']} nprobe {nprobe}"
            faiss_only = recall_at_k(index.search(queries, K, "fused", candidates=K, nprobe=nprobe), exact["fused"]) \
                if "fused" in exact else None
            for mode in settings.modes:
                search = lambda q, m=mode, p=nprobe, i=index: i.search(q, K, m, nprobe=p)  # noqa: E731
                row = timed_row(name, mode, search, hits_from_store, queries, ALONE["faiss"], exact[mode])
                rows.append({**row, "factory": record["factory"], "nprobe": nprobe,
                             f"faiss_only_recall@{K}": faiss_only})
    return rows, builds, load_s


def markdown(result: dict[str, Any]) -> str:
    m, s, st = result["machine"], result["settings"], result["store"]
    source = f"a synthetic store of clustered vectors (seed {s['seed']})" if s["synthetic"] else f"`{s['store']}`"
    queries = "new draws near its clusters" if s["synthetic"] else "a seeded sample of its own global embeddings"
    lines = [
        "# mpsclip bench search",
        "",
        f"Made by: `{result['command']}`",
        "",
        f"Store: {source}, {st['rows']:,} items, {st['dim']}-d fp16, {st['views']} perspectives, {st['shards']} "
        f"shards. Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"faiss {m['faiss']}; load average {m['load_average']} at the start. {s['queries']} queries ({queries}); "
        f"k = {K}; FAISS candidates re-ranked exactly = {K} x 10. Times are wall-clock ms after the query "
        "embedding: median for one query alone (`rows`: top-k store rows; `hits`: with ids and metas) and the "
        f"whole batch's time over its size. Loading the store into memory took {result['memory_load_s']:.2f} s.",
        *(["", result["note"]] if result.get("note") else []),
        "",
        f"| search | mode | 1 query: rows ms | 1 query: hits ms | per query in a batch ms | recall@{K} "
        f"| FAISS alone recall@{K} (fused) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        alone = r.get(f"faiss_only_recall@{K}")
        lines.append(
            f"| {r['search']} | {r['mode']} | {r['ms_1_query_rows']:.2f} | {r['ms_1_query_hits']:.2f} "
            f"| {r['ms_per_query_batch']:.3f} | {r[f'recall@{K}']:.3f} | {'' if alone is None else f'{alone:.3f}'} |"
        )
    lines += ["", "| index | nprobe (default) | build s (with its recall check) | index.faiss MB |",
              "|---|---:|---:|---:|"]
    for b in result["builds"]:
        lines.append(f"| {b['factory']} | {b['nprobe'] or ''} | {b['build_seconds']:.1f} | {b['index_mb']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(out: Path, result: dict[str, Any]) -> Path:
    """recall_latency.png: recall@10 against one query's ms to rows, one series per mode (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in result["settings"]["modes"]:
        rows = [r for r in result["rows"] if r["mode"] == mode]
        ax.plot([r["ms_1_query_rows"] for r in rows], [r[f"recall@{K}"] for r in rows], "o", label=mode)
        for r in rows:
            label = r["search"] if r.get("nprobe") is None else f"nprobe {r['nprobe']}"
            ax.annotate(label, (r["ms_1_query_rows"], r[f"recall@{K}"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("one query, ms to top-10 rows")
    ax.set_ylabel(f"recall@{K} vs exact")
    ax.set_title(f"search on {result['store']['rows']:,} items")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = save_png(fig, out / "recall_latency.png")
    plt.close(fig)
    return path


def bench_search(settings: SearchSettings, out: Path, progress: bool = True, note: str | None = None
                 ) -> dict[str, Any]:
    """Measure and write ``out``/results.json, results.md and recall_latency.png."""
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="mpsclip-bench-search-") as tmp:
        if settings.synthetic is not None:
            info = synthetic_store(Path(tmp) / "store", settings.synthetic, settings.dim, settings.views,
                                   settings.shard_size, seed=settings.seed, progress=progress)
            queries = synthetic_queries(settings.queries, info.dim, seed=settings.seed)
        else:
            info = scratch_store(Path(str(settings.store)), Path(tmp) / "store")
            queries = store_queries(info, settings.queries, settings.seed)
        rows, builds, load_s = measure(info, queries, settings, progress)
        store = {"rows": info.n_rows, "dim": info.dim, "views": info.views, "shards": len(info.shard_rows)}
    result = {
        "schema": SCHEMA,
        "command": command_line(),
        "note": note,
        "machine": {**machine(torch.device("cpu")), "load_average": load_start,
                    "faiss": import_faiss().__version__},
        "settings": {**asdict(settings), "store": None if settings.store is None else str(settings.store),
                     "queries": len(queries)},
        "store": store,
        "memory_load_s": round(load_s, 3),
        "rows": rows,
        "builds": builds,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / "results.md", markdown(result))
    plot(out, result)
    print(markdown(result), end="")
    return result
