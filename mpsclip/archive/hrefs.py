"""Where remote items' rasters are: ``http(s)://`` and ``s3://`` URLs as they may be stored and shown, their
hosts, and their GDAL names; plain string handling (no GDAL), so stores and items check them cheaply.

A stored or shown URL has no user info, query string (signatures, tokens) or fragment (:func:`public_href`); a
store declares the ``scheme://host[:port]`` its items read (:func:`remote_hosts`), and only those are read again
(:func:`allowed_remote`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from mpsclip.errors import MPSCLIPError

if TYPE_CHECKING:
    from mpsclip.archive.items import Item

SCHEMES = ("http", "https", "s3")
REMOTE_KINDS = ("remote", "remote-window")
"""Item kinds whose meta ``hrefs`` name their rasters: URLs (no query string, no user info) or local paths."""


def is_url(href: str) -> bool:
    return urlsplit(href).scheme.lower() in SCHEMES and "://" in href


def public_href(href: str) -> str:
    """``href`` as it may be stored and shown: no user info, query string or fragment (a local path as is)."""
    if not is_url(href):
        return href
    parts = urlsplit(href)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path, "", ""))


def host_of(href: str) -> str:
    """``scheme://host[:port]`` of a URL (an ``s3://`` URL's host is its bucket)."""
    parts = urlsplit(public_href(href))
    return f"{parts.scheme}://{parts.netloc}"


def allowed_remote(href: str, allowed: set[str]) -> bool:
    """True when ``href`` is a URL whose ``scheme://host[:port]`` is one of ``allowed`` (as :func:`host_of`)."""
    return is_url(href) and host_of(href) in allowed


def remote_hosts(items: Iterable[Item]) -> list[str]:
    """The sorted ``scheme://host[:port]`` of every URL the items read: what a store's manifest declares."""
    return sorted({host_of(h) for it in items if it.kind in REMOTE_KINDS for h in it.meta["hrefs"] if is_url(h)})


def gdal_path(href: str) -> str:
    """The GDAL name of an href: ``/vsicurl/<url>`` for HTTP(S), ``/vsis3/<bucket>/<key>`` for S3, a local path
    as is (raises MPSCLIPError for another scheme or a GDAL virtual path)."""
    scheme = urlsplit(href).scheme.lower()
    if scheme in ("http", "https"):
        return "/vsicurl/" + href
    if scheme == "s3":
        parts = urlsplit(href)
        return f"/vsis3/{parts.netloc}{parts.path}"
    if "://" in href or href.startswith("/vsi"):
        raise MPSCLIPError(f"{public_href(href)}: only http(s):// and s3:// URLs or local paths are read")
    return href
