"""Search results as text: a table, JSON, GeoJSON and a self-contained HTML contact sheet.

Every renderer takes the query labels and their hits (:class:`~mpsclip.archive.search.Hit`, best first) and returns
what is written; only :func:`to_html` opens the items' pixels, below the store's source root (which must exist:
``--source-root`` relocates it, see :func:`mpsclip.archive.store_reader.relocate_source`). Text in the HTML
(queries, ids, keywords) is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from PIL import Image

from mpsclip.archive.geoparquet import geojson_geometry
from mpsclip.archive.items import READ_ERRORS, Item, item_from_meta
from mpsclip.archive.readers import open_item
from mpsclip.archive.search import Hit, footprint
from mpsclip.archive.store import checked_source_root

THUMBNAIL_PX = 160
_HTML_STYLE = (
    "body{font-family:sans-serif;margin:1em}section{margin-bottom:2em}"
    ".grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:160px;font-size:12px}"
    "figure img,.missing{width:160px;height:160px;object-fit:contain;background:#ddd;display:block}"
    "figcaption{overflow-wrap:anywhere}"
)


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
    """An RFC 7946 FeatureCollection of the hits with a footprint (lon/lat, counter-clockwise rings, a footprint
    crossing the antimeridian split into a MultiPolygon, no ``crs`` member), and the number of hits skipped for
    having none."""
    features, skipped = [], 0
    for query, hits in zip(queries, results, strict=True):
        for hit in hits:
            fp = footprint(hit.meta)
            if fp is None:
                skipped += 1
                continue
            features.append(
                {
                    "type": "Feature",
                    "geometry": geojson_geometry(fp),
                    "properties": {"query": query, "rank": hit.rank, "score": hit.score, "id": hit.id,
                                   "datetime": hit.meta.get("datetime")},
                }
            )
    return {"type": "FeatureCollection", "features": features}, skipped


def hit_item(manifest: dict[str, Any], hit: Hit) -> Item:
    """Where a hit's pixels are: its meta's file below the store's ``source_root``."""
    return item_from_meta(hit.id, hit.meta, manifest)


def thumbnail_data_uri(image: Image.Image, size: int = THUMBNAIL_PX) -> str:
    """A PNG thumbnail (longest side ``size``) as a ``data:`` URI."""
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _caption(hit: Hit) -> str:
    """Rank, score, id and (zero-shot) keywords; every piece of text from the store is escaped."""
    caption = f"#{hit.rank} &middot; {hit.score:.4f}<br>{html.escape(hit.id)}"
    keywords = hit.meta.get("keywords")
    if isinstance(keywords, list) and keywords:
        caption += f"<br><i>{html.escape(', '.join(str(k) for k in keywords))}</i>"
    return caption


def _figure(manifest: dict[str, Any], hit: Hit) -> str:
    try:
        picture = f'<img src="{thumbnail_data_uri(open_item(hit_item(manifest, hit)))}" alt="">'
    except READ_ERRORS:
        picture = '<div class="missing">image unavailable</div>'
    return f"<figure>{picture}<figcaption>{_caption(hit)}</figcaption></figure>"


def to_html(queries: list[str], results: list[list[Hit]], manifest: dict[str, Any], mode: str) -> str:
    """A self-contained contact sheet: per query, its hits' thumbnails (inline PNG) with rank, score, id and
    keywords (all text escaped). Raises :class:`~mpsclip.errors.MPSCLIPError` naming ``--source-root`` when the
    store's source folder is not here; a single unreadable item shows as 'image unavailable'."""
    if any(results):
        checked_source_root(manifest)
    sections = []
    for query, hits in zip(queries, results, strict=True):
        figures = "".join(_figure(manifest, hit) for hit in hits) or "<p>(no results)</p>"
        sections.append(f'<section><h2>{html.escape(query)}</h2><div class="grid">{figures}</div></section>')
    title = f"mpsclip search ({html.escape(mode)})"
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_HTML_STYLE}</style></head><body><h1>{title}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
