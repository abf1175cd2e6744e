"""The embedding store: a folder of Parquet shards plus ``manifest.json`` and ``failures.jsonl``.

Each shard ``shard-NNNNN.parquet`` is a GeoParquet 1.1 file with the columns ``id`` (string), the common meta
keys ``kind``, ``source_path``, ``scene``, ``crs``, ``window``, ``keywords`` (:mod:`mpsclip.archive.meta_columns`),
``meta`` (JSON string of the other keys), ``geometry`` (WKB footprint, EPSG:4326 lon/lat, null without one) and
its ``bbox`` covering struct (:mod:`mpsclip.archive.geoparquet`), ``retrieval`` and ``global`` (``dim`` fp16
numbers as one fixed-size binary value per row), ``perspectives`` (``views × dim`` fp16, flattened, the same way)
and ``valid`` (``views`` bools), in row groups of :data:`~mpsclip.archive.geoparquet.ROW_GROUP_ROWS` rows in
item order. Readers give back each item's whole meta. Shards written before the GeoParquet columns (the whole
meta in ``meta``) and with fixed-size lists of fp16 (before binary rows) read the same. Every file is written to
a temporary file and renamed, so it appears only when complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mpsclip.archive.geoparquet import (
    BBOX,
    BBOX_FIELDS,
    GEOMETRY,
    ROW_GROUP_ROWS,
    BBox,
    footprint_array,
    footprints_meeting,
    geo_metadata,
    geometry_column,
    row_groups_in_bbox,
    rows_in_box,
    valid_footprint,
)
from mpsclip.archive.meta_columns import STATISTICS, lifted_arrays, merged_metas, meta_columns_of, split_meta
from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
SHARD_PATTERN = "shard-{:05d}.parquet"


@dataclass
class ShardRows:
    """Columns of one shard: ``retrieval``/``global`` [n, D], ``perspectives`` [n, K, D] (fp16), ``valid`` [n, K]."""

    ids: list[str]
    metas: list[str]
    retrieval: np.ndarray
    glob: np.ndarray
    perspectives: np.ndarray
    valid: np.ndarray


@dataclass
class StoreData:
    """A whole store in memory (fp16 tensors) for search."""

    manifest: dict[str, Any]
    ids: list[str]
    metas: list[dict[str, Any]]
    retrieval: torch.Tensor
    glob: torch.Tensor
    perspectives: torch.Tensor
    valid: torch.Tensor


def shard_path(store: Path, index: int) -> Path:
    return store / SHARD_PATTERN.format(index)


def _fixed_list(values: np.ndarray, size: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), size)


def _fp16_rows(values: np.ndarray) -> pa.FixedSizeBinaryArray:
    """One fixed-size binary value per row holding its fp16 numbers (little-endian): Parquet reads these about
    ten times faster than lists of FLOAT16 elements."""
    rows = np.ascontiguousarray(values.astype("<f2"))
    width = rows.shape[1] * 2
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(rows), [None, pa.py_buffer(rows.tobytes())])


def write_shard(path: Path, rows: ShardRows, dim: int, views: int) -> None:
    """Write one shard atomically as GeoParquet (an empty shard keeps its schema); row-group statistics are
    written for ``id``, the string meta columns and ``bbox``, not for the embeddings."""
    n = len(rows.ids)
    split = [split_meta(json.loads(m)) for m in rows.metas]
    footprints = [fp for _, fp, _ in split]
    geometry, bbox = geometry_column(footprints)
    table = pa.table(
        {
            "id": pa.array(rows.ids, type=pa.string()),
            **lifted_arrays([lifted for lifted, _, _ in split]),
            "meta": pa.array([json.dumps(rest, sort_keys=True) for _, _, rest in split], type=pa.string()),
            GEOMETRY: geometry,
            BBOX: bbox,
            "retrieval": _fp16_rows(rows.retrieval.reshape(n, dim)),
            "global": _fp16_rows(rows.glob.reshape(n, dim)),
            "perspectives": _fp16_rows(rows.perspectives.reshape(n, views * dim)),
            "valid": _fixed_list(rows.valid.astype(bool).reshape(n, views), views),
        }
    ).replace_schema_metadata({"geo": json.dumps(geo_metadata(footprints))})
    statistics = ["id", *STATISTICS, *(f"{BBOX}.{name}" for name in BBOX_FIELDS)]
    atomic_write(
        path, lambda tmp: pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, write_statistics=statistics)
    )


def count_complete_shards(store: Path) -> int:
    """Number of shards ``0..n-1`` present; raises if a later shard exists after a gap."""
    present = sorted(store.glob("shard-*.parquet"))
    n = 0
    while shard_path(store, n).exists():
        n += 1
    if len(present) != n:
        raise MPSCLIPError(
            f"{store}: shards are not contiguous ({len(present)} files, but shard {n} is missing); "
            "delete the shards after the gap, or the whole store, and run again"
        )
    return n


def read_manifest(store: Path) -> dict[str, Any] | None:
    path = store / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MPSCLIPError(f"{path}: not valid JSON ({err.msg}); delete the store and embed again") from err


def write_manifest(store: Path, manifest: dict[str, Any]) -> None:
    atomic_write(store / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_failures(store: Path) -> list[dict[str, Any]]:
    path = store / FAILURES
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_failures(store: Path, failures: list[dict[str, Any]]) -> None:
    atomic_write(store / FAILURES, "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures))


def _column(table: pa.Table, name: str, width: int, dtype: type) -> np.ndarray:
    """A ``[rows, width]`` writable array (for torch) of a fixed-size binary column of fp16 rows, or of a
    fixed-size list column (the layout of stores written before binary rows)."""
    column = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_binary(column.type):
        data = np.frombuffer(column.buffers()[1], dtype="<f2", count=(column.offset + len(column)) * width)
        return data[column.offset * width :].astype(dtype).reshape(len(column), width)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.array(flat, dtype=dtype).reshape(table.num_rows, width)


@dataclass(frozen=True)
class StoreInfo:
    """A complete store on disk: its manifest and the number of rows of every shard (nothing else is read)."""

    path: Path
    manifest: dict[str, Any]
    shard_rows: tuple[int, ...]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @property
    def n_rows(self) -> int:
        return sum(self.shard_rows)

    def offsets(self) -> list[int]:
        """The global row of every shard's first row (rows are numbered in shard order)."""
        return [sum(self.shard_rows[:i]) for i in range(len(self.shard_rows))]


