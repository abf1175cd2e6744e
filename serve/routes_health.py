"""Health and metrics: ``GET /healthz`` (the process answers), ``/readyz`` (it can search), ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from mpsclip.serve import metrics
from mpsclip.serve.deps import CatalogDep, EncoderDep, public

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, catalog: CatalogDep) -> JSONResponse:
    """200 once the stores are loaded and the towers answered a real query at start-up, else 503 and why."""
    reason = "no stores loaded" if not catalog.stores else request.app.state.ready_error
    if reason is None:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "reason": public(catalog, reason)}, status_code=503)


@router.get("/metrics")
async def get_metrics(encoder: EncoderDep) -> Response:
    metrics.QUEUE.set(encoder.depth)
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)
