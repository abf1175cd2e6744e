"""Which items a search keeps: footprint meeting a box, date within an interval, cloud cover at most a percentage.

An :class:`ItemFilter` holds any of the three; an item must pass all that are given. An item without a footprint,
a date (meta ``datetime``) or a cloud cover (meta ``eo:cloud_cover``) fails the filter that asks for it.
Over a GeoParquet shard the filter first picks the row groups whose statistics may hold a passing row
(:meth:`ItemFilter.row_groups`: ``bbox``, ``datetime`` and ``eo:cloud_cover``), then tests each row read
(:meth:`ItemFilter.rows` on :func:`table_arrays`); over metas in memory ('mpsclip serve', shards written before
GeoParquet columns) it tests :func:`meta_arrays`, so both give the same answer. A shard written before the
``datetime`` and ``eo:cloud_cover`` columns holds no dates or cloud covers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mpsclip.archive.dates import Interval
from mpsclip.archive.geoparquet import (
    BBOX,
    GEOMETRY,
    BBox,
    footprint_array,
    footprints_meeting,
    row_groups_in_bbox,
    table_footprints,
    valid_footprint,
)
from mpsclip.archive.meta_columns import CLOUD_COVER, DATETIME, lift

TIME_UNIT = "datetime64[us]"


@dataclass(frozen=True)
class FilterArrays:
    """What the filters test, one row per item: footprints ``[n, 4]`` (NaN: none), UTC times (NaT: none) and
    cloud covers (NaN: none)."""

    footprints: np.ndarray
    times: np.ndarray
    clouds: np.ndarray


def _times(values: Sequence[datetime | None]) -> np.ndarray:
    """Aware UTC datetimes (None: NaT) as ``datetime64[us]``."""
    return np.array([np.datetime64(v.replace(tzinfo=None), "us") if v else np.datetime64("NaT") for v in values],
                    dtype=TIME_UNIT)


def meta_arrays(metas: Sequence[dict[str, Any]]) -> FilterArrays:
    """:class:`FilterArrays` of items' whole metas (keys lifted as the shards' columns lift them)."""
    clouds = [lift(meta, CLOUD_COVER) for meta in metas]
    return FilterArrays(
        footprint_array([valid_footprint(meta.get("footprint")) for meta in metas]),
        _times([lift(meta, DATETIME) for meta in metas]),
        np.array([np.nan if c is None else c for c in clouds], dtype=np.float64),
    )


def table_arrays(table: pa.Table) -> FilterArrays:
    """:class:`FilterArrays` of a shard's rows read with the columns :meth:`ItemFilter.columns` names (a missing
    column: no item has that value)."""
    n = table.num_rows
    names = table.column_names
    footprints = table_footprints(table) if BBOX in names else np.full((n, 4), np.nan)
    if DATETIME in names:
        times = table.column(DATETIME).combine_chunks().cast(pa.timestamp("us")).to_numpy(zero_copy_only=False)
    else:
        times = np.full(n, np.datetime64("NaT"), dtype=TIME_UNIT)
    clouds = (table.column(CLOUD_COVER).to_numpy().astype(np.float64, copy=True) if CLOUD_COVER in names
              else np.full(n, np.nan))
    return FilterArrays(footprints, times.astype(TIME_UNIT), clouds)


def _naive(value: datetime) -> np.datetime64:
    return np.datetime64(value.replace(tzinfo=None), "us")


@dataclass(frozen=True)
class ItemFilter:
    """Keep items whose footprint meets ``bbox`` (west, south, east, north; west <= east), whose datetime is in
    ``interval`` and whose cloud cover is at most ``max_cloud`` percent; None: that test is not made."""

    bbox: BBox | None = None
    interval: Interval | None = None
    max_cloud: float | None = None

    def columns(self, names: Sequence[str]) -> list[str]:
        """The stored columns (of a shard whose columns are ``names``) that :func:`table_arrays` needs."""
        wanted = [BBOX, GEOMETRY] if self.bbox is not None else []
        wanted += [DATETIME] if self.interval is not None else []
        wanted += [CLOUD_COVER] if self.max_cloud is not None else []
        return [name for name in wanted if name in names]

    def rows(self, arrays: FilterArrays) -> np.ndarray:
        """Positions (ascending) of the rows of ``arrays`` that pass."""
        keep = np.ones(len(arrays.times), dtype=bool)
        if self.bbox is not None:
            meets = np.zeros_like(keep)
            meets[footprints_meeting(arrays.footprints, self.bbox)] = True
            keep &= meets
        if self.interval is not None:
            times = arrays.times
            keep &= ~np.isnat(times)
            if self.interval.start is not None:
                keep &= times >= _naive(self.interval.start)
            if self.interval.stop is not None:
                keep &= times < _naive(self.interval.stop)
        if self.max_cloud is not None:
            keep &= arrays.clouds <= self.max_cloud  # NaN (no cloud cover) compares False
        return np.flatnonzero(keep)

    def row_groups(self, metadata: pq.FileMetaData) -> list[int]:
        """Row groups of a shard whose statistics may hold a passing row (a group without statistics is kept;
        one where every row lacks the value asked for, or a shard without that column, is not)."""
        groups = row_groups_in_bbox(metadata, self.bbox) if self.bbox is not None else range(metadata.num_row_groups)
        paths = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
        ranges: list[tuple[str, Any, Any, bool]] = []  # column, low, high (None: open), whether high passes
        if self.interval is not None:
            ranges.append((DATETIME, self.interval.start, self.interval.stop, False))
        if self.max_cloud is not None:
            ranges.append((CLOUD_COVER, None, self.max_cloud, True))
        kept = []
        for group in groups:
            rg = metadata.row_group(group)
            if all(column in paths and _may_hold(rg, paths[column], *bounds) for column, *bounds in ranges):
                kept.append(group)
        return kept


def _may_hold(rg: pq.RowGroupMetaData, column: int, low: Any, high: Any, high_passes: bool) -> bool:
    """Whether the row group's statistics of ``column`` allow a value ``v >= low`` and ``v < high`` (``v <= high``
    when ``high_passes``); None: no bound."""
    stats = rg.column(column).statistics
    if stats is None:
        return True
    if stats.null_count == rg.num_rows:
        return False
    if not stats.has_min_max:
        return True
    if low is not None and stats.max < low:
        return False
    return high is None or stats.min < high or (high_passes and stats.min == high)


def item_filter(
    bbox: BBox | None = None, interval: Interval | None = None, max_cloud: float | None = None
) -> ItemFilter | None:
    """The filter of the given tests, or None when none is given (every item is kept)."""
    if bbox is None and interval is None and max_cloud is None:
        return None
    return ItemFilter(bbox, interval, max_cloud)
