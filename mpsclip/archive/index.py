"""An optional FAISS index over a store's retrieval embeddings, for stores too large for exhaustive search.

``mpsclip index`` writes into the store folder ``index.faiss`` (any ``faiss.index_factory`` string, inner-product
metric), ``index.<column>.npy`` (the store's embeddings as memory-mapped fp16 arrays, for re-ranking) and, last,
``index.json`` (factory, nprobe, the store's identity and the recall@10 measured against exact search). A search
takes the index's top candidates for the query and scores them exactly in the chosen mode, so the only
approximation is which rows become candidates. An index whose store has changed is refused.

Stores grow by new shards appended after unchanged ones; :func:`update_index` then adds the new shards' rows to the
index as it is (a trained IVF keeps its centroids and codebooks: no retraining), extends the ``.npy`` copies,
measures recall again and records it. An index covering only the first shards of a store is refused until updated.
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

from mpsclip.archive.dates import Interval
from mpsclip.archive.filters import item_filter
from mpsclip.archive.search import BBox, exact_topk
from mpsclip.archive.store import MANIFEST, shard_path
from mpsclip.archive.store_reader import VECTOR_COLUMNS, StoreInfo, stream
from mpsclip.checkpoints import file_sha256
from mpsclip.choices import MODES
from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write
from mpsclip.scoring import MODE_COLUMNS, backend_for, check_mode, mode_views, topk

INDEX_FILE = "index.faiss"
INDEX_JSON = "index.json"
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


def shard_digests(info: StoreInfo, shards: range) -> list[str]:
    """sha256 of the files of ``shards``: what :func:`update_index` checks before adding to an index."""
    return [file_sha256(shard_path(info.path, shard)) for shard in shards]


def _column_shape(info: StoreInfo, column: str) -> tuple[tuple[int, ...], type]:
    if column in ("retrieval", "global"):
        return (info.n_rows, info.dim), np.float16
    if column == "perspectives":
        return (info.n_rows, info.views, info.dim), np.float16
    return (info.n_rows, info.views), np.bool_


def _write_vectors(info: StoreInfo, column: str, progress: bool, kept_shards: int = 0) -> None:
    """The store's ``column`` as one ``.npy`` array (streamed shard by shard, written atomically); the rows of the
    first ``kept_shards`` shards are copied from the present array instead of the shards."""
    shape, dtype = _column_shape(info, column)
    kept_rows = sum(info.shard_rows[:kept_shards])

    def fill(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        if kept_rows:
            present = np.load(vector_path(info.path, column), mmap_mode="r")
            for start in range(0, kept_rows, ADD_CHUNK):
                stop = min(kept_rows, start + ADD_CHUNK)
                out[start:stop] = present[start:stop]
            del present
        shards = range(kept_shards, len(info.shard_rows))
        for part in stream(info, [column], shards=shards, progress=f"copy {column}" if progress else None):
            out[part.offset : part.offset + len(part.columns[column])] = part.columns[column]
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
        backend = backend_for(queries.device, mode)
        found = self.candidates(queries, candidates or k * CANDIDATE_FACTOR, nprobe)
        scores = torch.full((len(queries), k), float("-inf"))
        rows = torch.full((len(queries), k), -1, dtype=torch.int64)
        for q, q_rows in enumerate(found):
            q_rows = np.unique(q_rows[q_rows >= 0])  # ascending: ties go to the lower row as in exact search
            if len(q_rows) == 0:
                continue
            columns = {c: np.asarray(self.vectors[c][q_rows]) for c in MODE_COLUMNS[mode]}
            views, valid = mode_views(columns, mode)
            s, r = topk(queries[q : q + 1], views, valid, torch.from_numpy(q_rows), k, backend)
            scores[q], rows[q] = s[0], r[0]
        return scores, rows


def index_answers(
    exact: bool, bbox: BBox | None, interval: Interval | None = None, max_cloud: float | None = None
) -> bool:
    """Whether a query is answered through its store's index, when the store has one (every mode is: the index
    proposes candidates, the mode scores them): not when exact scoring is asked for (``--exact``), nor with a
    ``bbox``, a date ``interval`` or a ``max_cloud``, which are searched exhaustively among the items that pass.
    'mpsclip search' and 'mpsclip serve' both decide here."""
    return not exact and item_filter(bbox, interval, max_cloud) is None


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
        covered = _covered_shards(record, info)
        if covered is not None and covered < len(info.shard_rows):
            raise MPSCLIPError(
                f"{record_path}: the index covers the first {covered} of the store's {len(info.shard_rows)} shards "
                f"({record['store']['rows']} of {info.n_rows} items); add the new shards to it with "
                f"'mpsclip index {info.path}', or search with --exact"
            )
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


def _train(info: StoreInfo, index: Any, factory: str, settings: IndexSettings) -> int:
    """Train ``index`` (if it needs training) on a seeded sample of the retrieval embeddings; returns the number
    of training rows."""
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
    return len(sample)


def _add_rows(info: StoreInfo, index: Any, first_row: int, progress: bool) -> None:
    """Add the retrieval embeddings of store rows ``first_row`` onwards to ``index`` (FAISS id = store row)."""
    vectors = np.load(vector_path(info.path, "retrieval"), mmap_mode="r")
    for start in tqdm(range(first_row, info.n_rows, ADD_CHUNK), desc="index", unit="chunk", disable=not progress):
        index.add(np.asarray(vectors[start : start + ADD_CHUNK], dtype=np.float32))


def _check_nprobe(settings: IndexSettings, index: Any, factory: str) -> None:
    if settings.nprobe is not None and _ivf(index) is None:
        raise MPSCLIPError(f"--nprobe: the index {factory!r} has no inverted lists to probe; drop --nprobe")


TIE_TOLERANCE = 1e-5
"""Scores this close to a query's k-th exact score count as tied with it (the same fp16 vectors scored in two
calls may differ in the last float bits)."""


Ranked = tuple[torch.Tensor, torch.Tensor]
"""``(scores [Q, k], store rows [Q, k])`` as :func:`~mpsclip.archive.search.exact_topk` returns them."""


def recall_at_k(approx: Ranked, exact: Ranked) -> float:
    """Mean fraction of each query's exact top-k rows (``-1`` padding aside) that the approximate top-k matches,
    ties counted as equal: an approximate row is a correct hit when it is among the exact rows or scores as high
    as the exact k-th (within :data:`TIE_TOLERANCE`), since exact search then breaks the tie only by row order.
    The approximate scores must be exact scores of their rows (as :meth:`StoreIndex.search` re-ranks them)."""
    found = []
    for a_scores, a_rows, e_scores, e_rows in zip(*(t.tolist() for t in (*approx, *exact)), strict=True):
        want = {r for r in e_rows if r >= 0}
        if not want:
            found.append(1.0)
            continue
        kth = min(s for s, r in zip(e_scores, e_rows, strict=True) if r >= 0)
        hits = {r for r, s in zip(a_rows, a_scores, strict=True) if r >= 0 and (r in want or s >= kth - TIE_TOLERANCE)}
        found.append(min(len(hits), len(want)) / len(want))
    return float(np.mean(found)) if found else float("nan")


def measure_recall(
    index: StoreIndex, queries: torch.Tensor, k: int = RECALL_K, progress: bool = False
) -> dict[str, float]:
    """Recall@k of index search (candidates re-ranked exactly) against exhaustive search, per mode, and of
    the raw FAISS top-k against exact fused search (``faiss only``: the same rows, scored exactly so that ties
    count; :func:`recall_at_k`)."""
    recall = {}
    for mode in MODES:
        exact = exact_topk(index.info, queries, k, mode, progress=progress)
        recall[mode] = recall_at_k(index.search(queries, k, mode), exact)
        if mode == "fused":
            recall["faiss only"] = recall_at_k(index.search(queries, k, mode, candidates=k), exact)
    return recall


def _write_index(
    info: StoreInfo,
    index: Any,
    record: dict[str, Any],
    settings: IndexSettings,
    text_queries: torch.Tensor | None,
    progress: bool,
) -> None:
    """Write ``index.faiss`` and measure recall@10 into ``record`` for a seeded sample of the store's global
    embeddings as queries and, if given, for ``text_queries`` (``index.json`` is the caller's, written last)."""
    faiss = import_faiss()
    atomic_write(info.path / INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)))
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


