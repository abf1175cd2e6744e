"""Answering a list of search queries (one for ``POST /search``, up to 64 for ``/search/batch``): every text and
image query goes to the encoder in ONE call, and queries asking the same store the same way (mode, k, filters)
are scored together as one ``[Q, D]`` matrix through :meth:`~mpsclip.serve.catalog.Store.topk`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import torch
from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from mpsclip.serve import metrics
from mpsclip.serve.batching import Overloaded
from mpsclip.serve.catalog import Catalog, Store
from mpsclip.serve.deps import item_row, store_named
from mpsclip.serve.encoders import Kind, Query, QueryEncoder
from mpsclip.serve.queries import SearchRequest, bad, decode_base64_image
from PIL import Image

from mpsclip.archive.dates import parse_interval
from mpsclip.archive.geoparquet import geojson_geometry
from mpsclip.archive.search import footprint

RETRY_AFTER_S = "1"


@dataclass
class Planned:
    """One query made ready: its store, and either its vector (an embedding or a stored item's) or what the
    towers must encode."""

    req: SearchRequest
    store: Store
    vector: torch.Tensor | None = None
    kind: Kind | None = None
    query: Query | None = None

    def group(self) -> tuple[Any, ...]:
        """Queries with equal keys are scored in one :meth:`Store.topk` call."""
        bbox = tuple(self.req.bbox) if self.req.bbox is not None else None
        return id(self.store), self.req.mode, self.req.k, bbox, self.req.datetime, self.req.max_cloud


def polygon(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The item's footprint as RFC 7946 geometry (a MultiPolygon across the antimeridian), or None."""
    fp = footprint(meta)
    return None if fp is None else geojson_geometry(fp)


def thumbnail_url(store: str, item_id: str) -> str:
    return f"/items/{quote(store)}/{quote(item_id)}/thumbnail"


async def plan(req: SearchRequest, catalog: Catalog, image: Image.Image | None) -> Planned:
    """``req`` checked against its store (404/422/503 naming what is wrong); ``image``: the upload's, decoded."""
    store = store_named(catalog, req.store)
    if req.embedding is not None:
        vec = torch.tensor(req.embedding, dtype=torch.float32)
        if vec.shape[0] != store.info.dim or not torch.isfinite(vec).all():
            raise bad(f"embedding: expected {store.info.dim} finite numbers, got {vec.shape[0]}")
        norm = vec.norm()
        if norm == 0:
            raise bad("embedding: the zero vector cannot be searched with")
        return Planned(req, store, vector=vec / norm)
    if req.item_id is not None:
        row = item_row(store, req.item_id)
        return Planned(req, store, vector=torch.from_numpy(store.columns["global"][row]).float())
    if req.image is not None and image is None:
        image = await run_in_threadpool(decode_base64_image, req.image)
    if store.model is None:
        raise bad("text/image queries need the store's model, which this server did not load", 503)
    if req.text is not None:
        return Planned(req, store, kind="text", query=req.text)
    return Planned(req, store, kind="image", query=image)


async def encode(planned: list[Planned], encoder: QueryEncoder) -> None:
    """Fill in the vectors of the text and image queries among ``planned`` with one encoder call (503 when the
    encoder's queue is full)."""
    todo = [p for p in planned if p.vector is None]
    if not todo:
        return
    metrics.QUEUE.set(encoder.depth)
    try:
        vectors = await encoder.encode_many([(p.store, p.kind, p.query) for p in todo])  # type: ignore[misc]
    except Overloaded as err:
        metrics.ERRORS.labels("overloaded").inc()
        raise HTTPException(503, "server overloaded: retry later", headers={"Retry-After": RETRY_AFTER_S}) from err
    for p, vec in zip(todo, vectors, strict=True):
        p.vector = vec


def hits_of(store: Store, scores: torch.Tensor, rows: torch.Tensor) -> list[dict[str, Any]]:
    """One query's ``scores [k]`` and ``rows [k]`` (padding row -1) as the API lists hits."""
    hits: list[dict[str, Any]] = []
    for score, row in zip(scores.tolist(), rows.tolist(), strict=True):
        if row < 0:
            break
        item_id, meta = store.ids[row], store.metas[row]
        hits.append({
            "rank": len(hits) + 1, "score": float(score), "id": item_id, "store": store.name,
            "keywords": list(meta.get("keywords") or []), "footprint": polygon(meta),
            "thumbnail_url": thumbnail_url(store.name, item_id), "scene": meta.get("scene"),
            "datetime": meta.get("datetime"),
        })
    return hits


def score(planned: Sequence[Planned]) -> tuple[list[list[dict[str, Any]]], list[float]]:
    """Each query's hits and the seconds its group took to score: one :meth:`Store.topk` call per group of queries
    sharing store, mode, k and filters (run in a worker thread)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(planned):
        groups.setdefault(p.group(), []).append(i)
    hits: list[list[dict[str, Any]]] = [[] for _ in planned]
    seconds = [0.0] * len(planned)
    for positions in groups.values():
        start = time.perf_counter()
        first = planned[positions[0]]
        req, store = first.req, first.store
        bbox = tuple(req.bbox) if req.bbox is not None else None
        interval = parse_interval(req.datetime) if req.datetime is not None else None
        queries = torch.stack([planned[i].vector for i in positions])  # type: ignore[misc]
        scores, rows = store.topk(queries, req.k, req.mode, bbox, interval, req.max_cloud)
        for q, i in enumerate(positions):
            hits[i] = hits_of(store, scores[q], rows[q])
        took = time.perf_counter() - start
        metrics.STAGES.labels("score").observe(took)
        for i in positions:
            seconds[i] = took
    return hits, seconds


async def answer(
    reqs: Sequence[SearchRequest], catalog: Catalog, encoder: QueryEncoder, image: Image.Image | None = None
) -> list[dict[str, Any]]:
    """The API's answer to each of ``reqs``, in order; ``image``: an uploaded query image, for a single request.
    A query that cannot be answered fails them all, with the first such query's error."""
    start = time.perf_counter()
    planned = [await plan(req, catalog, image) for req in reqs]
    await encode(planned, encoder)
    encoded = time.perf_counter()
    metrics.STAGES.labels("encode").observe(encoded - start)
    hits, seconds = await run_in_threadpool(score, planned)
    total = time.perf_counter() - start
    return [
        {"store": p.store.name, "mode": p.req.mode, "k": p.req.k,
         "took_ms": {"encode": 1000 * (encoded - start), "score": 1000 * took, "total": 1000 * total}, "hits": found}
        for p, found, took in zip(planned, hits, seconds, strict=True)
    ]
