"""A search query as the API takes it: the JSON bodies of ``POST /search`` and ``/search/batch``, the form of
``/search/upload``, and the query images they carry (decoded with size limits)."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Literal

from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, model_validator

from mpsclip.archive.dates import DateError, parse_interval
from mpsclip.bbox import check_bbox, parse_bbox
from mpsclip.choices import MODES
from mpsclip.errors import MPSCLIPError

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000  # a query image decoded to RGB: at most 150 MB
MAX_BATCH_QUERIES = 64
Mode = Literal[MODES]  # type: ignore[valid-type]  # Literal[("a", "b")] is Literal["a", "b"]


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
    queries: list[SearchRequest] = Field(..., min_length=1, max_length=MAX_BATCH_QUERIES)


def bad(detail: str, status: int = 422) -> HTTPException:
    return HTTPException(status, detail)


def upload_request(
    k: int, mode: str, bbox: str | None, store: str | None, datetime: str | None, max_cloud: float | None
) -> SearchRequest:
    """The :class:`SearchRequest` of an upload form's fields (``bbox`` as ``W,S,E,N`` text); 422 naming the field."""
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
    return SearchRequest(image="", k=k, mode=mode, bbox=box, store=store, datetime=datetime or None,
                         max_cloud=max_cloud)


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
