"""The offline search page: ``GET /`` and its files under ``/static`` (``serve/static``: HTML, CSS, vanilla JS)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


def add_page(app: FastAPI) -> None:
    """Serve the page on ``app`` (when its files are installed)."""
    if (STATIC / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
        app.include_router(router)
