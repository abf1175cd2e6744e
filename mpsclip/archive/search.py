"""Exact search of an embedding store with text or image queries, streamed shard by shard.

Filters (:mod:`mpsclip.archive.filters`: a bbox, a date interval, a largest cloud cover) are pushed down to the
Parquet reader: row groups whose statistics exclude them are not decoded.
Scores: ``fused`` = retrieval·q, ``global`` = global·q, ``max-response`` = max over the global embedding and
the valid perspectives. Each shard's top-k comes from :func:`mpsclip.scoring.topk` (the Triton kernel on a GPU; a
matrix product or the exact chunked torch reference on the CPU) and is merged into a running top-k, ties going to
the lower store row, so only one shard's columns are in memory at a time; ids and metas are read for the final
hits only. Writing the hits out (table, JSON, GeoJSON, HTML) is :mod:`mpsclip.archive.render`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mpsclip.archive.dates import Interval
from mpsclip.archive.filters import item_filter
from mpsclip.archive.geoparquet import valid_footprint
from mpsclip.archive.items import READ_ERRORS
from mpsclip.archive.readers import open_rgb
from mpsclip.archive.store_reader import StoreInfo, pruned_rows, read_ids_metas, stream
from mpsclip.checkpoints import file_sha256, resolve_checkpoint
from mpsclip.errors import MPSCLIPError
from mpsclip.scoring import MODE_COLUMNS, backend_for, merge, mode_views, padding, topk

BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: str
    meta: dict[str, Any]


def load_search_model(
    manifest: dict[str, Any], checkpoint: str | Path | None, device: str | torch.device = "cpu"
) -> Any:
    """The store's model on ``device``: ``checkpoint`` or the one the manifest names; refuses another hash."""
    from mpsclip.factory import load_model

    if checkpoint is None:
        checkpoint = manifest["checkpoint"]
        if not Path(checkpoint).exists():
            raise MPSCLIPError(
                f"the store's checkpoint {checkpoint} no longer exists; pass --checkpoint with the same file"
            )
    path = resolve_checkpoint(checkpoint)
    digest = file_sha256(path)
    if digest != manifest["checkpoint_sha256"]:
        raise MPSCLIPError(
            f"{path}: sha256 {digest[:12]} differs from the store's checkpoint "
            f"({manifest['checkpoint_sha256'][:12]}, {manifest['checkpoint']}); "
            "query embeddings of another model cannot be compared with this store; pass the store's checkpoint"
        )
    return load_model(path, arch=manifest["arch"]).eval().to(device)


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_queries(model: Any, queries: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised fp32 text embeddings [Q, D] (on the model's device)."""
    device = _device_of(model)
    parts = [
        model.encode_text(model.tokenize(queries[i : i + batch_size]).to(device)).float()
        for i in range(0, len(queries), batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, model.embed_dim, device=device)


def _open_query_image(path: Path) -> Image.Image:
    try:
        return open_rgb(path)
    except READ_ERRORS as err:
        raise MPSCLIPError(
            f"--image {path}: cannot be read as an image ({type(err).__name__}: {err}); give a PNG, JPEG or TIFF file"
        ) from err


@torch.no_grad()
def encode_images(model: Any, paths: list[Path], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised fp32 global image embeddings [Q, D] of query images (the eval transform, as in 'embed')."""
    from mpsclip.data.transforms import eval_transform

    device = _device_of(model)
    transform = eval_transform(model.image_size)
    parts = []
    for i in range(0, len(paths), batch_size):
        pixels = torch.stack([transform(_open_query_image(p)) for p in paths[i : i + batch_size]])
        parts.append(model.encode_image(pixels.to(device)).float())
    return torch.cat(parts) if parts else torch.zeros(0, model.embed_dim, device=device)


def footprint(meta: dict[str, Any]) -> BBox | None:
    """The item's ``[west, south, east, north]`` footprint (EPSG:4326; west > east across the antimeridian), or
    None if it has no usable one."""
    return valid_footprint(meta.get("footprint"))


def exact_topk(
    info: StoreInfo,
    queries: torch.Tensor,
    k: int,
    mode: str = "fused",
    bbox: BBox | None = None,
    progress: bool = False,
    interval: Interval | None = None,
    max_cloud: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive top-``k`` per query over the store, streamed shard by shard on the queries' device:
    ``(scores [Q, k], store rows [Q, k])`` on the CPU, sorted by (score desc, row asc); padding row ``-1``.
    Only items passing the :class:`~mpsclip.archive.filters.ItemFilter` of ``bbox``, ``interval`` and
    ``max_cloud`` are scored; pruned items (:func:`~mpsclip.archive.store_reader.pruned_rows`) are skipped."""
    if k < 1:
        raise MPSCLIPError(f"-k must be 1 or more, got {k}")
    queries = queries.float()
    backend = backend_for(queries.device, mode)  # refuses an unknown mode
    best = padding(len(queries), k, queries.device)
    skip = pruned_rows(info)
    where = item_filter(bbox, interval, max_cloud)
    for part in stream(info, MODE_COLUMNS[mode], where, progress="search" if progress else None):
        views, valid = mode_views(part.columns, mode)
        rows = torch.from_numpy(part.rows())
        if len(skip):
            keep = torch.from_numpy(~np.isin(rows.numpy(), skip))
            views, valid, rows = views[keep], None if valid is None else valid[keep], rows[keep]
        if len(rows):
            best = merge(best, topk(queries, views, valid, rows, k, backend), k)
    return best[0].cpu(), best[1].cpu()


def to_hits(info: StoreInfo, scores: torch.Tensor, rows: torch.Tensor) -> list[list[Hit]]:
    """Hits (best first) of ``(scores, rows)`` from :func:`exact_topk` (or an index), with ids and metas read from
    the store; pruned items are left out."""
    pruned = set(pruned_rows(info).tolist())
    wanted = [int(r) for r in rows.flatten().tolist() if r >= 0 and r not in pruned]
    found = read_ids_metas(info, wanted)
    results = []
    for q_scores, q_rows in zip(scores.tolist(), rows.tolist(), strict=True):
        hits = []
        for score, row in zip(q_scores, q_rows, strict=True):
            if row < 0:
                break
            if row in pruned:
                continue
            item_id, meta = found[row]
            hits.append(Hit(rank=len(hits) + 1, score=float(score), id=item_id, meta=meta))
        results.append(hits)
    return results


def search_store(
    info: StoreInfo,
    queries: torch.Tensor,
    k: int,
    mode: str = "fused",
    bbox: BBox | None = None,
    progress: bool = False,
    interval: Interval | None = None,
    max_cloud: float | None = None,
) -> list[list[Hit]]:
    """Exact top-``k`` hits per query, best first (ties: store order); ``bbox`` keeps intersecting footprints,
    ``interval`` items dated within it, ``max_cloud`` items with at most that cloud cover (percent)."""
    return to_hits(info, *exact_topk(info, queries, k, mode, bbox, progress, interval, max_cloud))
