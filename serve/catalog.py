"""The stores a server answers for, each read into memory once: fp16 views per mode, ids, metas, its model.

A store's files are checked by :meth:`Catalog.reload` (the server calls it every ``--reload-every`` seconds and on
``POST /admin/reload``): when its manifest or its shards changed (mtime, size), the finished shards are read into
a new :class:`Store` (shards unchanged since the last version are taken from it, not read again), and only that
complete version replaces the old one. Shard files appear whole or not at all (renamed into place), so a store that
'mpsclip embed' is still writing serves the shards finished so far; a reload that fails keeps the last good version
serving and is reported in ``GET /stores`` and the log.

How a query is scored is :data:`SCORING` (also the OpenAPI description), chosen by :func:`scoring_path`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from mpsclip.archive.dates import Interval
from mpsclip.archive.filters import FilterArrays, item_filter, meta_arrays
from mpsclip.archive.index import (
    CANDIDATE_FACTOR,
    INDEX_JSON,
    StoreIndex,
    index_answers,
    load_index,
)
from mpsclip.archive.search import BBox
from mpsclip.archive.store_reader import VECTOR_COLUMNS, StoreData, StoreInfo, StoreVersion, load_store, store_version
from mpsclip.errors import MPSCLIPError
from mpsclip.scoring import Backend, TopK, backend_for, mode_views, topk

LOG = logging.getLogger("mpsclip.serve")
RELOAD_ERRORS = (MPSCLIPError, OSError, ValueError, KeyError, TypeError, pa.ArrowException)
INDEX_ERRORS = (MPSCLIPError, OSError, ValueError, KeyError, RuntimeError)  # RuntimeError: FAISS's read_index
ScoringPath = Literal["index"] | Backend
SCORING = (
    "Hits are scored as 'mpsclip search' scores them: a store with a FAISS index ('mpsclip index STORE') answers "
    f"through it (the index's top {CANDIDATE_FACTOR} x k rows, at the nprobe it was built with, scored exactly in "
    "the request's mode), except for a request with a bbox, datetime or max_cloud, which is scored exactly among the "
    "items that pass them. A "
    "server started with 'mpsclip serve --exact' scores every request exactly, like 'mpsclip search --exact': exact "
    "scoring is a choice of the server, so that every client of a store gets the same answers. Exact scoring runs on "
    "the GPU with the fused max-over-views top-k kernel when the server has one (--device cuda), else on the CPU. "
    "GET /stores tells which stores have an index in use."
)


@dataclass(frozen=True)
class DiskVersion:
    """What a store folder holds now: its manifest and finished shards, and ``index.json`` (written last by
    'mpsclip index', so it stands for the whole index; None without one) as ``(mtime_ns, size)``."""

    store: StoreVersion
    index: tuple[int, int] | None = None


def _index_version(path: Path) -> tuple[int, int] | None:
    try:
        record = (path / INDEX_JSON).stat()
    except FileNotFoundError:
        return None
    return record.st_mtime_ns, record.st_size


def disk_version(path: Path) -> DiskVersion:
    """The store's :class:`DiskVersion` (a few ``stat`` calls: cheap enough to check every few seconds)."""
    return DiskVersion(store_version(path), _index_version(path))


