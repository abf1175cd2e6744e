"""Footprints as GeoParquet 1.1 geometry: WKB polygons, the ``bbox`` covering, the ``geo`` metadata and pruning.

A footprint is ``[west, south, east, north]`` in degrees (EPSG:4326, lon/lat order); ``west > east`` means the
tile crosses the antimeridian (what ``rasterio.warp.transform_bounds`` returns then). Such a footprint is split
at ±180° into two rectangles, so the geometry is a MultiPolygon that GeoPandas, DuckDB, QGIS and RFC 7946 GeoJSON
readers take as is (no wrapped polygon covering the rest of the globe). Exterior rings are counter-clockwise.

The ``bbox`` covering of a row is the plain bounds of its geometry (``[-180, south, 180, north]`` for a split
footprint): a conservative box, so readers that compare ``bbox.xmin <= east AND bbox.xmax >= west`` (DuckDB SQL,
row-group statistics) never miss a row; the exact test (:func:`footprints_meeting`) then looks at each part.

The CRS is left out of the ``geo`` metadata, which per the GeoParquet specification means OGC:CRS84: WGS 84 with
lon/lat axis order, exactly these coordinates (EPSG:4326 itself is lat/lon by its definition). Edges are planar.

pyarrow 20's dataset scanner does not prune row groups on the statistics of struct fields (``bbox.xmin``), so
:func:`row_groups_in_bbox` reads those statistics from the Parquet footer itself.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

BBox = tuple[float, float, float, float]
GEOMETRY = "geometry"
BBOX = "bbox"
BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")
BBOX_TYPE = pa.struct([pa.field(name, pa.float64()) for name in BBOX_FIELDS])
VERSION = "1.1.0"
ROW_GROUP_ROWS = 256
"""Rows per Parquet row group: in scene order, a group covers a strip of a scene, so its bbox statistics are tight."""

_POLYGON, _MULTIPOLYGON = 3, 6
_HEADER = struct.Struct("<BI")


def valid_footprint(value: Any) -> BBox | None:
    """``value`` as a footprint if it is four finite numbers with south <= north and, when west > east
    (antimeridian), both longitudes within ±180; else None."""
    if not isinstance(value, list | tuple) or len(value) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    west, south, east, north = (float(v) for v in value)
    if south > north or (west > east and not -180.0 <= east < west <= 180.0):
        return None
    return west, south, east, north


def footprint_parts(fp: BBox) -> list[BBox]:
    """The rectangles of a footprint: itself, or its two sides of the antimeridian (empty sides left out)."""
    west, south, east, north = fp
    if west <= east:
        return [fp]
    sides = [(west, south, 180.0, north), (-180.0, south, east, north)]
    return [side for side in sides if side[0] < side[2]] or [(west, south, 180.0, north)]


def covering(fp: BBox) -> BBox:
    """The plain bounds of a footprint's parts: the row's ``bbox`` covering."""
    parts = footprint_parts(fp)
    return (min(p[0] for p in parts), fp[1], max(p[2] for p in parts), fp[3])


def footprint_array(footprints: list[BBox | None]) -> np.ndarray:
    """Footprints as a float64 ``[n, 4]`` array (NaN rows for items without one), for :func:`footprints_meeting`."""
    array = np.full((len(footprints), 4), np.nan)
    for row, fp in enumerate(footprints):
        if fp is not None:
            array[row] = fp
    return array


def footprints_meeting(footprints: np.ndarray, box: BBox) -> np.ndarray:
    """Rows of a :func:`footprint_array` whose footprint meets ``box``: some part of it (:func:`footprint_parts`)
    overlaps the box, closed intervals (touching counts; NaN rows never meet). A ``box`` with west > east (across
    the antimeridian) is its two sides."""
    if box[0] > box[2]:
        return np.unique(np.concatenate([footprints_meeting(footprints, side) for side in footprint_parts(box)]))
    w, s, e, n = footprints.T
    west, south, east, north = box
    lat = (s <= north) & (n >= south)
    plain = (w <= e) & (w <= east) & (e >= west)
    # across the antimeridian the parts are [w, 180] and [-180, e]; footprint_parts drops an empty one
    west_part = (w <= east) & ((w < 180.0) | (e == -180.0))
    east_part = (e >= west) & (e > -180.0)
    return np.flatnonzero(lat & (plain | ((w > e) & (west_part | east_part))))


def ring(part: BBox) -> list[list[float]]:
    """The closed counter-clockwise ring of a rectangle, lon/lat pairs."""
    west, south, east, north = part
    return [[west, south], [east, south], [east, north], [west, north], [west, south]]


def geojson_geometry(fp: BBox) -> dict[str, Any]:
    """An RFC 7946 geometry of a footprint: a Polygon, or a MultiPolygon for one crossing the antimeridian."""
    parts = footprint_parts(fp)
    if len(parts) == 1:
        return {"type": "Polygon", "coordinates": [ring(parts[0])]}
    return {"type": "MultiPolygon", "coordinates": [[ring(p)] for p in parts]}


def _polygon_wkb(part: BBox) -> bytes:
    points = ring(part)
    coords = struct.pack(f"<{2 * len(points)}d", *(v for point in points for v in point))
    return _HEADER.pack(1, _POLYGON) + struct.pack("<II", 1, len(points)) + coords


def footprint_wkb(fp: BBox) -> bytes:
    """ISO WKB (little-endian) of :func:`geojson_geometry`'s shape."""
    parts = footprint_parts(fp)
    if len(parts) == 1:
        return _polygon_wkb(parts[0])
    return _HEADER.pack(1, _MULTIPOLYGON) + struct.pack("<I", len(parts)) + b"".join(map(_polygon_wkb, parts))


