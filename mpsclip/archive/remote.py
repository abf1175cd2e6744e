"""Remote rasters as archive items: COGs (and JPEG/PNG/WebP) over ``http(s)://`` and ``s3://``, read by window
through GDAL range requests (``/vsicurl/``, ``/vsis3/``), never downloaded whole (needs ``rasterio``).

:func:`remote_items` turns one STAC item's asset hrefs (or one URL of a list) into items: 1 href (an RGB or grey
raster) or 3 (red, green and blue single-band rasters, possibly of different resolutions, read onto the grid of
the finest; :class:`~mpsclip.archive.geotiff.SceneBands`). Without tile settings that is one ``remote`` item,
read whole at most :data:`WHOLE_MAX_SIDE` pixels on its longer side (from the overviews of a COG); with them,
one ``remote-window`` item per tile that holds data, cut and read exactly as local GeoTIFF scenes are
(:func:`~mpsclip.archive.geotiff.tile_metas`, :func:`~mpsclip.archive.geotiff.read_window`).

Reads run inside one GDAL configuration (:func:`gdal_options`): :data:`CLOUD_OPTIONS` plus what the user adds
with ``--gdal-config KEY=VALUE`` (:func:`set_gdal_config`). ``s3://`` is read through ``/vsis3/`` with GDAL's own
AWS configuration: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and
``~/.aws`` files, ``AWS_REGION``, ``AWS_S3_ENDPOINT``, ``AWS_HTTPS=NO``, ``AWS_VIRTUAL_HOSTING=FALSE``,
``AWS_NO_SIGN_REQUEST``, from the environment or ``--gdal-config``.

Credentials never reach what is written or shown: the stored ``hrefs`` have no query string (signatures,
tokens), fragment or user info (:func:`public_href`), error messages name those public URLs and are cleaned of
any URL's query string and of the AWS keys' values (:func:`redact`). A read that fails is retried
(:data:`READ_ATTEMPTS`, backoff from :data:`RETRY_DELAY_S`; GDAL itself retries 429 and 5xx answers
``GDAL_HTTP_MAX_RETRY`` times), except a 403/404 or a file that is no raster, then raises OSError naming the URL
and the reason, so the job lists the item in ``failures.jsonl`` and goes on.

A store re-reads remote items only from the scheme and hosts its manifest declares (``remote_hosts``, written
from :func:`~mpsclip.archive.hrefs.remote_hosts`; checked by :func:`~mpsclip.archive.items.item_from_meta`),
never from a request. URL handling without GDAL is :mod:`mpsclip.archive.hrefs`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import rasterio
from PIL import Image
from rasterio.errors import RasterioError

from mpsclip.archive import geotiff
from mpsclip.archive.hrefs import allowed_remote, gdal_path, is_url, public_href, remote_hosts
from mpsclip.archive.items import Item, TileSettings, relative_to_root
from mpsclip.errors import MPSCLIPError

CLOUD_OPTIONS: dict[str, str | int] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing, no side-car files looked for
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.jpg,.jpeg,.png,.webp",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",  # a COG's header and tile index in the first request
    "GDAL_CACHEMAX": 256,  # MB of decoded blocks per process (rasterio takes this one as a number)
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(8 << 20),  # bytes per open file
    "GDAL_HTTP_MAX_RETRY": "3",  # for 429 and 5xx answers and some connection errors
    "GDAL_HTTP_RETRY_DELAY": "0.5",  # seconds, doubled at each retry
    "GDAL_HTTP_TIMEOUT": "30",
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
    "GDAL_PAM_ENABLED": "NO",  # never write .aux.xml files next to what is read
}
"""GDAL's configuration for cloud reads; ``--gdal-config KEY=VALUE`` overrides or adds keys."""
READ_ATTEMPTS = 3
RETRY_DELAY_S = 0.25
WHOLE_MAX_SIDE = 2048
SECRET_KEYS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "GDAL_HTTP_USERPWD",
    "GDAL_HTTP_HEADERS",
    "GDAL_HTTP_BEARER",
)
"""Options whose values :func:`redact` replaces wherever they appear (from the environment or --gdal-config)."""
PERMANENT = re.compile(r"HTTP (403|404)\b|supported file format|not a regular file|only .* are read|timed out", re.I)
"""Failure reasons not retried here: a retry cannot fix them, or GDAL has retried them already (timeouts)."""

_user_options: dict[str, str] = {}
T = TypeVar("T")
__all__ = ["allowed_remote", "remote_hosts", "remote_items", "read_remote", "set_gdal_config"]


def parse_gdal_config(pairs: Sequence[str]) -> dict[str, str]:
    """``--gdal-config KEY=VALUE`` flags as a dict; raises MPSCLIPError naming a malformed one (not its value)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise MPSCLIPError(
                f"--gdal-config {key if sep else '...'}: expected KEY=VALUE with an upper-case GDAL option name, "
                "e.g. --gdal-config GDAL_HTTP_TIMEOUT=60"
            )
        options[key] = value
    return options


def set_gdal_config(options: Mapping[str, str]) -> None:
    """The user's GDAL options (``--gdal-config``) for every remote read of this process and its forks."""
    _user_options.clear()
    _user_options.update(options)


def gdal_options() -> dict[str, str | int]:
    user: dict[str, str | int] = dict(_user_options)
    if user.get("GDAL_CACHEMAX", "").isdigit():
        user["GDAL_CACHEMAX"] = int(user["GDAL_CACHEMAX"])
    return {**CLOUD_OPTIONS, **user}