def open_store(store: str | Path, source_root: str | Path | None = None) -> StoreInfo:
    """Check that ``store`` is complete and count its rows; raises :class:`MPSCLIPError` if missing or unfinished.
    ``source_root`` relocates the store's SOURCE (:func:`relocate_source`)."""
    store = Path(store)
    manifest = read_manifest(store)
    if manifest is None:
        raise MPSCLIPError(f"{store}: no {MANIFEST}; is this a store made by 'mpsclip embed'?")
    if not manifest.get("complete"):
        raise MPSCLIPError(f"{store}: the store is unfinished; run 'mpsclip embed' again to complete it")
    n_shards = count_complete_shards(store)
    if n_shards != manifest["counts"]["shards"]:
        raise MPSCLIPError(f"{store}: {n_shards} shards found, the manifest says {manifest['counts']['shards']}")
    rows = tuple(pq.read_metadata(shard_path(store, i)).num_rows for i in range(n_shards))
    if sum(rows) == 0:
        raise MPSCLIPError(f"{store}: the store holds no embeddings")
    info = StoreInfo(store, manifest, rows)
    return info if source_root is None else relocate_source(info, source_root)


def relocate_source(info: StoreInfo, source_root: str | Path) -> StoreInfo:
    """``info`` read where its SOURCE now lies at ``source_root`` (``--source-root``): the store or its images moved
    to another folder or machine. Item paths in meta are relative to it; nothing on disk changes."""
    root = Path(source_root).expanduser()
    if not root.is_dir():
        raise MPSCLIPError(
            f"--source-root {source_root}: no such folder; give the folder the store was embedded from "
            f"(recorded as {info.manifest.get('source_root')}) as it is named here"
        )
    return replace(info, manifest={**info.manifest, "source_root": str(root.absolute())})


def checked_source_root(manifest: dict[str, Any]) -> Path:
    """The store's source folder, where its items' files are; raises :class:`MPSCLIPError` naming
    ``--source-root`` when it does not exist here."""
    recorded = manifest.get("source_root")
    if recorded is None:
        raise MPSCLIPError(
            "the store's manifest has no source_root (made before stores recorded it); embed the source again"
        )
    if not Path(recorded).is_dir():
        raise MPSCLIPError(
            f"the store's source folder {recorded} does not exist here (the store or its images moved?); "
            "pass --source-root DIR, the folder that holds the embedded source now"
        )
    return Path(recorded)


def _stored_columns(columns: list[str], names: list[str]) -> list[str]:
    """The stored columns that give ``columns`` of a shard whose columns are ``names`` (``meta``: the item's
    whole meta, from ``meta`` and the lifted columns)."""
    stored = [c for c in columns if c != "meta"]
    return stored + (meta_columns_of(names) if "meta" in columns else [])


def read_shard(info: StoreInfo, shard: int, columns: list[str]) -> dict[str, np.ndarray]:
    """Only ``columns`` of one shard: ``id`` as an object array of str, ``meta`` of each item's whole meta as
    JSON (str), embeddings as ``retrieval``/``global`` [n, D], ``perspectives`` [n, K, D] (fp16) and ``valid``
    [n, K] (bool)."""
    path = shard_path(info.path, shard)
    names = pq.read_schema(path).names if "meta" in columns else []  # the footer is read once more only for meta
    table = pq.read_table(path, columns=_stored_columns(columns, names))
    return _decode(info, table, columns)