def _write_record(info: StoreInfo, record: dict[str, Any]) -> None:
    atomic_write(info.path / INDEX_JSON, json.dumps(record, indent=2, sort_keys=True) + "\n")


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
    _check_nprobe(settings, index, factory)
    (info.path / INDEX_JSON).unlink(missing_ok=True)
    for column in VECTOR_COLUMNS:
        _write_vectors(info, column, progress)
    n_train = _train(info, index, factory, settings)
    _add_rows(info, index, 0, progress)
    record: dict[str, Any] = {
        "factory": factory,
        "metric": "inner_product",
        "embedding": "retrieval",
        "nprobe": settings.nprobe or default_nprobe(index),
        "candidate_factor": CANDIDATE_FACTOR,
        "train_rows": n_train,
        "rows_at_training": info.n_rows,
        "store": store_identity(info),
        "shard_sha256": shard_digests(info, range(len(info.shard_rows))),
        "faiss_version": faiss.__version__,
    }
    _write_index(info, index, record, settings, text_queries, progress)
    record["build_seconds"] = round(time.perf_counter() - start, 2)
    _write_record(info, record)
    return record


@dataclass(frozen=True)
class IndexUpdate:
    """What :func:`update_index` did: ``action`` is ``built`` (from scratch, ``reason`` says why), ``added`` (the
    new shards' rows added, ``rows_added``) or ``current`` (nothing to do); ``record`` is the index's record."""

    record: dict[str, Any]
    action: str
    reason: str = ""
    rows_added: int = 0