def gdal_env() -> rasterio.Env:
    """A rasterio environment with :func:`gdal_options` (thread-local in reading threads)."""
    return rasterio.Env(**gdal_options())


def _secrets() -> list[str]:
    values = [os.environ.get(key, "") for key in SECRET_KEYS] + [_user_options.get(key, "") for key in SECRET_KEYS]
    return [v for v in values if len(v) >= 4]


def redact(text: str) -> str:
    """``text`` with GDAL paths as URLs, every URL as :func:`public_href`, query strings (after any file name)
    dropped and AWS keys' values replaced."""
    text = re.sub(r"/vsis3/([^\s'\"]+)", r"s3://\1", text)
    text = re.sub(
        r"(?:/vsicurl/)?\b(?:https?|s3)://[^\s'\"<>]+", lambda m: public_href(m[0].removeprefix("/vsicurl/")), text
    )
    text = re.sub(r"\?[\w.~%-]+=[^\s'\"<>,]*", "", text)  # a query string GDAL names without its URL
    text = re.sub(r"<(AWSAccessKeyId|StringToSign|CanonicalRequest|SignatureProvided)>[^<]*", r"<\1>***", text)
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def failure_reason(err: BaseException) -> str:
    """A one-line reason for a failed read, without credentials (an HTTP status named when GDAL gave one)."""
    causes = [str(err)]
    while err.__cause__ is not None and len(causes) < 4:  # rasterio's "Read failed" keeps GDAL's reason here
        err = err.__cause__
        causes.append(str(err))
    message = redact(" ".join(" - ".join(dict.fromkeys(causes)).split()))
    status = re.search(r"HTTP response code[^0-9]*(\d{3})", message)
    return f"HTTP {status[1]} ({message})" if status else message


def with_retries(where: str, read: Callable[[], T]) -> T:
    """``read()`` within :func:`gdal_env`, retried (see the module's docstring); OSError ``<where>: <reason>``."""
    for attempt in range(READ_ATTEMPTS):
        try:
            with gdal_env():
                return read()
        except (RasterioError, OSError) as err:
            reason = failure_reason(err)
            if PERMANENT.search(reason) or attempt == READ_ATTEMPTS - 1:
                raise OSError(f"{where}: {reason}") from None  # not chained: the cause may hold a signed URL
        time.sleep(RETRY_DELAY_S * 2**attempt)
    raise AssertionError("unreachable")


def _checked_hrefs(hrefs: Sequence[str], where: str) -> list[str]:
    if len(hrefs) not in (1, 3):
        raise MPSCLIPError(f"{where}: 1 href (RGB or grey) or 3 (red, green, blue) per item, got {len(hrefs)}")
    for href in hrefs:
        gdal_path(href)  # refuses other schemes and GDAL virtual paths
        if not is_url(href) and not Path(href).is_absolute():
            raise MPSCLIPError(f"{where}: {href!r} is neither a URL nor an absolute path")
    return list(hrefs)


def _describe(hrefs: Sequence[str]) -> str:
    return ", ".join(public_href(h) for h in hrefs)


def remote_items(
    item_id: str, hrefs: Sequence[str], meta: dict[str, Any], tiles: TileSettings | None, root: Path
) -> list[Item]:
    """The items of one raster or three band rasters (see the module's docstring). ``meta`` is kept on every item;
    ``hrefs`` are stored public (URLs) or relative to ``root`` (local paths). With ``tiles``, the rasters are
    opened to list their tiles (a raster without georeferencing stays one ``remote`` item); a raster that cannot
    be opened then raises OSError naming its URL (no credentials), a bad choice of bands MPSCLIPError."""
    readable = tuple(_checked_hrefs(hrefs, item_id))
    stored = [public_href(h) if is_url(h) else relative_to_root(Path(h), root) for h in readable]
    path = Path(readable[0]) if not is_url(readable[0]) else Path(stored[0])
    base = {**meta, "hrefs": stored}
    whole = [Item(item_id, path, {**base, "kind": "remote"}, "remote", readable)]
    if tiles is None:
        return whole
    where = _describe(readable)

    def listed() -> list[tuple[str, dict[str, Any]]] | None:
        with geotiff.open_scene([gdal_path(h) for h in readable], tiles.bands, where) as scene:
            if not geotiff.georeferenced(scene.grid):
                return None
            bands = [band for _, band in scene.layers]
            grid = [ds for ds, _ in scene.layers].index(scene.grid)
            return [(s, {"bands": bands, "grid": grid, **m}) for s, m in geotiff.tile_metas(scene, tiles, where)]

    metas = with_retries(where, listed)
    if metas is None:
        return whole
    return [
        Item(f"{item_id}/{suffix}", path, {**base, **tile, "kind": "remote-window"}, "remote-window", readable)
        for suffix, tile in metas
    ]


def read_remote(item: Item) -> Image.Image:
    """The RGB image of a ``remote`` or ``remote-window`` item; OSError naming its URLs when it cannot be read."""
    hrefs = item.hrefs or tuple(item.meta["hrefs"])
    where = _describe(hrefs)
    bands = tuple(item.meta["bands"]) if "bands" in item.meta else None

    def read() -> Image.Image:
        try:
            with geotiff.open_scene([gdal_path(h) for h in hrefs], bands, where) as scene:
                if item.kind == "remote":
                    return geotiff.read_whole(scene, WHOLE_MAX_SIDE)
                return geotiff.read_window(scene, item.meta)
        except MPSCLIPError as err:
            raise OSError(str(err)) from None

    return with_retries(where, read)