@dataclass
class Store:
    """One store held in memory: every shard read once; queries score against these tensors only (or through
    the store's index, which re-ranks from them)."""

    name: str
    info: StoreInfo
    ids: list[str]
    metas: list[dict[str, Any]]
    columns: dict[str, np.ndarray]
    row_of: dict[str, int] = field(default_factory=dict)
    model: Any = None
    cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    version: DiskVersion | None = None
    arrays: FilterArrays | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    index: StoreIndex | None = None
    index_error: str | None = None
    """Why the store's index is not used (it could not be loaded), or None."""
    exact: bool = False
    """Score every query exactly even when the store has an index ('mpsclip serve --exact')."""
    pruned: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Rows of items ``mpsclip embed --prune`` recorded as gone: never answered, as in 'mpsclip search'."""

    def views(self, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mode's views (:func:`mpsclip.scoring.mode_views`) as fp32 on the store's device, converted and copied
        there once (CPU fp16 matrix products are many times slower; 'mpsclip search' scores fp32 on a GPU too)."""
        if mode not in self.cache:
            views, valid = mode_views(self.columns, mode)
            on_device = valid.to(self.device) if valid is not None else None
            self.cache[mode] = views.to(self.device).float(), on_device
        return self.cache[mode]

    def filter_arrays(self) -> FilterArrays:
        """The items' footprints, dates and cloud covers, made once per store version: a bbox, date or cloud filter
        is then a few numpy comparisons, not a loop over the metas."""
        if self.arrays is None:
            self.arrays = meta_arrays(self.metas)
        return self.arrays

    def index_status(self) -> dict[str, Any]:
        """What ``GET /stores`` says of the store's index: whether queries use it (``exact``: the server was
        started with --exact), its factory and nprobe, and why it is not used (``error``)."""
        record = self.index.record if self.index is not None else {}
        return {"used": self.index is not None, "exact": self.exact, "factory": record.get("factory"),
                "nprobe": record.get("nprobe"), "error": self.index_error}

    def topk(
        self, queries: torch.Tensor, k: int, mode: str, bbox: BBox | None = None,
        interval: Interval | None = None, max_cloud: float | None = None,
    ) -> TopK:
        """``(scores [Q, k], rows [Q, k])`` on the CPU, padding row -1, as 'mpsclip search' answers: through the
        index where :func:`scoring_path` says so, else exactly as :func:`mpsclip.archive.search.exact_topk`
        (among the items passing ``bbox``, ``interval`` and ``max_cloud``)."""
        path = scoring_path(self.device, mode, self.index is not None, self.exact, bbox, interval, max_cloud)
        return self.topk_by(path, queries, k, mode, bbox, interval, max_cloud)

    def topk_by(
        self, path: ScoringPath, queries: torch.Tensor, k: int, mode: str, bbox: BBox | None = None,
        interval: Interval | None = None, max_cloud: float | None = None,
    ) -> TopK:
        """:meth:`topk` along ``path`` (a :func:`scoring_path` answer: the index, or a backend of
        :func:`mpsclip.scoring.topk`)."""
        if path == "index":
            if self.index is None:
                raise MPSCLIPError(f"store {self.name}: scoring path 'index', but the store has no index loaded")
            return _without(self.index.search(queries, k, mode), self.pruned)
        views, valid = self.views(mode)
        rows = torch.from_numpy(np.arange(len(self.ids)))  # numpy: torch.arange took 9 ms for 100k rows here
        where = item_filter(bbox, interval, max_cloud)
        if where is not None or len(self.pruned):
            chosen = where.rows(self.filter_arrays()) if where is not None else np.arange(len(self.ids))
            keep = torch.from_numpy(chosen[~np.isin(chosen, self.pruned)])
            rows = rows[keep]
            keep_on_device = keep.to(self.device)
            views = views[keep_on_device]
            valid = valid[keep_on_device] if valid is not None else None
        scores, found = topk(queries.to(self.device), views, valid, rows, k, path)
        return scores.cpu(), found.cpu()


def _without(found: TopK, pruned: np.ndarray) -> TopK:
    """An index's ``(scores, rows)`` with pruned rows moved out (padding row -1, score -inf), as search drops them."""
    scores, rows = found
    if not len(pruned):
        return scores, rows
    gone = torch.from_numpy(np.isin(rows.numpy(), pruned))
    order = torch.argsort(gone.to(torch.int8), dim=1, stable=True)  # kept hits first, in their order
    scores = torch.where(gone, torch.tensor(float("-inf")), scores).gather(1, order)
    return scores, torch.where(gone, torch.tensor(-1), rows).gather(1, order)


def scoring_path(
    device: torch.device, mode: str, indexed: bool, exact: bool, bbox: BBox | None,
    interval: Interval | None = None, max_cloud: float | None = None,
) -> ScoringPath:
    """How a query is scored: through the store's index where 'mpsclip search' would use it
    (:func:`~mpsclip.archive.index.index_answers`); else exactly along the backend 'mpsclip search' takes on
    ``device`` (:func:`mpsclip.scoring.backend_for`: on a CUDA device the max-over-views top-k kernel, no ``[Q, N]``
    score tensor, views held there once; on the CPU fused/global by a numpy matrix product, max-response by the
    chunked exact reference)."""
    if indexed and index_answers(exact, bbox, interval, max_cloud):
        return "index"
    return backend_for(device, mode)


def load_store_memory(name: str, path: Path, old: Store | None = None, source_root: Path | None = None) -> Store:
    """The finished shards of the store at ``path`` in memory (:func:`~mpsclip.archive.store_reader.load_store`:
    every shard checked, those unchanged since ``old`` was read taken from ``old``, one version of the files).
    ``source_root`` is where the store's SOURCE lies now (:func:`~mpsclip.archive.store_reader.relocate_source`)."""
    index = _index_version(path)
    data = load_store(path, source_root, _held(old), finished_shards=True)
    rows = {item_id: row for row, item_id in enumerate(data.ids)}
    return Store(name, data.info, data.ids, data.metas, data.columns, rows, version=DiskVersion(data.version, index),
                 pruned=data.pruned)


def _held(store: Store | None) -> StoreData | None:
    """What ``store`` holds, as the reader gave it (None: nothing to reuse)."""
    if store is None or store.version is None:
        return None
    return StoreData(store.info, store.ids, store.metas, store.columns, store.version.store, store.pruned)


def store_names(paths: list[Path]) -> list[str]:
    """Folder names, with ``-2``, ``-3``... added to repeated ones."""
    names: list[str] = []
    for path in paths:
        base, name, n = path.resolve().name, path.resolve().name, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


