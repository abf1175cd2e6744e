"""STAC sources: the assets to embed of a STAC Catalog, Collection, Item or ItemCollection or of a stac-geoparquet
file (each a local file or an ``http(s)://`` or ``s3://`` URL), or of a STAC API item search (``<api>/search?...``).

This module only lists (with ``pystac``, ``pystac-client`` and ``stac-geoparquet``; ``pip install 'mpsclip[stac]'``):
:func:`list_records` gives one :class:`AssetRecord` per STAC item, ``(item id, asset hrefs, meta)``, that
:func:`mpsclip.archive.remote.remote_items` turns into items (one per item, or one per tile).

* Item ids are ``<collection>/<STAC item id>`` (the STAC item id alone for an item without a collection); they
  name no asset set, since the asset choice is part of SOURCE and one store never holds two of one item.
* A static catalog's item files are read :data:`LIST_THREADS` at a time; requests over HTTP(S) have bounded
  timeouts and retries (:func:`http_pool`, also for STAC API searches).
* Assets are chosen by key or, for single-band assets, by ``eo:bands``/``bands`` common name: ``visual`` (one RGB
  asset) or ``red,green,blue`` (one asset a band). Without a choice, each item gives its ``visual`` asset, else its
  red, green and blue bands. An item without them is left out and reported (:attr:`Listing.missing`); a source
  none of whose items has them is an error.
* Meta: ``stac_item`` (the STAC id), ``collection``, ``datetime`` (UTC, RFC 3339; ``start_datetime`` for an item
  with a range only), ``platform``, ``eo:cloud_cover`` (where the item has them) and ``assets`` (the keys).
* Hrefs are given as the catalog has them (a signed URL still reads); whatever is stored or shown goes through
  :func:`~mpsclip.archive.hrefs.public_href` (no query string, fragment or user info).
* ``s3://`` catalogs are read with boto3 from the standard AWS environment and profiles, at ``AWS_ENDPOINT_URL``
  (or GDAL's ``AWS_S3_ENDPOINT`` with ``AWS_HTTPS``) with path-style addressing for such an endpoint or with
  ``AWS_VIRTUAL_HOSTING=FALSE``, anonymously with ``AWS_NO_SIGN_REQUEST=YES`` (public buckets).

A source may end with ``#assets=KEY,...`` (as ``mpsclip embed --assets`` writes it), so that the asset choice is
part of the SOURCE a store records.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mpsclip.archive.hrefs import is_url, public_href
from mpsclip.bbox import BBox, check_bbox, parse_bbox
from mpsclip.errors import MPSCLIPError

if TYPE_CHECKING:
    import pystac

STAC_JSON_SUFFIXES = (".json", ".geojson")
GEOPARQUET_SUFFIXES = (".parquet", ".geoparquet")
ASSETS_FRAGMENT = "#assets="
DEFAULT_ASSETS: tuple[tuple[str, ...], ...] = (("visual",), ("red", "green", "blue"))
"""The asset sets tried, in order, for an item when no ``--assets`` is given."""
FALSE_WORDS = ("NO", "FALSE", "OFF", "0")
INSTALL_HINT = "install the STAC extra: pip install 'mpsclip[stac]'"
HTTP_TIMEOUT_S = (10.0, 30.0)
"""Connect and read timeouts of one catalog request, in seconds."""
HTTP_RETRIES = 3
LIST_THREADS = 16
"""Item JSONs of a static catalog read at once (their requests' latency overlaps)."""
RETRY_STATUSES = (429, 500, 502, 503, 504)
QUERY_IN_TEXT = re.compile(r"\?[^\s'\"<>()]*")
URL_IN_TEXT = re.compile(r"\b(?:https?|s3)://[^\s'\"<>]+")


@dataclass(frozen=True)
class AssetRecord:
    """What one STAC item gives to embed: its id, the hrefs of its chosen assets (1 RGB or grey asset, or red,
    green, blue) and the metadata kept on each of its items."""

    item_id: str
    hrefs: tuple[str, ...]
    meta: dict[str, Any]


@dataclass(frozen=True)
class Listing:
    """The records of a STAC source, sorted by id, and ``(item id, reason)`` for the items left out."""

    records: list[AssetRecord]
    missing: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class StacSearch:
    """A STAC API item search; :meth:`url` is its GET form (``<api>/search?collections=...``), the SOURCE that
    ``mpsclip embed --stac-api`` embeds and a store records."""

    api: str
    collections: tuple[str, ...] = ()
    bbox: BBox | None = None
    datetime: str | None = None
    query: dict[str, Any] | list[str] | None = None
    filter: str | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if urlsplit(self.api).scheme not in ("http", "https"):
            raise MPSCLIPError(f"--stac-api {self.api!r}: expected the http(s):// URL of a STAC API's landing page")
        if self.bbox is not None:
            try:
                check_bbox(self.bbox)
            except MPSCLIPError as err:
                raise MPSCLIPError(f"bbox {self.bbox}: {err}") from None

    def url(self) -> str:
        params: list[tuple[str, str]] = []
        if self.collections:
            params.append(("collections", ",".join(self.collections)))
        if self.bbox is not None:
            params.append(("bbox", ",".join(f"{v:g}" for v in self.bbox)))
        if self.datetime:
            params.append(("datetime", self.datetime))
        if self.query is not None:
            params.append(("query", json.dumps(self.query, sort_keys=True)))
        if isinstance(self.filter, str):
            params += [("filter", self.filter), ("filter-lang", "cql2-text")]
        elif self.filter is not None:
            params += [("filter", json.dumps(self.filter, sort_keys=True)), ("filter-lang", "cql2-json")]
        return f"{self.api.rstrip('/')}/search" + (f"?{urlencode(params)}" if params else "")

    @classmethod
    def from_url(cls, url: str) -> StacSearch:
        """The search of a GET search URL (as :meth:`url` writes it)."""
        parts = urlsplit(url)
        api = urlunsplit((parts.scheme, parts.netloc, parts.path.rsplit("/search", 1)[0] or "/", "", ""))
        params = dict(parse_qsl(parts.query))
        known = {"collections", "bbox", "datetime", "query", "filter", "filter-lang"}
        if set(params) - known:
            raise MPSCLIPError(
                f"{public_href(url)}: unknown search parameters {sorted(set(params) - known)}; "
                f"use {', '.join(sorted(known))}"
            )
        try:
            bbox = parse_bbox(params["bbox"]) if "bbox" in params else None
        except MPSCLIPError as err:
            raise MPSCLIPError(f"{public_href(url)}: bbox {err}") from None
        filter_: str | dict[str, Any] | None = params.get("filter")
        if filter_ is not None and params.get("filter-lang") == "cql2-json":
            filter_ = json.loads(filter_)
        return cls(
            api=api,
            collections=tuple(c for c in params.get("collections", "").split(",") if c),
            bbox=bbox,
            datetime=params.get("datetime"),
            query=json.loads(params["query"]) if "query" in params else None,
            filter=filter_,
        )


def parse_query(texts: Sequence[str]) -> dict[str, Any] | list[str] | None:
    """``--query`` values: one JSON object of the query extension, or expressions like ``eo:cloud_cover<20``."""
    if not texts:
        return None
    if len(texts) == 1 and texts[0].lstrip().startswith("{"):
        try:
            return dict(json.loads(texts[0]))
        except ValueError as err:
            raise MPSCLIPError(f"--query {texts[0]!r}: not a JSON object ({err})") from err
    return list(texts)


def parse_filter(text: str | None) -> str | dict[str, Any] | None:
    """``--filter``: CQL2 text, or CQL2 JSON when it starts with ``{``."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return dict(json.loads(text))
    except ValueError as err:
        raise MPSCLIPError(f"--filter {text!r}: starts with '{{' but is not CQL2 JSON ({err})") from err


def checked_source(source: str) -> str:
    """``source``, refused when it is a URL with a query string (other than a search's parameters): the store's
    manifest records its SOURCE, and signatures or tokens must not land there."""
    base = split_assets(source)[0]
    if is_url(base) and urlsplit(base).query and not urlsplit(base).path.rstrip("/").endswith("/search"):
        raise MPSCLIPError(
            f"{public_href(base)}: a query string (a signature or token?) in SOURCE would be recorded in the store's "
            "manifest; give the URL without it and credentials through the environment (AWS_*, ~/.netrc)"
        )
    return source


def split_assets(source: str) -> tuple[str, tuple[str, ...] | None]:
    """``SOURCE#assets=a,b`` as ``(SOURCE, ("a", "b"))``; ``(source, None)`` without the suffix."""
    if ASSETS_FRAGMENT not in source:
        return source, None
    base, keys = source.rsplit(ASSETS_FRAGMENT, 1)
    chosen = tuple(k.strip() for k in keys.split(",") if k.strip())
    if len(chosen) not in (1, 3):
        raise MPSCLIPError(f"--assets {keys!r}: give one asset (visual) or three (red,green,blue)")
    return base, chosen


def with_assets(source: str, assets: Sequence[str] | None) -> str:
    """``source`` with its asset choice appended (see :func:`split_assets`)."""
    return source if not assets else f"{source}{ASSETS_FRAGMENT}{','.join(assets)}"


def is_stac_source(source: str) -> bool:
    """Whether ``source`` is listed here: a URL, a STAC JSON file or a stac-geoparquet file."""
    base = split_assets(source)[0]
    if is_url(base):
        return True
    suffix = Path(base).suffix.lower()
    return suffix in STAC_JSON_SUFFIXES + GEOPARQUET_SUFFIXES


def stac_root(source: str) -> Path:
    """The folder local asset paths are stored relative to: a local file's folder, else the current folder."""
    base = split_assets(source)[0]
    return Path(os.path.abspath(Path.cwd() if is_url(base) else Path(base).parent))


def list_records(source: str) -> Listing:
    """The records of ``source`` (see the module's doc), sorted by id."""
    base, assets = split_assets(source)
    shown = public_href(base)
    try:
        items = _read_items(base)
    except MPSCLIPError:
        raise
    except ImportError as err:
        raise MPSCLIPError(f"{shown}: reading STAC needs {err.name}; {INSTALL_HINT}") from err
    except Exception as err:  # pystac, pystac-client, urllib and boto3 raise many kinds: name the source
        raise MPSCLIPError(
            f"{shown}: cannot read it as STAC ({_reason(err)}); check the URL or file, the network "
            "and, for s3://, the AWS credentials and AWS_ENDPOINT_URL"
        ) from None  # not chained: the cause may hold a signed URL
    return _records(items, assets, shown)


def _reason(err: BaseException | None) -> str:
    """``err`` and its first causes as one line, every URL in it without query string or user info."""
    reasons = []
    while err is not None and len(reasons) < 4:
        reasons.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    text = URL_IN_TEXT.sub(lambda m: public_href(m[0]), " <- ".join(reasons))
    return QUERY_IN_TEXT.sub("", text)  # a query string named without its URL (urllib3 names the path alone)


def _records(items: Iterable[tuple[pystac.Item, str | None]], assets: tuple[str, ...] | None, shown: str) -> Listing:
    records: dict[str, AssetRecord] = {}
    missing: list[tuple[str, str]] = []
    n_items = 0
    for item, base_href in items:
        n_items += 1
        item_id = f"{item.collection_id}/{item.id}" if item.collection_id else item.id
        keys = _choose_assets(item, assets)
        if keys is None:
            wanted = ",".join(assets) if assets else " or ".join(",".join(s) for s in DEFAULT_ASSETS)
            missing.append((item_id, f"no asset {wanted} (has {', '.join(sorted(item.assets)) or 'none'})"))
            continue
        hrefs = tuple(_asset_href(item, key, base_href) for key in keys)
        record = AssetRecord(item_id, hrefs, _item_meta(item, keys))
        old = records.get(item_id)
        if old is not None and old.hrefs != hrefs:
            raise MPSCLIPError(
                f"{shown}: item {item_id} is listed twice with other assets ({public_href(old.hrefs[0])} and "
                f"{public_href(hrefs[0])}); give each item of a collection its own id"
            )
        records[item_id] = record
    if n_items == 0:
        raise MPSCLIPError(f"{shown}: no STAC items found; check the catalog's links or the search's parameters")
    if not records:
        example = "; ".join(f"{i}: {why}" for i, why in missing[:3])
        raise MPSCLIPError(
            f"{shown}: none of its {n_items} items has the assets to embed ({example}); choose them with --assets "
            "(an asset key such as visual, or band common names such as red,green,blue)"
        )
    return Listing(sorted(records.values(), key=lambda r: r.item_id), missing)


def report_missing(listing: Listing, shown: str) -> None:
    """Name the items a listing left out on stderr (the job goes on with the others)."""
    for item_id, reason in listing.missing:
        print(f"{shown}: item {item_id} left out: {reason}", file=sys.stderr)


def _choose_assets(item: pystac.Item, assets: tuple[str, ...] | None) -> tuple[str, ...] | None:
    for wanted in (assets,) if assets else DEFAULT_ASSETS:
        keys = tuple(_find_asset(item, name) for name in wanted)
        if all(keys):
            return tuple(k for k in keys if k)
    return None


def _find_asset(item: pystac.Item, name: str) -> str | None:
    """The key of ``item``'s asset named ``name``: by key, else the single-band asset of that common name."""
    if name in item.assets:
        return name
    for key, asset in sorted(item.assets.items()):
        bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
        if len(bands) == 1 and name in (bands[0].get("common_name"), bands[0].get("eo:common_name")):
            return key
    return None


def _asset_href(item: pystac.Item, key: str, base_href: str | None) -> str:
    from pystac.utils import make_absolute_href

    href = item.assets[key].get_absolute_href() or item.assets[key].href
    if base_href is not None and not is_url(href) and not os.path.isabs(href):
        href = make_absolute_href(href, base_href)
    return href


def _item_meta(item: pystac.Item, keys: tuple[str, ...]) -> dict[str, Any]:
    props = item.properties
    meta: dict[str, Any] = {"stac_item": item.id}
    if item.collection_id:
        meta["collection"] = item.collection_id
    when = item.datetime or _parse_time(props.get("start_datetime"))
    if when is not None:
        meta["datetime"] = utc_rfc3339(when)
    for key in ("platform", "eo:cloud_cover"):
        if props.get(key) is not None:
            meta[key] = props[key]
    meta["assets"] = list(keys)
    return meta


def _parse_time(text: str | None) -> datetime | None:
    from pystac.utils import str_to_datetime

    return str_to_datetime(text) if text else None


def utc_rfc3339(when: datetime) -> str:
    """``when`` in UTC as ``2024-05-01T10:20:30Z`` (microseconds kept when there are any); naive means UTC."""
    when = when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    return when.replace(tzinfo=None).isoformat() + "Z"


def _read_items(source: str) -> Iterable[tuple[pystac.Item, str | None]]:
    """``(item, href its relative asset hrefs are relative to)`` of every item of ``source``."""
    path = urlsplit(source).path if is_url(source) else source
    if path.rstrip("/").endswith("/search") and urlsplit(source).scheme in ("http", "https"):
        return [(item, None) for item in _search_items(StacSearch.from_url(source))]
    if Path(path).suffix.lower() in GEOPARQUET_SUFFIXES:
        href = source if is_url(source) else os.path.abspath(source)
        return [(item, href) for item in _geoparquet_items(href)]
    return _json_items(source)


def _json_items(source: str) -> list[tuple[pystac.Item, str | None]]:
    import pystac

    stac_io = archive_stac_io()
    href = source if is_url(source) else os.path.abspath(source)
    data = stac_io.read_json(href)
    if data.get("type") == "FeatureCollection":
        collection = pystac.ItemCollection.from_dict(data, preserve_dict=False)
        return [(item, href) for item in collection.items]
    obj = pystac.read_dict(data, href=href, stac_io=stac_io)
    if isinstance(obj, pystac.Item):
        return [(obj, href)]
    if isinstance(obj, pystac.Catalog):  # a Collection is a Catalog
        return _catalog_items(obj, stac_io)
    raise MPSCLIPError(f"{public_href(source)}: a STAC {type(obj).__name__}, not a Catalog, Collection or Item(s)")


def _catalog_items(catalog: pystac.Catalog, stac_io: pystac.StacIO) -> list[tuple[pystac.Item, str | None]]:
    """Every item below ``catalog``: its catalogs and collections walked in turn, the item JSONs (one request
    each in a static catalog) read :data:`LIST_THREADS` at a time."""
    import pystac

    hrefs: list[str] = []
    nodes = [catalog]
    while nodes:
        node = nodes.pop()
        hrefs += [link.get_absolute_href() or link.href for link in node.get_links(pystac.RelType.ITEM)]
        nodes.extend(node.get_children())
    with ThreadPoolExecutor(LIST_THREADS) as pool:
        features = list(pool.map(stac_io.read_json, hrefs))
    return [(pystac.Item.from_dict(d, href=h, preserve_dict=False), h) for d, h in zip(features, hrefs, strict=True)]


def _geoparquet_items(href: str) -> list[pystac.Item]:
    """The items of a stac-geoparquet file, a local path or a URL (read whole: it holds metadata only)."""
    import pyarrow as pa
    import pyarrow.fs  # noqa: F401  (stac-geoparquet 0.8 uses pyarrow.fs without importing it)
    import pyarrow.parquet as pq
    import pystac
    from stac_geoparquet.arrow import stac_table_to_items

    if is_url(href):
        table = pq.read_table(pa.BufferReader(archive_stac_io().read_bytes(href)))
    elif Path(href).is_file():
        table = pq.read_table(href)
    else:
        raise MPSCLIPError(f"{href}: no such stac-geoparquet file")
    return [pystac.Item.from_dict(d, preserve_dict=False) for d in stac_table_to_items(table)]


def _search_items(search: StacSearch) -> list[pystac.Item]:
    from pystac_client import Client
    from pystac_client.stac_api_io import StacApiIO
    from pystac_client.warnings import DoesNotConformTo

    client = Client.open(search.api, stac_io=StacApiIO(timeout=HTTP_TIMEOUT_S, max_retries=http_retry()))
    filter_lang = None if search.filter is None else "cql2-text" if isinstance(search.filter, str) else "cql2-json"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DoesNotConformTo)  # pystac-client would only warn, then find nothing
        try:
            found = client.search(
                collections=list(search.collections) or None,
                bbox=search.bbox,
                datetime=search.datetime,
                query=search.query,
                filter=search.filter,
                filter_lang=filter_lang,
            )
        except DoesNotConformTo as err:
            name = str(err.args[0]) if err.args else "search"
            flag = {"QUERY": "--query", "FILTER": "--filter"}.get(name, "that parameter")
            raise MPSCLIPError(
                f"{search.api}: this STAC API does not declare the {name} extension (its landing page's "
                f"conformsTo); drop {flag} or search another API"
            ) from None
    return list(found.items())


def s3_endpoint() -> str | None:
    """The S3 endpoint URL the environment names: ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (boto3's), else
    GDAL's ``AWS_S3_ENDPOINT`` (a host[:port], https unless ``AWS_HTTPS=NO``); None for AWS itself."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url:
        return url
    host = os.environ.get("AWS_S3_ENDPOINT")
    if not host:
        return None
    if "://" in host:
        return host
    https = os.environ.get("AWS_HTTPS", "YES").upper() not in FALSE_WORDS
    return f"{'https' if https else 'http'}://{host}"


def s3_client() -> Any:
    """A boto3 S3 client for :func:`s3_endpoint`, path-style there or with ``AWS_VIRTUAL_HOSTING=FALSE``, and
    anonymous with ``AWS_NO_SIGN_REQUEST=YES`` (public buckets, as GDAL reads them)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    endpoint = s3_endpoint()
    path_style = endpoint is not None or os.environ.get("AWS_VIRTUAL_HOSTING", "TRUE").upper() in FALSE_WORDS
    unsigned = os.environ.get("AWS_NO_SIGN_REQUEST", "NO").upper() not in FALSE_WORDS
    config = Config(
        s3={"addressing_style": "path" if path_style else "auto"},
        retries={"max_attempts": 5},
        **({"signature_version": UNSIGNED} if unsigned else {}),
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)  # the environment as it is now


def http_retry() -> Any:
    """urllib3's retries for catalog and API requests: :data:`HTTP_RETRIES` with backoff on connection errors,
    timeouts and 429/5xx answers."""
    import urllib3

    return urllib3.Retry(
        total=HTTP_RETRIES, backoff_factor=0.25, status_forcelist=RETRY_STATUSES, raise_on_status=False
    )


def http_pool() -> Any:
    """A urllib3 pool for catalog reads: :data:`HTTP_TIMEOUT_S` to connect and to read, :func:`http_retry`."""
    import urllib3

    connect, read = HTTP_TIMEOUT_S
    timeout = urllib3.Timeout(connect=connect, read=read)
    return urllib3.PoolManager(maxsize=LIST_THREADS, timeout=timeout, retries=http_retry())


def archive_stac_io() -> pystac.StacIO:
    """pystac's StacIO reading ``s3://`` hrefs with :func:`s3_client` and ``http(s)://`` ones with :func:`http_pool`."""
    from pystac.stac_io import DefaultStacIO

    class ArchiveStacIO(DefaultStacIO):
        s3: Any = None  # one client (or pool) for every read of a listing, made on the first href that needs it
        http: Any = None

        def read_text_from_href(self, href: str) -> str:
            if is_url(href):
                return self.read_bytes(href).decode("utf-8")
            return str(super().read_text_from_href(href))

        def read_bytes(self, href: str) -> bytes:
            """The bytes of an ``s3://`` or ``http(s)://`` href."""
            if urlsplit(href).scheme == "s3":
                self.s3 = self.s3 or s3_client()
                parts = urlsplit(href)
                return bytes(self.s3.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))["Body"].read())
            self.http = self.http or http_pool()
            answer = self.http.request("GET", href, headers={"User-Agent": "mpsclip", **self.headers})
            if answer.status >= 400:
                raise OSError(f"HTTP {answer.status} {answer.reason}")
            return bytes(answer.data)

    return ArchiveStacIO()
