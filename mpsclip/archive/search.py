"""Exact text search over an embedding store.

Scores: ``fused`` = retrieval·q, ``global`` = global·q, ``max-response`` = max over the global embedding and
the valid perspectives. Top-k uses :func:`mpsclip.kernels.maxsim_topk` (an exact chunked torch path on CPU).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mpsclip.archive.sources import READ_ERRORS, Item, open_item
from mpsclip.archive.store import StoreData
from mpsclip.checkpoints import file_sha256, resolve_checkpoint
from mpsclip.errors import MPSCLIPError

MODES = ("fused", "global", "max-response")
BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: str
    meta: dict[str, Any]


def load_search_model(data: StoreData, checkpoint: str | Path | None) -> Any:
    """The store's model: ``checkpoint`` or the one the manifest names; refuses a file with another hash."""
    from mpsclip.checkpoints import load_model

    manifest = data.manifest
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
            "text embeddings of another model cannot be compared with this store; pass the store's checkpoint"
        )
    return load_model(path, arch=manifest["arch"]).eval()


@torch.no_grad()
def encode_queries(model: Any, queries: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised fp32 text embeddings [Q, D]."""
    parts = [
        model.encode_text(model.tokenize(queries[i : i + batch_size])).float()
        for i in range(0, len(queries), batch_size)
    ]
    return torch.cat(parts)


def parse_bbox(text: str) -> BBox:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as err:
        raise MPSCLIPError(f"--bbox {text!r}: expected four numbers minx,miny,maxx,maxy") from err
    if len(values) != 4 or values[0] > values[2] or values[1] > values[3]:
        raise MPSCLIPError(f"--bbox {text!r}: expected minx,miny,maxx,maxy with minx <= maxx and miny <= maxy")
    return values[0], values[1], values[2], values[3]


def footprint(meta: dict[str, Any]) -> BBox | None:
    """The item's ``[minx, miny, maxx, maxy]`` footprint (EPSG:4326), or None if it has no usable one."""
    fp = meta.get("footprint")
    if not isinstance(fp, list | tuple) or len(fp) != 4:
        return None
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in fp):
        return None
    return float(fp[0]), float(fp[1]), float(fp[2]), float(fp[3])


def intersects(a: BBox, b: BBox) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def rows_in_bbox(data: StoreData, bbox: BBox) -> list[int]:
    """Rows whose footprint intersects ``bbox`` (items without a footprint are left out)."""
    return [i for i, meta in enumerate(data.metas) if (fp := footprint(meta)) is not None and intersects(fp, bbox)]


