"""``POST /search``, ``/search/batch`` and ``/search/upload``: handlers over :func:`mpsclip.serve.answers.answer`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool
from mpsclip.serve.answers import answer
from mpsclip.serve.deps import CatalogDep, EncoderDep
from mpsclip.serve.queries import (
    MAX_UPLOAD_BYTES,
    BatchRequest,
    Mode,
    SearchRequest,
    bad,
    decode_image,
    upload_request,
)

router = APIRouter()


@router.post("/search")
async def post_search(req: SearchRequest, catalog: CatalogDep, encoder: EncoderDep) -> dict[str, Any]:
    return (await answer([req], catalog, encoder))[0]


@router.post("/search/batch")
async def post_batch(req: BatchRequest, catalog: CatalogDep, encoder: EncoderDep) -> dict[str, Any]:
    """Every query's answer, in order: the text and image queries encoded in one call, queries sharing store, mode,
    k and filters scored together."""
    return {"results": await answer(req.queries, catalog, encoder)}


@router.post("/search/upload")
async def post_upload(
    catalog: CatalogDep, encoder: EncoderDep,
    file: UploadFile = File(...), k: int = Form(10, ge=1, le=1000), mode: Mode = Form("fused"),
    bbox: str | None = Form(None), store: str | None = Form(None),
    datetime: str | None = Form(None, max_length=100), max_cloud: float | None = Form(None, ge=0, le=100),
) -> dict[str, Any]:
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise bad(f"file: larger than {MAX_UPLOAD_BYTES} bytes", 413)
    req = upload_request(k, mode, bbox, store, datetime, max_cloud)
    image = await run_in_threadpool(decode_image, data, "file")
    return (await answer([req], catalog, encoder, image))[0]