def _polygon_bounds(data: bytes, at: int) -> tuple[BBox, int]:
    """Bounds of the little-endian WKB polygon at ``at`` and the offset after it."""
    order, kind = _HEADER.unpack_from(data, at)
    if order != 1 or kind != _POLYGON:
        raise ValueError(f"expected a little-endian WKB Polygon at byte {at}, got byte order {order} type {kind}")
    (n_rings,) = struct.unpack_from("<I", data, at + _HEADER.size)
    at += _HEADER.size + 4
    xs: list[float] = []
    ys: list[float] = []
    for _ in range(n_rings):
        (n_points,) = struct.unpack_from("<I", data, at)
        values = struct.unpack_from(f"<{2 * n_points}d", data, at + 4)
        xs += values[0::2]
        ys += values[1::2]
        at += 4 + 16 * n_points
    return (min(xs), min(ys), max(xs), max(ys)), at


def footprint_from_wkb(data: bytes) -> BBox:
    """The footprint :func:`footprint_wkb` encoded (a split MultiPolygon gives back ``west > east``)."""
    order, kind = _HEADER.unpack_from(data, 0)
    if kind == _POLYGON:
        return _polygon_bounds(data, 0)[0]
    if order != 1 or kind != _MULTIPOLYGON:
        raise ValueError(f"expected a little-endian WKB Polygon or MultiPolygon, got byte order {order} type {kind}")
    (n_parts,) = struct.unpack_from("<I", data, _HEADER.size)
    at, parts = _HEADER.size + 4, []
    for _ in range(n_parts):
        part, at = _polygon_bounds(data, at)
        parts.append(part)
    east_side = [p for p in parts if p[2] == 180.0]
    west_side = [p for p in parts if p[0] == -180.0 and p not in east_side]
    if len(parts) != 2 or not east_side or not west_side:
        raise ValueError(f"expected a footprint split at the antimeridian, got a MultiPolygon of {len(parts)} parts")
    return east_side[0][0], parts[0][1], west_side[0][2], parts[0][3]


def geometry_column(footprints: list[BBox | None]) -> tuple[pa.Array, pa.Array]:
    """The WKB ``geometry`` and ``bbox`` covering columns (null where a row has no footprint)."""
    wkb = pa.array([None if fp is None else footprint_wkb(fp) for fp in footprints], type=pa.binary())
    boxes = [None if fp is None else dict(zip(BBOX_FIELDS, covering(fp), strict=True)) for fp in footprints]
    return wkb, pa.array(boxes, type=BBOX_TYPE)


def geo_metadata(footprints: list[BBox | None]) -> dict[str, Any]:
    """The ``geo`` file metadata of a shard (CRS left out: OGC:CRS84, see the module's docstring)."""
    present = [fp for fp in footprints if fp is not None]
    types = sorted({"Polygon" if len(footprint_parts(fp)) == 1 else "MultiPolygon" for fp in present})
    column: dict[str, Any] = {"encoding": "WKB", "geometry_types": types, "orientation": "counterclockwise"}
    if present:
        boxes = [covering(fp) for fp in present]
        column["bbox"] = [min(b[0] for b in boxes), min(b[1] for b in boxes),
                          max(b[2] for b in boxes), max(b[3] for b in boxes)]
    column["covering"] = {BBOX: {name: [BBOX, name] for name in BBOX_FIELDS}}
    return {"version": VERSION, "primary_column": GEOMETRY, "columns": {GEOMETRY: column}}


def row_groups_in_bbox(metadata: pq.FileMetaData, box: BBox) -> list[int]:
    """Row groups whose ``bbox`` statistics may meet ``box`` (all of them when the file has no ``bbox`` column);
    a group with no footprint at all is left out. A ``box`` with west > east is its two antimeridian sides."""
    if box[0] > box[2]:
        return sorted({group for side in footprint_parts(box) for group in row_groups_in_bbox(metadata, side)})
    paths = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
    if any(f"{BBOX}.{name}" not in paths for name in BBOX_FIELDS):
        return list(range(metadata.num_row_groups))
    west, south, east, north = box
    kept = []
    for group in range(metadata.num_row_groups):
        rg = metadata.row_group(group)
        stats = {name: rg.column(paths[f"{BBOX}.{name}"]).statistics for name in BBOX_FIELDS}
        if any(s is not None and s.null_count == rg.num_rows for s in stats.values()):
            continue
        if any(s is None or not s.has_min_max for s in stats.values()):
            kept.append(group)
            continue
        outside = (stats["xmin"].min > east or stats["xmax"].max < west
                   or stats["ymin"].min > north or stats["ymax"].max < south)
        if not outside:
            kept.append(group)
    return kept


def table_footprints(table: pa.Table) -> np.ndarray:
    """The :func:`footprint_array` of a ``table`` with ``bbox`` and ``geometry`` columns: the covering is the
    footprint itself except for a footprint split at the antimeridian (covering -180..180), whose geometry gives it
    back (no footprint: a NaN row)."""
    bbox = table.column(BBOX).combine_chunks()
    footprints = np.stack([pc.struct_field(bbox, name).to_numpy(zero_copy_only=False) for name in BBOX_FIELDS], axis=1)
    for row in np.flatnonzero((footprints[:, 0] == -180.0) & (footprints[:, 2] == 180.0)):
        footprints[row] = footprint_from_wkb(table.column(GEOMETRY)[int(row)].as_py())
    return footprints