@dataclass
class Health:
    """How a store's last reloads went (times: ``time.time()``)."""

    loaded_at: float
    checked_at: float
    error: str | None = None
    failed_at: float | None = None

    def as_json(self) -> dict[str, Any]:
        def iso(t: float | None) -> str | None:
            return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

        return {"loaded_at": iso(self.loaded_at), "checked_at": iso(self.checked_at), "error": self.error,
                "failed_at": iso(self.failed_at)}


def served_index(store: Store, old: Store | None) -> tuple[StoreIndex | None, str | None]:
    """The index ``store`` answers through and why there is none: ``old``'s when the files are the ones it was
    read from (an index is read once per store version), else :func:`~mpsclip.archive.index.load_index`, whose
    candidates are re-ranked from the columns ``store`` holds (not from the index's memory-mapped copies). An index
    that cannot be used (built for another state of the store, files missing, FAISS not installed) is logged and
    the store is scored exactly: a store being extended by 'mpsclip embed' keeps serving its new shards."""
    vectors = {c: store.columns[c] for c in VECTOR_COLUMNS}
    if old is not None and old.version is not None and old.version == store.version:
        if old.index is None:
            return None, old.index_error
        return StoreIndex(store.info, old.index.index, old.index.record, vectors), None  # not old's columns
    try:
        return load_index(store.info, vectors), None
    except INDEX_ERRORS as err:
        error = f"{type(err).__name__}: {err}"
        LOG.warning("store %s: its index is not used, queries are scored exactly: %s", store.name, error)
        return None, error


class Catalog:
    """The served stores by name; the first is the default. A store that cannot be read at start is an error;
    later, :meth:`reload` keeps the last good version of a store it cannot read. Stores are scored on ``device``
    (views held there once), through their index unless ``exact`` (:func:`scoring_path`)."""

    def __init__(
        self, paths: list[Path], model_loader: Any = None, source_roots: Sequence[Path] | None = None,
        device: torch.device | str = "cpu", exact: bool = False,
    ) -> None:
        if not paths:
            raise MPSCLIPError("no store to serve: give one or more store folders made by 'mpsclip embed'")
        if source_roots and len(source_roots) != len(paths):
            raise MPSCLIPError(
                f"--source-root: give one per STORE, in the same order ({len(paths)} stores, {len(source_roots)} "
                "folders)"
            )
        self.paths = paths
        self.model_loader = model_loader
        self.device = torch.device(device)
        self.exact = exact
        self.names = store_names(paths)
        roots: list[Path | None] = list(source_roots) if source_roots else [None] * len(paths)
        self.source_roots = dict(zip(self.names, roots, strict=True))
        self.stores: dict[str, Store] = {}
        self.health: dict[str, Health] = {}
        self._lock = threading.Lock()
        for name, path in zip(self.names, paths, strict=True):
            self.stores[name] = self._load(name, path, None)
            self.health[name] = Health(time.time(), time.time())

    def reload(self, force: bool = False) -> dict[str, str]:
        """Check every store's files and swap in a new version of those that changed (all with ``force``):
        ``{name: "unchanged" | "reloaded" | "failed: <why>"}``. Runs one at a time; queries meanwhile keep the
        version they started with."""
        with self._lock:
            named = zip(self.names, self.paths, strict=True)
            return {name: self._reload_one(name, path, force) for name, path in named}

    def _reload_one(self, name: str, path: Path, force: bool) -> str:
        old, health = self.stores[name], self.health[name]
        health.checked_at = time.time()
        try:
            if not force and disk_version(path) == old.version:
                health.error = health.failed_at = None  # the files are the version served: nothing is wrong now
                return "unchanged"
            new = self._load(name, path, old)
        except RELOAD_ERRORS as err:
            health.error, health.failed_at = f"{type(err).__name__}: {err}", time.time()
            LOG.warning("store %s: reload failed, still serving the version of %s (%d items): %s",
                        name, time.ctime(health.loaded_at), len(old.ids), health.error)
            return f"failed: {health.error}"
        for mode in list(old.cache):  # the first query after the swap should not pay for the conversion
            new.views(mode)
        self.stores = {**self.stores, name: new}
        health.loaded_at, health.error, health.failed_at = time.time(), None, None
        LOG.info("store %s: reloaded, %d items in %d shards", name, len(new.ids), len(new.info.shard_rows))
        return "reloaded"

    def _load(self, name: str, path: Path, old: Store | None) -> Store:
        store = load_store_memory(name, path, old, self.source_roots[name])
        store.device, store.exact = self.device, self.exact
        store.index, store.index_error = (None, None) if self.exact else served_index(store, old)
        digest = store.info.manifest["checkpoint_sha256"]
        same = old is not None and old.info.manifest["checkpoint_sha256"] == digest
        store.model = old.model if same else (self.model_loader(store.info) if self.model_loader else None)
        return store

    @property
    def default(self) -> str:
        return next(iter(self.stores))

    def get(self, name: str | None) -> Store:
        name = name or self.default
        if name not in self.stores:
            raise KeyError(f"store: unknown store {name!r}; served: {', '.join(self.stores)}")
        return self.stores[name]
