"""The HTTP API: FastAPI app over a :class:`~serve.catalog.Catalog`; queries are encoded through a
:class:`~serve.batching.Batcher` (or one at a time without batching) and scored against in-memory stores."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from mpsclip.serve import metrics
from mpsclip.serve.auth import ApiKeyMiddleware, check_api_key
from mpsclip.serve.batching import Overloaded
from mpsclip.serve.catalog import LOG, SCORING, Catalog, Store
from mpsclip.serve.encoders import InProcessEncoder, QueryEncoder, probe
from mpsclip.serve.guard import RequestGuardMiddleware
from mpsclip.serve.limits import BodyLimitMiddleware
from mpsclip.serve.quicklook import SceneCatalog, render_quicklook, scene_json
from mpsclip.serve.redact import public_message, roots_of
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from mpsclip.archive.dates import DateError, parse_interval
from mpsclip.archive.geoparquet import geojson_geometry
from mpsclip.archive.search import footprint
from mpsclip.bbox import check_bbox, parse_bbox
from mpsclip.errors import MPSCLIPError

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000  # a query image decoded to RGB: at most 150 MB
MAX_BODY_BYTES = 12 * 1024 * 1024  # an 8 MiB image in base64 JSON, with room to spare
RETRY_AFTER_S = "1"
Mode = Literal["fused", "global", "max-response"]


class SearchRequest(BaseModel):
    text: str | None = Field(None, min_length=1, max_length=1000)
    image: str | None = Field(None, description="base64 PNG/JPEG/TIFF")
    item_id: str | None = None
    embedding: list[float] | None = None
    k: int = Field(10, ge=1, le=1000)
    mode: Mode = "fused"
    bbox: list[float] | None = Field(None, min_length=4, max_length=4, description="[west, south, east, north]")
    datetime: str | None = Field(
        None, max_length=100, description="RFC 3339 START/END ('..' open; a date is a whole UTC day): items dated in it"
    )
    max_cloud: float | None = Field(None, ge=0, le=100, description="largest eo:cloud_cover, percent")
    store: str | None = None

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        given = [n for n in ("text", "image", "item_id", "embedding") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image, item_id, embedding (got {', '.join(given) or 'none'})")
        if self.bbox is not None:
            try:
                check_bbox(self.bbox)
            except MPSCLIPError as err:
                raise ValueError(f"bbox: {err}") from None
        if self.datetime is not None:
            try:
                parse_interval(self.datetime)
            except DateError as err:
                raise ValueError(f"datetime: {err}") from err
        return self


class BatchRequest(BaseModel):
    queries: list[SearchRequest] = Field(..., min_length=1, max_length=64)


def polygon(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The item's footprint as RFC 7946 geometry (a MultiPolygon across the antimeridian), or None."""
    fp = footprint(meta)
    return None if fp is None else geojson_geometry(fp)


def thumbnail_url(store: str, item_id: str) -> str:
    return f"/items/{quote(store)}/{quote(item_id)}/thumbnail"


def bad(detail: str, status: int = 422) -> HTTPException:
    return HTTPException(status, detail)


def decode_image(data: bytes, field: str) -> Image.Image:
    """An RGB image of ``data``; 422 naming ``field`` for bytes that are not one, 413 for too many pixels (a small
    file can hold a huge image: the size is checked before decoding)."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise bad(f"{field}: {width} x {height} pixels, more than {MAX_IMAGE_PIXELS:,}; send a smaller image", 413)
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise bad(f"{field}: not a readable image ({type(err).__name__})") from err


def decode_base64_image(text: str) -> Image.Image:
    """The image of a request's base64 ``image`` field (run in a worker thread: decoding takes CPU)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad("image: not valid base64") from err
    if len(data) > MAX_UPLOAD_BYTES:
        raise bad(f"image: larger than {MAX_UPLOAD_BYTES} bytes", 413)
    return decode_image(data, "image")


def score_hits(store: Store, vec: torch.Tensor, req: SearchRequest) -> list[dict[str, Any]]:
    """The top ``req.k`` hits of ``vec`` in ``store`` as the API lists them (run in a worker thread)."""
    bbox = tuple(req.bbox) if req.bbox is not None else None
    interval = parse_interval(req.datetime) if req.datetime is not None else None
    scores, rows = store.topk(vec[None], req.k, req.mode, bbox, interval, req.max_cloud)
    hits: list[dict[str, Any]] = []
    for score, row in zip(scores[0].tolist(), rows[0].tolist(), strict=True):
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


