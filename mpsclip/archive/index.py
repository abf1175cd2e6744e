"""An optional FAISS index over a store's retrieval embeddings, for stores too large for exhaustive search.

``mpsclip index`` writes into the store folder ``index.faiss`` (any ``faiss.index_factory`` string, inner-product
metric), ``index.<column>.npy`` (the store's embeddings as memory-mapped fp16 arrays, for re-ranking) and, last,
``index.json`` (factory, nprobe, the store's identity and the recall@10 measured against exact search). A search
takes the index's top candidates for the query and scores them exactly in the chosen mode, so the only
approximation is which rows become candidates. An index whose store has changed is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mpsclip.archive.search import MODE_COLUMNS, MODES, BBox, check_mode, exact_topk, mode_views, scored_topk
from mpsclip.archive.store import MANIFEST, StoreInfo, read_shard
from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write

INDEX_FILE = "index.faiss"
INDEX_JSON = "index.json"
VECTOR_COLUMNS = ("retrieval", "global", "perspectives", "valid")
CANDIDATE_FACTOR = 10  # candidates re-ranked per requested hit unless --candidates says otherwise
RECALL_K = 10
ADD_CHUNK = 65536  # rows added to FAISS at once


@dataclass(frozen=True)
class IndexSettings:
    """How ``mpsclip index`` builds: ``factory`` None picks :func:`default_factory`, ``nprobe`` None
    :func:`default_nprobe`; training uses at most ``train_rows`` rows and recall ``recall_queries`` store rows."""

    factory: str | None = None
    nprobe: int | None = None
    train_rows: int = 100_000
    recall_queries: int = 200
    seed: int = 0


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as err:
        raise MPSCLIPError("FAISS is not installed: pip install 'mpsclip[index]' (faiss-cpu)") from err
    return faiss


def vector_path(store: Path, column: str) -> Path:
    return store / f"index.{column}.npy"


def default_factory(n_rows: int, dim: int) -> str:
    """``Flat`` below 50,000 rows; above, about 4·√n inverted lists (a power of two) holding 4-bit fast-scan
    PQ codes of ``dim/4`` bytes (``IVF1024,PQ128x4fs`` for 100,000 512-d rows), quick to train on a CPU."""
    if n_rows < 50_000:
        return "Flat"
    lists = 2 ** round(math.log2(4 * math.sqrt(n_rows)))
    return f"IVF{lists},PQ{dim // 4}x4fs" if dim % 4 == 0 else f"IVF{lists},Flat"


def _ivf(index: Any) -> Any | None:
    """The IVF part of ``index`` (whose ``nprobe`` is the search breadth), or None for other index types."""
    faiss = import_faiss()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def default_nprobe(index: Any) -> int | None:
    """1/16 of the inverted lists, at least 16 (None for an index without lists)."""
    ivf = _ivf(index)
    return None if ivf is None else min(ivf.nlist, max(16, ivf.nlist // 16))


def store_identity(info: StoreInfo) -> dict[str, Any]:
    """What an index must match to be used: the manifest's hash and every shard's row count."""
    digest = hashlib.sha256((info.path / MANIFEST).read_bytes()).hexdigest()
    return {"manifest_sha256": digest, "shard_rows": list(info.shard_rows), "rows": info.n_rows}


def _column_shape(info: StoreInfo, column: str) -> tuple[tuple[int, ...], type]:
    if column in ("retrieval", "global"):
        return (info.n_rows, info.dim), np.float16
    if column == "perspectives":
        return (info.n_rows, info.views, info.dim), np.float16
    return (info.n_rows, info.views), np.bool_


def _write_vectors(info: StoreInfo, column: str, progress: bool) -> None:
    """The store's ``column`` as one ``.npy`` array (streamed shard by shard, written atomically)."""
    shape, dtype = _column_shape(info, column)

    def fill(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        shards = zip(range(len(info.shard_rows)), info.offsets(), strict=True)
        for shard, offset in tqdm(list(shards), desc=f"copy {column}", unit="shard", disable=not progress):
            values = read_shard(info, shard, [column])[column]
            out[offset : offset + len(values)] = values
        out.flush()
        del out

    atomic_write(vector_path(info.path, column), fill)


class StoreIndex:
    """A loaded index: FAISS candidates on the retrieval embeddings, exact re-ranking from the memory-mapped arrays
    (or from ``vectors``, the store's :data:`VECTOR_COLUMNS` already in memory, as 'mpsclip serve' holds them)."""

    def __init__(
        self, info: StoreInfo, index: Any, record: dict[str, Any], vectors: dict[str, np.ndarray] | None = None
    ) -> None:
        self.info = info
        self.index = index
        self.record = record
        if vectors is None:
            vectors = {c: np.load(vector_path(info.path, c), mmap_mode="r") for c in VECTOR_COLUMNS}
        self.vectors = vectors

    def candidates(self, queries: torch.Tensor, n: int, nprobe: int | None = None) -> np.ndarray:
        """Top-``n`` store rows per query by FAISS on the retrieval embeddings ``[Q, n]`` (``-1``: none)."""
        ivf = _ivf(self.index)
        if ivf is not None:
            ivf.nprobe = nprobe or self.record["nprobe"]
        elif nprobe is not None:
            raise MPSCLIPError(f"--nprobe: the index {self.record['factory']!r} has no inverted lists to probe")
        x = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        _, rows = self.index.search(x, min(n, self.info.n_rows))
        return rows

    def search(
        self, queries: torch.Tensor, k: int, mode: str, candidates: int | None = None, nprobe: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` of ``candidates`` (default ``k`` × 10) FAISS rows per query, scored exactly in ``mode``:
        ``(scores [Q, k], store rows [Q, k])`` like :func:`mpsclip.archive.search.exact_topk`."""
        check_mode(mode)
        if k < 1:
            raise MPSCLIPError(f"-k must be 1 or more, got {k}")
        if candidates is not None and candidates < k:
            raise MPSCLIPError(f"--candidates must be at least -k ({k}), got {candidates}")
        queries = queries.detach().float().cpu()
        found = self.candidates(queries, candidates or k * CANDIDATE_FACTOR, nprobe)
        scores = torch.full((len(queries), k), float("-inf"))
        rows = torch.full((len(queries), k), -1, dtype=torch.int64)
        for q, q_rows in enumerate(found):
            q_rows = np.unique(q_rows[q_rows >= 0])  # ascending: ties go to the lower row as in exact search
            if len(q_rows) == 0:
                continue
            columns = {c: np.asarray(self.vectors[c][q_rows]) for c in MODE_COLUMNS[mode]}
            views, valid = mode_views(columns, mode)
            s, r = scored_topk(queries[q : q + 1], views, valid, torch.from_numpy(q_rows), k)
            scores[q], rows[q] = s[0], r[0]
        return scores, rows


def index_answers(exact: bool, bbox: BBox | None) -> bool:
    """Whether a query is answered through its store's index, when the store has one (every mode is: the index
    proposes candidates, the mode scores them): not when exact scoring is asked for (``--exact``), nor with a
    ``bbox``, which is searched exhaustively among the items in the box. 'mpsclip search' and 'mpsclip serve'
    both decide here."""
    return not exact and bbox is None


def load_index(info: StoreInfo, vectors: dict[str, np.ndarray] | None = None) -> StoreIndex | None:
    """The store's index, or None if it has none; raises :class:`MPSCLIPError` if it is stale or incomplete.
    ``vectors``: the store's columns in store order, to re-rank from instead of the index's ``.npy`` copies."""
    record_path = info.path / INDEX_JSON
    if not record_path.exists():
        return None
    faiss = import_faiss()
    record = json.loads(record_path.read_text(encoding="utf-8"))
    redo = f"rebuild it with 'mpsclip index {info.path}', or search with --exact"
    if record.get("store") != store_identity(info):
        raise MPSCLIPError(f"{record_path}: the index was built for another state of the store; {redo}")
    files = [info.path / INDEX_FILE, *(vector_path(info.path, c) for c in VECTOR_COLUMNS)]
    missing = [path.name for path in files if not path.exists()]
    if missing:
        raise MPSCLIPError(f"{info.path}: the index files {', '.join(missing)} are missing; {redo}")
    return StoreIndex(info, faiss.read_index(str(info.path / INDEX_FILE)), record, vectors)


def _new_index(info: StoreInfo, factory: str) -> Any:
    faiss = import_faiss()
    try:
        return faiss.index_factory(info.dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise MPSCLIPError(f"--faiss {factory!r}: not a FAISS index_factory string for {info.dim}-d vectors") from err


def _train_and_fill(info: StoreInfo, index: Any, factory: str, settings: IndexSettings, progress: bool) -> int:
    """Train ``index`` on a seeded sample of the retrieval embeddings and add them all (FAISS id = store row);
    returns the number of training rows."""
    vectors = np.load(vector_path(info.path, "retrieval"), mmap_mode="r")
    rng = np.random.default_rng(settings.seed)
    sample = np.sort(rng.choice(info.n_rows, size=min(info.n_rows, settings.train_rows), replace=False))
    if not index.is_trained:
        try:
            index.train(np.asarray(vectors[sample], dtype=np.float32))
        except RuntimeError as err:
            raise MPSCLIPError(
                f"--faiss {factory!r}: FAISS cannot train it on {len(sample)} vectors ({str(err).splitlines()[-1]}); "
                "use fewer inverted lists or PQ codes, or 'Flat' for a small store"
            ) from err
    for start in tqdm(range(0, info.n_rows, ADD_CHUNK), desc="index", unit="chunk", disable=not progress):
        index.add(np.asarray(vectors[start : start + ADD_CHUNK], dtype=np.float32))
    return len(sample)


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of each query's exact top rows (``-1`` padding aside) found among its approximate ones."""
    found = []
    for a, e in zip(approx.tolist(), exact.tolist(), strict=True):
        want = {r for r in e if r >= 0}
        found.append(len(want & set(a)) / len(want) if want else 1.0)
    return float(np.mean(found)) if found else float("nan")


def measure_recall(
    index: StoreIndex, queries: torch.Tensor, k: int = RECALL_K, progress: bool = False
) -> dict[str, float]:
    """Recall@k of index search (candidates re-ranked exactly) against exhaustive search, per mode, and of
    the raw FAISS top-k against exact fused search (``faiss only``)."""
    recall = {}
    for mode in MODES:
        _, exact = exact_topk(index.info, queries, k, mode, progress=progress)
        recall[mode] = recall_at_k(index.search(queries, k, mode)[1], exact)
        if mode == "fused":
            recall["faiss only"] = recall_at_k(torch.from_numpy(index.candidates(queries, k)), exact)
    return recall


def build_index(
    info: StoreInfo, settings: IndexSettings, text_queries: torch.Tensor | None = None, progress: bool = True
) -> dict[str, Any]:
    """Build and write the store's index (``index.json`` last, so a killed build leaves no usable index) and
    return its record, with recall@10 for a seeded sample of the store's global embeddings as queries and,
    if given, for ``text_queries``."""
    faiss = import_faiss()
    start = time.perf_counter()
    factory = settings.factory or default_factory(info.n_rows, info.dim)
    index = _new_index(info, factory)
    if settings.nprobe is not None and _ivf(index) is None:
        raise MPSCLIPError(f"--nprobe: the index {factory!r} has no inverted lists to probe; drop --nprobe")
    (info.path / INDEX_JSON).unlink(missing_ok=True)
    for column in VECTOR_COLUMNS:
        _write_vectors(info, column, progress)
    n_train = _train_and_fill(info, index, factory, settings, progress)
    nprobe = settings.nprobe or default_nprobe(index)
    atomic_write(info.path / INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)))
    record: dict[str, Any] = {
        "factory": factory,
        "metric": "inner_product",
        "embedding": "retrieval",
        "nprobe": nprobe,
        "candidate_factor": CANDIDATE_FACTOR,
        "train_rows": n_train,
        "store": store_identity(info),
        "faiss_version": faiss.__version__,
    }
    loaded = StoreIndex(info, index, record)
    rng = np.random.default_rng(settings.seed + 1)
    sample = np.sort(rng.choice(info.n_rows, size=min(info.n_rows, settings.recall_queries), replace=False))
    query_sets = {"store sample": torch.from_numpy(np.asarray(loaded.vectors["global"][sample], dtype=np.float32))}
    if text_queries is not None and len(text_queries):
        query_sets["text"] = text_queries.float().cpu()
    record["recall_queries"] = {name: len(q) for name, q in query_sets.items()}
    record[f"recall@{RECALL_K}"] = {
        name: measure_recall(loaded, q, progress=progress) for name, q in query_sets.items()
    }
    record["build_seconds"] = round(time.perf_counter() - start, 2)
    atomic_write(info.path / INDEX_JSON, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
