"""Query boxes ``W,S,E,N`` (west, south, east, north; EPSG:4326 degrees), checked in one place for the command
line (``--bbox``) and the search API (``bbox``).

Longitudes lie in [-180, 180] and latitudes in [-90, 90], with south <= north. West > east is a box across the
antimeridian: from west eastwards over 180° to east (``170,-20,-170,-10`` spans 20 degrees around Fiji), as a
footprint that crosses it is written (:mod:`mpsclip.archive.geoparquet`). Nothing here imports numpy or torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mpsclip.errors import MPSCLIPError

BBox = tuple[float, float, float, float]


def check_bbox(values: Sequence[float]) -> BBox:
    """``values`` as a :data:`BBox`, or an :class:`MPSCLIPError` that says which number is wrong and why."""
    if len(values) != 4:
        raise MPSCLIPError(f"expected four numbers W,S,E,N (west, south, east, north), got {len(values)}")
    west, south, east, north = (float(v) for v in values)
    for name, value, limit, what in (
        ("west", west, 180.0, "longitude"),
        ("south", south, 90.0, "latitude"),
        ("east", east, 180.0, "longitude"),
        ("north", north, 90.0, "latitude"),
    ):
        if not (math.isfinite(value) and -limit <= value <= limit):
            raise MPSCLIPError(f"{name} {value:g} is not a {what} in [{-limit:g}, {limit:g}] (W,S,E,N in degrees)")
    if south > north:
        raise MPSCLIPError(f"south {south:g} is above north {north:g}: give W,S,E,N (west > east crosses 180°)")
    return west, south, east, north


def parse_bbox(text: str) -> BBox:
    """``"W,S,E,N"`` as a checked :data:`BBox` (negative numbers welcome)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as err:
        raise MPSCLIPError(f"{text!r}: expected four numbers W,S,E,N (west, south, east, north)") from err
    try:
        return check_bbox(values)
    except MPSCLIPError as err:
        raise MPSCLIPError(f"{text!r}: {err}") from None
