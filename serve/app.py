"""The HTTP API: a FastAPI app over a :class:`~serve.catalog.Catalog`, assembled from its routers (search, stores,
health, the page); handlers get the catalog, encoder and scene lists as dependencies (:mod:`~mpsclip.serve.deps`).
Queries are encoded through a :class:`~serve.encoders.QueryEncoder` and scored against in-memory stores."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from mpsclip.serve import metrics, routes_health, routes_search, routes_stores
from mpsclip.serve.auth import ApiKeyMiddleware, check_api_key
from mpsclip.serve.catalog import LOG, SCORING, Catalog
from mpsclip.serve.deps import public
from mpsclip.serve.encoders import InProcessEncoder, QueryEncoder, probe
from mpsclip.serve.guard import RequestGuardMiddleware
from mpsclip.serve.limits import BodyLimitMiddleware
from mpsclip.serve.quicklook import SceneCatalog
from mpsclip.serve.routes_page import add_page
from starlette.exceptions import HTTPException as StarletteHTTPException

from mpsclip.errors import MPSCLIPError

MAX_BODY_BYTES = 12 * 1024 * 1024  # an 8 MiB image in base64 JSON, with room to spare
NOT_READY = "starting: the towers have not answered a test query yet"


async def watch(catalog: Catalog, every_s: float) -> None:
    """Call :meth:`Catalog.reload` every ``every_s`` seconds, in a thread (reads stay off the event loop)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(catalog.reload)
        except Exception:  # noqa: BLE001 - a bug in one check must not stop the next ones
            LOG.exception("checking the stores for changes failed; trying again in %s s", every_s)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the encoder, send the towers one real query (``app.state.ready_error``), watch the stores' files."""
    state = app.state
    await state.encoder.start()
    state.ready_error = await probe(state.catalog, state.encoder)
    every_s = state.reload_every_s
    watcher = asyncio.get_running_loop().create_task(watch(state.catalog, every_s)) if every_s else None
    yield
    if watcher is not None:
        watcher.cancel()
    await state.encoder.stop()


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's answer to ``exc``, its detail without this machine's paths."""
    detail = public(request.app.state.catalog, exc.detail) if isinstance(exc.detail, str) else exc.detail
    return await http_exception_handler(request, StarletteHTTPException(exc.status_code, detail, exc.headers))


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each wrong field (``loc``) and why (``msg``), without echoing the input: it may be large, or
    hold NaN/Infinity (which Python's JSON parser accepts), and a response cannot carry those."""
    errors = [{key: error[key] for key in ("type", "loc", "msg") if key in error} for error in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


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
    if max_body_bytes < 1:
        raise MPSCLIPError(f"--max-body-mib: the body limit must be above 0, got {max_body_bytes} bytes")
    if encoder is None:  # the towers in this process (mpsclip serve --no-triton)
        encoder = InProcessEncoder(batching=batching, max_batch=max_batch, max_queue=max_queue)
    app = FastAPI(
        title="mpsclip serve", description=f"Text and image search over mpsclip embedding stores. {SCORING}",
        lifespan=lifespan,
    )
    app.state.catalog, app.state.encoder, app.state.scenes = catalog, encoder, SceneCatalog()
    app.state.reload_every_s, app.state.ready_error = reload_every_s, NOT_READY
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=check_api_key(api_key))
    app.add_middleware(metrics.TimedMiddleware)
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    for router in (routes_search.router, routes_stores.router, routes_health.router):
        app.include_router(router)
    add_page(app)
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
