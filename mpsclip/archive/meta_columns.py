"""An item's common meta keys as real shard columns, so DuckDB, pandas and GeoPandas filter on them directly.

Lifted out of the JSON ``meta`` string (which keeps the rest): ``kind``, ``source_path`` (the item's file below the
store's ``source_root``: meta ``path``, ``tar`` or ``scene`` by kind), ``scene``, ``crs``, ``window``
(``[col_off, row_off, width, height]``), ``keywords``, ``footprint`` (as the GeoParquet ``geometry`` and
``bbox`` columns, :mod:`mpsclip.archive.geoparquet`) and what STAC items carry: ``stac_item``, ``collection``,
``platform``, ``datetime`` (an RFC 3339 string in meta, a UTC timestamp column), ``eo:cloud_cover`` (a number, a
float column) and the asset ``hrefs``. A key is lifted only when its value has its column's type (a string, four
integers, a list of strings, a valid footprint, an RFC 3339 datetime with an offset, a finite number); anything
else stays in ``meta``, so :func:`merged_metas` gives back every item's meta as written (footprint numbers and
cloud cover as floats; a datetime not written as :func:`~mpsclip.archive.dates.format_datetime` writes it is also
kept as written in ``meta``, which wins). Shards written before these columns existed hold the whole meta in
``meta``, or lack the newer columns, and read the same. Row-group statistics are written for the columns that
filters compare (:data:`STATISTICS`), so date and cloud filters skip row groups as bbox filters do.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

import pyarrow as pa

from mpsclip.archive.dates import DateError, format_datetime, parse_datetime
from mpsclip.archive.geoparquet import GEOMETRY, BBox, footprint_from_wkb, valid_footprint
from mpsclip.archive.items import PATH_KEYS

DATETIME, CLOUD_COVER = "datetime", "eo:cloud_cover"
COLUMNS: dict[str, pa.DataType] = {
    "kind": pa.string(),
    "source_path": pa.string(),
    "scene": pa.string(),
    "crs": pa.string(),
    "window": pa.list_(pa.int64()),
    "keywords": pa.list_(pa.string()),
    "stac_item": pa.string(),
    "collection": pa.string(),
    "platform": pa.string(),
    DATETIME: pa.timestamp("us", tz="UTC"),
    CLOUD_COVER: pa.float64(),
    "hrefs": pa.list_(pa.string()),
}
"""The lifted columns (besides the geometry) and their Arrow types."""
STATISTICS = ["kind", "source_path", "scene", "crs", "stac_item", "collection", "platform", DATETIME, CLOUD_COVER]
"""Lifted columns whose row-group statistics are written (what filters compare)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _datetime(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_datetime(value)
    except DateError:
        return None


def lift(meta: dict[str, Any], name: str) -> Any:
    """The value meta holds for column ``name`` if it has the column's type (a datetime parsed, in UTC; a cloud
    cover as a float), else None."""
    if name == DATETIME:
        return _datetime(meta.get(name))
    if name == CLOUD_COVER:
        value = meta.get(name)
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if number else None
    if name == "source_path":
        key = PATH_KEYS.get(meta["kind"]) if isinstance(meta.get("kind"), str) else None
        value = meta.get(key) if key else None
        return value if isinstance(value, str) else None
    value = meta.get(name)
    if name == "window":
        return value if isinstance(value, list) and len(value) == 4 and all(map(_is_int, value)) else None
    if name in ("keywords", "hrefs"):
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None
    return value if isinstance(value, str) else None


def split_meta(meta: dict[str, Any]) -> tuple[dict[str, Any], BBox | None, dict[str, Any]]:
    """``(lifted column values, footprint or None, the rest)`` of one item's meta."""
    lifted = {name: lift(meta, name) for name in COLUMNS}
    rest = dict(meta)
    for name, value in lifted.items():
        if value is not None and not (name == DATETIME and format_datetime(value) != meta[name]):
            rest.pop(PATH_KEYS[meta["kind"]] if name == "source_path" else name, None)
    fp = valid_footprint(meta.get("footprint"))
    if fp is not None:
        del rest["footprint"]
    return lifted, fp, rest


def lifted_arrays(lifted: list[dict[str, Any]]) -> dict[str, pa.Array]:
    """The lifted columns of a shard's rows (:func:`split_meta`'s first values)."""
    return {name: pa.array([row[name] for row in lifted], type=kind) for name, kind in COLUMNS.items()}


def merged_metas(table: pa.Table) -> list[dict[str, Any]]:
    """Every row's whole meta (keys sorted) from ``meta`` plus the lifted and geometry columns ``table`` has."""
    rests = [json.loads(m) for m in table.column("meta").to_pylist()]
    names = [name for name in COLUMNS if name in table.column_names]
    values = {name: table.column(name).to_pylist() for name in names}
    geometry = table.column(GEOMETRY).to_pylist() if GEOMETRY in table.column_names else None
    kinds = values.get("kind")
    for row, rest in enumerate(rests):
        for name in names:
            value = values[name][row]
            if value is None or (name == DATETIME and name in rest):  # a datetime kept as written wins
                continue
            key = PATH_KEYS[kinds[row]] if name == "source_path" and kinds else name
            rest[key] = format_datetime(value) if name == DATETIME else value
        if geometry is not None and geometry[row] is not None:
            rest["footprint"] = list(footprint_from_wkb(geometry[row]))
    return [dict(sorted(rest.items())) for rest in rests]


def meta_columns_of(names: list[str]) -> list[str]:
    """The columns of a shard with ``names`` that :func:`merged_metas` reads (``meta`` first)."""
    return ["meta", *(n for n in [*COLUMNS, GEOMETRY] if n in names)]
