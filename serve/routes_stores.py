"""What is served: ``GET /stores``, an item's record and thumbnail, a scene's quicklook, ``POST /admin/reload``."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from mpsclip.serve import metrics
from mpsclip.serve.answers import polygon, thumbnail_url
from mpsclip.serve.catalog import Catalog
from mpsclip.serve.deps import CatalogDep, ScenesDep, item_row, public, store_named
from mpsclip.serve.queries import bad
from mpsclip.serve.quicklook import SceneCatalog, render_quicklook, scene_json

from mpsclip.archive.search import footprint
from mpsclip.errors import MPSCLIPError

router = APIRouter()


@router.get("/stores")
async def get_stores(catalog: CatalogDep, scenes: ScenesDep) -> dict[str, Any]:
    return await run_in_threadpool(list_stores, catalog, scenes)


def list_stores(catalog: Catalog, scenes: SceneCatalog) -> dict[str, Any]:
    """Each store's size, model, settings, scenes, reload and index state (reads the stores: run in a thread)."""
    out = []
    for s in catalog.stores.values():
        m = s.info.manifest
        listed = [{**scene, "error": scene["error"] and public(catalog, scene["error"])}
                  for scene in (scene_json(s.name, found) for found in scenes.scenes(s))]
        reload = catalog.health[s.name].as_json()
        out.append({
            "name": s.name, "items": len(s.ids),
            "model": {"family": m.get("family", "mpsclip"), "arch": m.get("arch")},
            "checkpoint_sha256": m.get("checkpoint_sha256"), "settings": m.get("settings", {}),
            "georeferenced": any(footprint(meta) is not None for meta in s.metas[:1000]),
            "scenes": listed,
            "complete": bool(m.get("complete")), "shards": len(s.info.shard_rows),
            "reload": {**reload, "error": reload["error"] and public(catalog, reload["error"])},
            "index": s.index_status(),
        })
    return {"stores": out}


@router.get("/scenes/{store}/{scene}/quicklook", responses={200: {"content": {"image/png": {}}}})
def get_quicklook(store: str, scene: int, catalog: CatalogDep, scenes: ScenesDep) -> Response:
    """A low-resolution PNG of scene number ``scene`` (see ``GET /stores``), rendered from its GeoTIFF."""
    s = store_named(catalog, store)
    try:
        found = scenes.scene(s, scene)
    except KeyError as err:
        raise bad(str(err.args[0]), 404) from err
    start = time.perf_counter()
    try:
        png = render_quicklook(found)
    except MPSCLIPError as err:
        raise bad(str(err), 404) from err
    metrics.STAGES.labels("render").observe(time.perf_counter() - start)
    return Response(png, media_type="image/png")


@router.get("/items/{store}/{item_id:path}/thumbnail")
def get_thumbnail(store: str, item_id: str, catalog: CatalogDep) -> Response:  # sync: read in a worker thread
    from mpsclip.archive.items import READ_ERRORS, item_from_meta
    from mpsclip.archive.readers import open_item
    from mpsclip.archive.store import checked_source_root

    s = store_named(catalog, store)
    row = item_row(s, item_id)
    start = time.perf_counter()
    try:
        checked_source_root(s.info.manifest)  # a moved source: the message names mpsclip serve --source-root
        image = open_item(item_from_meta(item_id, s.metas[row], s.info.manifest))
    except MPSCLIPError as err:
        raise bad(f"item {item_id!r}: {err}", 404) from err
    except READ_ERRORS as err:
        raise bad(f"item {item_id!r}: its source cannot be read ({type(err).__name__})", 404) from err
    image = image.convert("RGB")
    image.thumbnail((256, 256))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    metrics.STAGES.labels("render").observe(time.perf_counter() - start)
    return Response(buffer.getvalue(), media_type="image/jpeg")


@router.get("/items/{store}/{item_id:path}")
async def get_item(store: str, item_id: str, catalog: CatalogDep) -> dict[str, Any]:
    s = store_named(catalog, store)
    meta = s.metas[item_row(s, item_id)]
    return {"id": item_id, "store": s.name, "meta": meta, "keywords": list(meta.get("keywords") or []),
            "footprint": polygon(meta), "thumbnail_url": thumbnail_url(s.name, item_id)}


@router.post("/admin/reload")
async def post_reload(catalog: CatalogDep) -> dict[str, Any]:
    """Check every store's files now and swap in those that changed; a failed reload keeps the last good
    version (see ``reload`` in ``GET /stores``)."""
    outcome = await asyncio.to_thread(catalog.reload)
    return {"stores": {n: {"items": len(s.ids), "reload": public(catalog, outcome[n])}
                       for n, s in catalog.stores.items()}}