def gallery(data: StoreData, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[N, V, D]`` views scored for ``mode`` and their ``[N, V]`` validity (None: all valid)."""
    if mode == "fused":
        return data.retrieval.unsqueeze(1), None
    if mode == "global":
        return data.glob.unsqueeze(1), None
    if mode == "max-response":
        views = torch.cat([data.glob.unsqueeze(1), data.perspectives], dim=1)
        valid = torch.cat([torch.ones(len(data.ids), 1, dtype=torch.bool), data.valid], dim=1)
        return views, valid
    raise MPSCLIPError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def search(
    data: StoreData, queries: torch.Tensor, k: int, mode: str = "fused", rows: list[int] | None = None
) -> list[list[Hit]]:
    """Top-``k`` hits per query, best first (ties: store order); ``rows`` restricts the candidates."""
    from mpsclip.kernels import maxsim_topk

    if k < 1:
        raise MPSCLIPError(f"-k must be 1 or more, got {k}")
    views, valid = gallery(data, mode)
    index = torch.arange(len(data.ids)) if rows is None else torch.tensor(rows, dtype=torch.long)
    if len(index) == 0:
        return [[] for _ in range(queries.shape[0])]
    if rows is not None:
        views = views.index_select(0, index)
        valid = valid.index_select(0, index) if valid is not None else None
    scores, found = maxsim_topk(queries.float(), views, k, valid)
    results = []
    for q_scores, q_found in zip(scores.tolist(), found.tolist(), strict=True):
        hits = []
        for score, j in zip(q_scores, q_found, strict=True):
            if j < 0:
                break
            row = int(index[j])
            hits.append(Hit(rank=len(hits) + 1, score=float(score), id=data.ids[row], meta=data.metas[row]))
        results.append(hits)
    return results


def format_table(queries: list[str], results: list[list[Hit]]) -> str:
    lines = []
    for query, hits in zip(queries, results, strict=True):
        lines.append(f"query: {query}")
        lines.append(f"{'rank':>5}  {'score':>7}  id")
        lines.extend(f"{h.rank:>5}  {h.score:>7.4f}  {h.id}" for h in hits)
        if not hits:
            lines.append("  (no results)")
        lines.append("")
    return "\n".join(lines)


def to_json(queries: list[str], results: list[list[Hit]], mode: str, k: int) -> dict[str, Any]:
    return {
        "mode": mode,
        "k": k,
        "results": [
            {"query": q, "hits": [{"rank": h.rank, "score": h.score, "id": h.id, "meta": h.meta} for h in hits]}
            for q, hits in zip(queries, results, strict=True)
        ],
    }


def to_geojson(queries: list[str], results: list[list[Hit]]) -> tuple[dict[str, Any], int]:
    """A FeatureCollection of the hits with a footprint, and the number of hits skipped for having none."""
    features, skipped = [], 0
    for query, hits in zip(queries, results, strict=True):
        for hit in hits:
            fp = footprint(hit.meta)
            if fp is None:
                skipped += 1
                continue
            minx, miny, maxx, maxy = fp
            ring = [[minx, miny], [maxx, miny], [maxx, maxy], [minx, maxy], [minx, miny]]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {"query": query, "rank": hit.rank, "score": hit.score, "id": hit.id},
                }
            )
    return {"type": "FeatureCollection", "features": features}, skipped


THUMBNAIL_PX = 160
_HTML_STYLE = (
    "body{font-family:sans-serif;margin:1em}section{margin-bottom:2em}"
    ".grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:160px;font-size:12px}"
    "figure img,.missing{width:160px;height:160px;object-fit:contain;background:#ddd;display:block}"
    "figcaption{overflow-wrap:anywhere}"
)


def hit_item(manifest: dict[str, Any], hit: Hit) -> Item:
    """Where a hit's pixels are: its GeoTIFF scene (meta ``scene``) or its file below the store's source."""
    if "scene" in hit.meta:
        return Item(hit.id, Path(hit.meta["scene"]), hit.meta)
    source = Path(manifest["source"])
    base = source if source.is_dir() else source.parent
    return Item(hit.id, Path(hit.id) if Path(hit.id).is_absolute() else base / hit.id, hit.meta)


def thumbnail_data_uri(image: Image.Image, size: int = THUMBNAIL_PX) -> str:
    """A PNG thumbnail (longest side ``size``) as a ``data:`` URI."""
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(manifest: dict[str, Any], hit: Hit) -> str:
    try:
        picture = f'<img src="{thumbnail_data_uri(open_item(hit_item(manifest, hit)))}" alt="">'
    except READ_ERRORS:
        picture = '<div class="missing">image unavailable</div>'
    caption = f"#{hit.rank} &middot; {hit.score:.4f}<br>{html.escape(hit.id)}"
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"


def to_html(queries: list[str], results: list[list[Hit]], manifest: dict[str, Any], mode: str) -> str:
    """A self-contained contact sheet: per query, its hits' thumbnails (inline PNG) with rank, score and id."""
    sections = []
    for query, hits in zip(queries, results, strict=True):
        figures = "".join(_figure(manifest, hit) for hit in hits) or "<p>(no results)</p>"
        sections.append(f'<section><h2>{html.escape(query)}</h2><div class="grid">{figures}</div></section>')
    title = f"mpsclip search ({html.escape(mode)})"
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_HTML_STYLE}</style></head><body><h1>{title}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