async def watch(catalog: Catalog, every_s: float) -> None:
    """Call :meth:`Catalog.reload` every ``every_s`` seconds, in a thread (reads stay off the event loop)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(catalog.reload)
        except Exception:  # noqa: BLE001 - a bug in one check must not stop the next ones
            LOG.exception("checking the stores for changes failed; trying again in %s s", every_s)


def create_app(
    catalog: Catalog, batching: bool = True, max_batch: int = 32, max_queue: int = 256, *,
    api_key: str | None = None, cors: Sequence[str] = (), max_body_bytes: int = MAX_BODY_BYTES,
    encoder: QueryEncoder | None = None, reload_every_s: float = 0.0,
    allowed_hosts: Sequence[str] | None = None, any_ip_host: bool = False,
) -> FastAPI:
    """The API over ``catalog``. ``api_key`` protects every path but health checks and the page's files
    (:mod:`~mpsclip.serve.auth`); ``cors`` lists the origins allowed to call it from other pages (none: CORS off);
    request bodies over ``max_body_bytes`` get 413. ``encoder`` turns text/image queries into embeddings
    (:mod:`~mpsclip.serve.encoders`: the Triton towers, or by default the towers in this process).
    ``reload_every_s`` > 0 checks the stores' files that often and swaps in changed ones (:meth:`Catalog.reload`);
    ``POST /admin/reload`` does it at once. ``allowed_hosts`` are the Host names answered (None: any; ``any_ip_host``
    adds every IP address) and requests that change state must not come from another site
    (:mod:`~mpsclip.serve.guard`). Start-up sends one real query through the towers; ``/readyz`` answers 200 only
    once it was answered right (``app.state.ready_error`` says why not). Error bodies name files relative to their
    store (:mod:`~mpsclip.serve.redact`)."""
    if encoder is None:  # the towers in this process (mpsclip serve --no-triton)
        encoder = InProcessEncoder(batching=batching, max_batch=max_batch, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await encoder.start()
        app.state.ready_error = await probe(catalog, encoder)
        watcher = asyncio.get_running_loop().create_task(watch(catalog, reload_every_s)) if reload_every_s else None
        yield
        if watcher is not None:
            watcher.cancel()
        await encoder.stop()

    app = FastAPI(
        title="mpsclip serve", description=f"Text and image search over mpsclip embedding stores. {SCORING}",
        lifespan=lifespan,
    )
    app.state.catalog, app.state.encoder = catalog, encoder
    app.state.ready_error = "starting: the towers have not answered a test query yet"
    if max_body_bytes < 1:
        raise MPSCLIPError(f"--max-body-mib: the body limit must be above 0, got {max_body_bytes} bytes")
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=check_api_key(api_key))
    scenes = SceneCatalog()
    app.add_middleware(metrics.TimedMiddleware)

    def public(text: str) -> str:
        """``text`` without this machine's absolute paths (each store's files named relative to it)."""
        roots = roots_of(
            pair for s in catalog.stores.values()
            for pair in ((s.info.manifest.get("source_root"), "the store's source folder"),
                         (s.info.path, f"store {s.name!r}"))
        )
        return public_message(text, roots)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = public(exc.detail) if isinstance(exc.detail, str) else exc.detail
        return await http_exception_handler(request, StarletteHTTPException(exc.status_code, detail, exc.headers))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each wrong field (``loc``) and why (``msg``), without echoing the input: it may be large, or
        hold NaN/Infinity (which Python's JSON parser accepts), and a response cannot carry those."""
        errors = [{key: error[key] for key in ("type", "loc", "msg") if key in error} for error in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    def get_store(name: str | None) -> Store:
        try:
            return catalog.get(name)
        except KeyError as err:
            raise bad(str(err.args[0]), 404) from err

    async def query_vector(req: SearchRequest, store: Store, image: Image.Image | None) -> torch.Tensor:
        if req.embedding is not None:
            vec = torch.tensor(req.embedding, dtype=torch.float32)
            if vec.shape[0] != store.info.dim or not torch.isfinite(vec).all():
                raise bad(f"embedding: expected {store.info.dim} finite numbers, got {vec.shape[0]}")
            norm = vec.norm()
            if norm == 0:
                raise bad("embedding: the zero vector cannot be searched with")
            return vec / norm
        if req.item_id is not None:
            row = store.row_of.get(req.item_id)
            if row is None:
                raise bad(f"item_id: no item {req.item_id!r} in store {store.name!r}", 404)
            return torch.from_numpy(store.columns["global"][row]).float()
        if store.model is None:
            raise bad("text/image queries need the store's model, which this server did not load", 503)
        metrics.QUEUE.set(encoder.depth)
        try:
            if req.text is not None:
                return await encoder.encode(store, "text", req.text)
            return await encoder.encode(store, "image", image)
        except Overloaded as err:
            metrics.ERRORS.labels("overloaded").inc()
            raise HTTPException(503, "server overloaded: retry later", headers={"Retry-After": RETRY_AFTER_S}) from err

    async def search(req: SearchRequest, image: Image.Image | None = None) -> dict[str, Any]:
        start = time.perf_counter()
        store = get_store(req.store)
        if req.image is not None and image is None:
            image = await run_in_threadpool(decode_base64_image, req.image)
        vec = await query_vector(req, store, image)
        encoded = time.perf_counter()
        hits = await run_in_threadpool(score_hits, store, vec, req)
        scored = time.perf_counter()
        metrics.STAGES.labels("encode").observe(encoded - start)
        metrics.STAGES.labels("score").observe(scored - encoded)
        total = time.perf_counter() - start
        took = {"encode": 1000 * (encoded - start), "score": 1000 * (scored - encoded), "total": 1000 * total}
        return {"store": store.name, "mode": req.mode, "k": req.k, "took_ms": took, "hits": hits}

    @app.post("/search")
    async def post_search(req: SearchRequest) -> dict[str, Any]:
        return await search(req)

    @app.post("/search/batch")
    async def post_batch(req: BatchRequest) -> dict[str, Any]:
        return {"results": [await search(q) for q in req.queries]}

    @app.post("/search/upload")
    async def post_upload(
        file: UploadFile = File(...), k: int = Form(10, ge=1, le=1000), mode: Mode = Form("fused"),
        bbox: str | None = Form(None), store: str | None = Form(None),
        datetime: str | None = Form(None, max_length=100), max_cloud: float | None = Form(None, ge=0, le=100),
    ) -> dict[str, Any]:
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise bad(f"file: larger than {MAX_UPLOAD_BYTES} bytes", 413)
        box = None
        if bbox:
            try:
                box = list(parse_bbox(bbox))
            except MPSCLIPError as err:
                raise bad(f"bbox: {err}") from None
        if datetime:
            try:
                parse_interval(datetime)
            except DateError as err:
                raise bad(f"datetime: {err}") from err
        req = SearchRequest(image="", k=k, mode=mode, bbox=box, store=store, datetime=datetime or None,
                            max_cloud=max_cloud)
        return await search(req, await run_in_threadpool(decode_image, data, "file"))


    @app.get("/stores")
    async def get_stores() -> dict[str, Any]:
        return await run_in_threadpool(list_stores)

    def list_stores() -> dict[str, Any]:
        out = []
        for s in catalog.stores.values():
            m = s.info.manifest
            listed = [{**scene, "error": scene["error"] and public(scene["error"])}
                      for scene in (scene_json(s.name, found) for found in scenes.scenes(s))]
            reload = catalog.health[s.name].as_json()
            out.append({
                "name": s.name, "items": len(s.ids),
                "model": {"family": m.get("family", "mpsclip"), "arch": m.get("arch")},
                "checkpoint_sha256": m.get("checkpoint_sha256"), "settings": m.get("settings", {}),
                "georeferenced": any(footprint(meta) is not None for meta in s.metas[:1000]),
                "scenes": listed,
                "complete": bool(m.get("complete")), "shards": len(s.info.shard_rows),
                "reload": {**reload, "error": reload["error"] and public(reload["error"])},
                "index": s.index_status(),
            })
        return {"stores": out}

    @app.get("/scenes/{store}/{scene}/quicklook", responses={200: {"content": {"image/png": {}}}})
    def get_quicklook(store: str, scene: int) -> Response:
        """A low-resolution PNG of scene number ``scene`` (see ``GET /stores``), rendered from its GeoTIFF."""
        s = get_store(store)
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

    @app.get("/items/{store}/{item_id:path}/thumbnail")
    def get_thumbnail(store: str, item_id: str) -> Response:  # sync: FastAPI reads the source in a worker thread
        from mpsclip.archive.items import READ_ERRORS, item_from_meta
        from mpsclip.archive.readers import open_item
        from mpsclip.archive.store import checked_source_root

        s = get_store(store)
        row = s.row_of.get(item_id)
        if row is None:
            raise bad(f"item_id: no item {item_id!r} in store {s.name!r}", 404)
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

    @app.get("/items/{store}/{item_id:path}")
    async def get_item(store: str, item_id: str) -> dict[str, Any]:
        s = get_store(store)
        row = s.row_of.get(item_id)
        if row is None:
            raise bad(f"item_id: no item {item_id!r} in store {s.name!r}", 404)
        meta = s.metas[row]
        return {"id": item_id, "store": s.name, "meta": meta, "keywords": list(meta.get("keywords") or []),
                "footprint": polygon(meta), "thumbnail_url": thumbnail_url(s.name, item_id)}

    @app.post("/admin/reload")
    async def post_reload() -> dict[str, Any]:
        """Check every store's files now and swap in those that changed; a failed reload keeps the last good
        version (see ``reload`` in ``GET /stores``)."""
        outcome = await asyncio.to_thread(catalog.reload)
        return {"stores": {n: {"items": len(s.ids), "reload": public(outcome[n])} for n, s in catalog.stores.items()}}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 once the stores are loaded and the towers answered a real query at start-up, else 503 and why."""
        reason = "no stores loaded" if not catalog.stores else app.state.ready_error
        if reason is None:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "reason": public(reason)}, status_code=503)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        metrics.QUEUE.set(encoder.depth)
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)

    if (STATIC / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(STATIC / "index.html")

    if cors:  # added last, so outermost: preflights and 401s get CORS headers too
        app.add_middleware(
            CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(  # outermost: a foreign Host or a cross-site state change is refused before anything else
        RequestGuardMiddleware, hosts=["*"] if allowed_hosts is None else allowed_hosts, any_ip=any_ip_host,
        trusted_origins=cors,
    )
    return app