def read_shard_in_bbox(
    info: StoreInfo, shard: int, columns: list[str], box: BBox
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(positions in the shard, columns)`` of the shard's items whose footprint meets ``box`` (west, south,
    east, north; west > east crosses the antimeridian), as :func:`read_shard` gives them. Only the row groups
    whose ``bbox`` statistics may meet the box are read; a shard written before GeoParquet columns is read whole
    and filtered on its JSON."""
    file = pq.ParquetFile(shard_path(info.path, shard))
    names = file.schema_arrow.names
    if BBOX not in names:
        cols = read_shard(info, shard, list(dict.fromkeys([*columns, "meta"])))
        footprints = [valid_footprint(json.loads(m).get("footprint")) for m in cols["meta"]]
        keep = footprints_meeting(footprint_array(footprints), box)
        return keep, {c: cols[c][keep] for c in columns}
    groups = row_groups_in_bbox(file.metadata, box)
    stored = list(dict.fromkeys([*_stored_columns(columns, names), BBOX, GEOMETRY]))
    starts = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)])
    table = file.read_row_groups(groups, columns=stored)
    positions = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups] or [np.zeros(0, np.int64)])
    keep = rows_in_box(table, box)
    return positions[keep].astype(np.int64), _decode(info, table.take(pa.array(keep, pa.int64())), columns)


def read_geometry(info: StoreInfo, shard: int) -> pa.Table:
    """The ``bbox`` and ``geometry`` columns of one shard (made from the JSON footprints of a shard written before
    them), for an in-memory bbox filter: :func:`~mpsclip.archive.geoparquet.rows_in_box` on it (or on several
    concatenated) gives the rows whose footprint meets a box, without decoding any JSON."""
    path = shard_path(info.path, shard)
    if BBOX in pq.read_schema(path).names:
        return pq.read_table(path, columns=[BBOX, GEOMETRY])
    metas = pq.read_table(path, columns=["meta"]).column("meta").to_pylist()
    geometry, bbox = geometry_column([valid_footprint(json.loads(m).get("footprint")) for m in metas])
    return pa.table({BBOX: bbox, GEOMETRY: geometry})


def store_rows_in_bbox(info: StoreInfo, box: BBox) -> np.ndarray:
    """Store rows (ascending) of the items whose footprint meets ``box``; reads only the ``bbox``/``geometry``
    columns of the row groups whose statistics may meet it (what a bbox filter over a whole store calls)."""
    offsets = info.offsets()
    parts = [read_shard_in_bbox(info, s, [], box)[0] + offsets[s] for s in range(len(offsets))]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _decode(info: StoreInfo, table: pa.Table, columns: list[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in columns:
        if name == "meta":
            out[name] = np.array([json.dumps(m, sort_keys=True) for m in merged_metas(table)], dtype=object)
        elif name == "id":
            out[name] = np.array(table.column(name).to_pylist(), dtype=object)
        elif name == "valid":
            out[name] = _column(table, name, info.views, np.bool_)
        elif name == "perspectives":
            out[name] = _column(table, name, info.views * info.dim, np.float16).reshape(-1, info.views, info.dim)
        else:
            out[name] = _column(table, name, info.dim, np.float16)
    return out


def read_ids_metas(info: StoreInfo, rows: list[int]) -> dict[int, tuple[str, dict[str, Any]]]:
    """``id`` and parsed ``meta`` of the given global rows, reading only the shards that hold them."""
    offsets = info.offsets()
    by_shard: dict[int, list[int]] = {}
    for row in sorted(set(rows)):
        by_shard.setdefault(int(np.searchsorted(offsets, row, side="right")) - 1, []).append(row)
    found = {}
    for shard, wanted in by_shard.items():
        path = shard_path(info.path, shard)
        table = pq.read_table(path, columns=_stored_columns(["id", "meta"], pq.read_schema(path).names))
        taken = table.take(pa.array([row - offsets[shard] for row in wanted]))
        for row, item_id, meta in zip(wanted, taken.column("id").to_pylist(), merged_metas(taken), strict=True):
            found[row] = (item_id, meta)
    return found


def load_store(store: str | Path) -> StoreData:
    """Read a complete store into memory; raises :class:`MPSCLIPError` if it is missing or unfinished."""
    info = open_store(store)
    dim, views = info.dim, info.views
    shards = [pq.read_table(shard_path(info.path, i)) for i in range(len(info.shard_rows))]
    embeddings = ["id", "retrieval", "global", "perspectives", "valid"]
    table = pa.concat_tables([shard.select(embeddings) for shard in shards])  # old and new shards may mix
    return StoreData(
        manifest=info.manifest,
        ids=table.column("id").to_pylist(),
        metas=[meta for shard in shards for meta in merged_metas(shard)],
        retrieval=torch.from_numpy(_column(table, "retrieval", dim, np.float16)),
        glob=torch.from_numpy(_column(table, "global", dim, np.float16)),
        perspectives=torch.from_numpy(_column(table, "perspectives", views * dim, np.float16)).view(-1, views, dim),
        valid=torch.from_numpy(_column(table, "valid", views, np.bool_)),
    )