def _covered_shards(record: dict[str, Any], info: StoreInfo) -> int | None:
    """How many of the store's first shards the index was built over, if its shard row counts are those of the
    store's first shards (the store may have grown since), else None."""
    rows = record.get("store", {}).get("shard_rows")
    if not isinstance(rows, list) or rows != list(info.shard_rows[: len(rows)]):
        return None
    return len(rows)


def _why_not_extendable(info: StoreInfo, settings: IndexSettings, record: dict[str, Any] | None) -> str | None:
    """Why the store's index cannot be updated by adding rows (then it is built again), or None if it can."""
    if record is None:
        return "the store has no index yet"
    if settings.factory is not None and settings.factory != record.get("factory"):
        return f"--faiss {settings.factory!r} differs from the index's {record.get('factory')!r}"
    covered = _covered_shards(record, info)
    if covered is None or "shard_sha256" not in record:
        return "the index was built for another state of the store (not the same first shards)"
    files = [info.path / INDEX_FILE, *(vector_path(info.path, c) for c in VECTOR_COLUMNS)]
    if not all(path.exists() for path in files):
        return "index files are missing"
    if record["shard_sha256"] != shard_digests(info, range(covered)):
        return "shards the index covers were rewritten since it was built"
    return None


def update_index(
    info: StoreInfo, settings: IndexSettings, text_queries: torch.Tensor | None = None, progress: bool = True
) -> IndexUpdate:
    """Bring the store's index up to date: when the store only gained shards after those the index covers
    (checked by their sha256), add the new rows to the index as it is (no retraining), extend the ``.npy``
    copies, measure recall again and record it with the update; otherwise :func:`build_index`. Nothing is
    written when the index already covers the store as it is (unless ``settings.nprobe`` or ``text_queries``
    ask for a new record)."""
    faiss = import_faiss()
    start = time.perf_counter()
    record_path = info.path / INDEX_JSON
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.exists() else None
    reason = _why_not_extendable(info, settings, record)
    index = None
    if reason is None and record is not None:
        index = faiss.read_index(str(info.path / INDEX_FILE))
        if index.ntotal != record["store"]["rows"]:
            reason = f"index.faiss holds {index.ntotal} rows, index.json says {record['store']['rows']}"
    if reason is not None or record is None or index is None:
        return IndexUpdate(build_index(info, settings, text_queries, progress), "built", reason or "")
    _check_nprobe(settings, index, record["factory"])
    nprobe = settings.nprobe or record["nprobe"]
    if record["store"] == store_identity(info) and nprobe == record["nprobe"] and text_queries is None:
        return IndexUpdate(record, "current", "the index covers every item of the store")
    covered, old_rows = len(record["store"]["shard_rows"]), index.ntotal
    for column in VECTOR_COLUMNS:
        _write_vectors(info, column, progress, kept_shards=covered)
    _add_rows(info, index, old_rows, progress)
    digests = record["shard_sha256"] + shard_digests(info, range(covered, len(info.shard_rows)))
    record = {**record, "nprobe": nprobe, "store": store_identity(info), "shard_sha256": digests}
    _write_index(info, index, record, settings, text_queries, progress)
    added = info.n_rows - old_rows
    update = {"rows_added": added, "rows": info.n_rows, "seconds": round(time.perf_counter() - start, 2)}
    record["updates"] = [*record.get("updates", []), update]
    _write_record(info, record)
    return IndexUpdate(record, "added", rows_added=added)
