"""The embedding store: a folder of Parquet shards plus ``manifest.json`` and ``failures.jsonl``.

Each shard ``shard-NNNNN.parquet`` is a GeoParquet 1.1 file with the columns ``id`` (string), the common meta
keys ``kind``, ``source_path``, ``scene``, ``crs``, ``window``, ``keywords`` (:mod:`mpsclip.archive.meta_columns`),
``meta`` (JSON string of the other keys), ``geometry`` (WKB footprint, EPSG:4326 lon/lat, null without one) and
its ``bbox`` covering struct (:mod:`mpsclip.archive.geoparquet`), ``retrieval`` and ``global`` (``dim`` fp16
numbers as one fixed-size binary value per row), ``perspectives`` (``views × dim`` fp16, flattened, the same way)
and ``valid`` (``views`` bools), in row groups of :data:`~mpsclip.archive.geoparquet.ROW_GROUP_ROWS` rows in
item order. Readers give back each item's whole meta. Shards written before the GeoParquet columns (the whole
meta in ``meta``) and with fixed-size lists of fp16 (before binary rows) read the same. Every file is written to
a temporary file, flushed to disk and renamed, so it appears only when complete.

Integrity: shards are written with Parquet page checksums, which every read verifies; the manifest records each
shard's ``file``, ``rows`` and ``sha256`` (``shards``), checked when the store is opened (:func:`open_store`; a
digest is computed again only when a file's size or mtime changed, so a server's reloads stay cheap), and
:func:`verify_store` checks everything (``mpsclip verify``). Stores made by ``mpsclip embed`` hold unit vectors
(``unit_norm``): an embedding whose norm is off by more than :data:`NORM_TOLERANCE` is an error naming its shard
and row, never a score. Any unreadable shard is an :class:`~mpsclip.errors.MPSCLIPError` naming the file and what
to do. Stores made before these records read as before, without the digest check.

``pruned.jsonl`` lists the items (``id``, ``shard``, ``row``) whose source disappeared (``mpsclip embed --prune``):
their rows stay in their shards, and searches skip them (:func:`pruned_rows`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mpsclip.archive.filters import ItemFilter, meta_arrays, table_arrays
from mpsclip.archive.geoparquet import (
    BBOX,
    BBOX_FIELDS,
    GEOMETRY,
    ROW_GROUP_ROWS,
    BBox,
    geo_metadata,
    geometry_column,
    valid_footprint,
)
from mpsclip.archive.meta_columns import STATISTICS, lifted_arrays, merged_metas, meta_columns_of, split_meta
from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
PRUNED = "pruned.jsonl"
SHARD_PATTERN = "shard-{:05d}.parquet"
NORM_TOLERANCE = 1e-2
"""How far from 1 the norm of a stored fp16 unit vector may be (fp16 rounding moves it by about 1e-3 at most)."""
EMBEDDING_COLUMNS = ("retrieval", "global", "perspectives")


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
        path,
        lambda tmp: pq.write_table(
            table, tmp, row_group_size=ROW_GROUP_ROWS, write_statistics=statistics, write_page_checksum=True
        ),
    )


def _what_to_do(path: Path) -> str:
    return (
        f"run 'mpsclip verify {path.parent}' for a full check, then restore the file from a copy, or delete it and "
        "every later shard and run 'mpsclip embed' again with the same arguments (it embeds the missing items again)"
    )


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn what pyarrow (or the file system) raises while reading the shard ``path`` into an error naming it."""
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        raise MPSCLIPError(
            f"{path}: cannot be read as a shard ({type(err).__name__}: {err}); the file is damaged or truncated: "
            + _what_to_do(path)
        ) from err


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    with reading(path):
        return pq.read_table(path, columns=columns, page_checksum_verification=True)


def shard_num_rows(path: Path) -> int:
    """The rows of a shard, from its footer."""
    with reading(path):
        return pq.read_metadata(path).num_rows


def _column_names(path: Path) -> list[str]:
    with reading(path):
        return pq.read_schema(path).names


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_DIGESTS: dict[Path, tuple[int, int, str]] = {}
"""``sha256`` of shards by absolute path, with the ``(size, mtime_ns)`` they were computed for."""


def shard_sha256(path: Path) -> str:
    """The SHA-256 of a shard, computed again only when its size or mtime changed since the last time."""
    with reading(path):
        stat = path.stat()
        key = path.absolute()
        cached = _DIGESTS.get(key)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = sha256_file(path)
    _DIGESTS[key] = (stat.st_size, stat.st_mtime_ns, digest)
    return digest


def shard_record(path: Path) -> dict[str, Any]:
    """What the manifest records of a shard just written: ``file``, ``rows`` and ``sha256``."""
    return {"file": path.name, "rows": shard_num_rows(path), "sha256": shard_sha256(path)}


def check_shard(path: Path, record: dict[str, Any]) -> None:
    """Raise :class:`MPSCLIPError` unless the shard ``path`` is the file its manifest ``record`` describes."""
    if record.get("file") != path.name:
        raise MPSCLIPError(
            f"{path.parent / MANIFEST}: records {record.get('file')!r} where {path.name} should be; the manifest was "
            "edited or damaged: delete the store and embed again"
        )
    if shard_sha256(path) != record.get("sha256"):
        raise MPSCLIPError(
            f"{path}: its SHA-256 differs from the one {MANIFEST} records: the file changed or was damaged after "
            "it was written; " + _what_to_do(path)
        )


_PATHS_CHECKED: dict[Path, tuple[int, int]] = {}
"""Shards whose item paths were checked, with the ``(size, mtime_ns)`` they had then."""


def check_item_paths(path: Path, source_root: str | Path) -> None:
    """Refuse a shard holding an item whose ``source_path`` is absolute or climbs out with ``..``, naming the
    item (links are followed when an item is opened: :func:`~mpsclip.archive.items.contained_path`). Shards
    written before the lifted columns are left to that check."""
    from mpsclip.archive.items import contained_path

    with reading(path):
        stat = path.stat()
    key = path.absolute()
    if _PATHS_CHECKED.get(key) == (stat.st_size, stat.st_mtime_ns):
        return
    if "source_path" in _column_names(path):
        table = _read_table(path, ["id", "source_path"])
        paths = table.column("source_path")
        suspect = pc.or_kleene(pc.starts_with(paths, "/"), pc.match_substring_regex(paths, r"(^|/)\.\.(/|$)"))
        for row in table.filter(pc.fill_null(suspect, False)).to_pylist():
            try:
                contained_path(source_root, row["source_path"], row["id"])
            except MPSCLIPError as err:
                raise MPSCLIPError(f"{path}: {err}") from err
    _PATHS_CHECKED[key] = (stat.st_size, stat.st_mtime_ns)


def shard_rows(store: Path, manifest: dict[str, Any], n_shards: int) -> tuple[int, ...]:
    """The rows of shards ``0..n_shards-1``; those the manifest records are checked against their record (a shard
    written since, which 'mpsclip embed' records next, and the shards of stores made before records are counted
    from their footer). Every shard's item paths are checked (:func:`check_item_paths`)."""
    records = manifest.get("shards") or []
    rows = []
    for shard in range(n_shards):
        path = shard_path(store, shard)
        if shard < len(records):
            check_shard(path, records[shard])
            rows.append(int(records[shard]["rows"]))
        else:
            rows.append(shard_num_rows(path))
        check_item_paths(path, manifest.get("source_root", store))
    return tuple(rows)


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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as err:
        raise MPSCLIPError(f"{path}: not valid JSON lines ({err.msg}); delete the store and embed again") from err


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_failures(store: Path) -> list[dict[str, Any]]:
    return _read_jsonl(store / FAILURES)


def write_failures(store: Path, failures: list[dict[str, Any]]) -> None:
    _write_jsonl(store / FAILURES, failures)


def read_pruned(store: Path) -> list[dict[str, Any]]:
    """The pruned items: ``id``, ``shard`` and ``row`` (in the shard) of each."""
    return _read_jsonl(store / PRUNED)


def write_pruned(store: Path, pruned: list[dict[str, Any]]) -> None:
    _write_jsonl(store / PRUNED, pruned)


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
    if "shards" in manifest and len(manifest["shards"]) != n_shards:
        raise MPSCLIPError(
            f"{store}: {n_shards} shards found, the manifest records {len(manifest['shards'])}; run 'mpsclip embed' "
            "again with the same arguments to record them"
        )
    rows = shard_rows(store, manifest, n_shards)
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
    version = _version(path)
    names = _column_names(path) if "meta" in columns else []  # the footer is read once more only for meta
    table = _read_table(path, _stored_columns(columns, names))
    return _decode(info, table, columns, path, version=version)


def read_shard_in_bbox(
    info: StoreInfo, shard: int, columns: list[str], box: BBox
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(positions in the shard, columns)`` of the shard's items whose footprint meets ``box`` (west, south,
    east, north; west > east crosses the antimeridian): :func:`read_shard_where` with only a box."""
    return read_shard_where(info, shard, columns, ItemFilter(bbox=box))


def read_shard_where(
    info: StoreInfo, shard: int, columns: list[str], where: ItemFilter
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(positions in the shard, columns)`` of the shard's items that pass ``where``, as :func:`read_shard` gives
    them. Only the row groups whose statistics may hold such items are read; a shard written before GeoParquet
    columns is read whole and filtered on its JSON."""
    path = shard_path(info.path, shard)
    with reading(path):
        file = pq.ParquetFile(path, page_checksum_verification=True)
        names = file.schema_arrow.names
        if BBOX not in names:
            cols = read_shard(info, shard, list(dict.fromkeys([*columns, "meta"])))
            keep = where.rows(meta_arrays([json.loads(m) for m in cols["meta"]]))
            return keep, {c: cols[c][keep] for c in columns}
        groups = where.row_groups(file.metadata)
        stored = list(dict.fromkeys([*_stored_columns(columns, names), *where.columns(names)]))
        starts = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)])
        table = file.read_row_groups(groups, columns=stored)
    positions = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups] or [np.zeros(0, np.int64)])
    keep = where.rows(table_arrays(table))
    positions = positions[keep].astype(np.int64)
    return positions, _decode(info, table.take(pa.array(keep, pa.int64())), columns, path, positions)


def read_geometry(info: StoreInfo, shard: int) -> pa.Table:
    """The ``bbox`` and ``geometry`` columns of one shard (made from the JSON footprints of a shard written before
    them), for an in-memory bbox filter: :func:`~mpsclip.archive.geoparquet.rows_in_box` on it (or on several
    concatenated) gives the rows whose footprint meets a box, without decoding any JSON."""
    path = shard_path(info.path, shard)
    if BBOX in _column_names(path):
        return _read_table(path, [BBOX, GEOMETRY])
    metas = _read_table(path, ["meta"]).column("meta").to_pylist()
    geometry, bbox = geometry_column([valid_footprint(json.loads(m).get("footprint")) for m in metas])
    return pa.table({BBOX: bbox, GEOMETRY: geometry})


def store_rows_in_bbox(info: StoreInfo, box: BBox) -> np.ndarray:
    """Store rows (ascending) of the items whose footprint meets ``box``; reads only the ``bbox``/``geometry``
    columns of the row groups whose statistics may meet it (what a bbox filter over a whole store calls)."""
    offsets = info.offsets()
    parts = [read_shard_in_bbox(info, s, [], box)[0] + offsets[s] for s in range(len(offsets))]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def unit_norm(manifest: dict[str, Any]) -> bool:
    """Whether a store's embeddings are unit vectors: those of 'mpsclip embed' (which names a checkpoint)."""
    return bool(manifest.get("unit_norm", "checkpoint_sha256" in manifest))


def check_norms(path: Path, name: str, values: np.ndarray, positions: np.ndarray | None = None) -> None:
    """Raise :class:`MPSCLIPError` naming the shard ``path`` and the row when a vector of ``values`` ``[n, ..., D]``
    (rows ``positions`` of the shard, None: all in order) has no unit norm within :data:`NORM_TOLERANCE`."""
    if values.size == 0:
        return
    flat = values.reshape(-1, values.shape[-1]).astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", flat, flat)).reshape(len(values), -1)  # the fastest of those measured
    bad = ~(np.abs(norms - 1.0) <= NORM_TOLERANCE).all(axis=1)  # NaN is bad too
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        row = first if positions is None else int(positions[first])
        norm = float(norms[first][np.argmax(np.nan_to_num(np.abs(norms[first] - 1.0), nan=np.inf))])
        raise MPSCLIPError(
            f"{path}: row {row} has a '{name}' embedding of norm {norm:.6g}, not 1 (±{NORM_TOLERANCE:g}), and "
            f"{int(bad.sum())} rows of this shard read so far are off: the shard is damaged; " + _what_to_do(path)
        )


_NORMS_CHECKED: set[tuple[tuple[Path, int, int], str]] = set()
"""``(shard version, column)`` whose every embedding norm was checked in this process."""


def _version(path: Path) -> tuple[Path, int, int]:
    """A shard file's version: its absolute path, size and mtime (taken before reading it)."""
    with reading(path):
        stat = path.stat()
    return path.absolute(), stat.st_size, stat.st_mtime_ns


def _decode(
    info: StoreInfo,
    table: pa.Table,
    columns: list[str],
    path: Path,
    positions: np.ndarray | None = None,
    version: tuple[Path, int, int] | None = None,
) -> dict[str, np.ndarray]:
    """``columns`` of a shard's ``table`` as :func:`read_shard` gives them, embedding norms checked (once per
    ``version`` of a whole shard: a shard is read again for every search); a column that is not what the manifest
    says (width, JSON) is an error naming the shard ``path``."""
    try:
        out = {name: _decoded(info, table, name) for name in columns}
    except (ValueError, KeyError, TypeError, pa.ArrowException) as err:  # JSONDecodeError is a ValueError
        raise MPSCLIPError(
            f"{path}: its columns are not those of a shard with the manifest's dim {info.manifest.get('dim')} and "
            f"views {info.manifest.get('views')} ({type(err).__name__}: {err}); " + _what_to_do(path)
        ) from err
    if unit_norm(info.manifest):
        for name in [c for c in EMBEDDING_COLUMNS if c in columns and (version, c) not in _NORMS_CHECKED]:
            check_norms(path, name, out[name], positions)
            if version is not None:
                _NORMS_CHECKED.add((version, name))
    return out


def _decoded(info: StoreInfo, table: pa.Table, name: str) -> np.ndarray:
    if name == "meta":
        return np.array([json.dumps(m, sort_keys=True) for m in merged_metas(table)], dtype=object)
    if name == "id":
        return np.array(table.column(name).to_pylist(), dtype=object)
    if name == "valid":
        return _column(table, name, info.views, np.bool_)
    if name == "perspectives":
        return _column(table, name, info.views * info.dim, np.float16).reshape(-1, info.views, info.dim)
    return _column(table, name, info.dim, np.float16)


def read_ids_metas(info: StoreInfo, rows: list[int]) -> dict[int, tuple[str, dict[str, Any]]]:
    """``id`` and parsed ``meta`` of the given global rows, reading only the shards that hold them."""
    offsets = info.offsets()
    by_shard: dict[int, list[int]] = {}
    for row in sorted(set(rows)):
        by_shard.setdefault(int(np.searchsorted(offsets, row, side="right")) - 1, []).append(row)
    found = {}
    for shard, wanted in by_shard.items():
        path = shard_path(info.path, shard)
        table = _read_table(path, _stored_columns(["id", "meta"], _column_names(path)))
        taken = table.take(pa.array([row - offsets[shard] for row in wanted]))
        for row, item_id, meta in zip(wanted, taken.column("id").to_pylist(), merged_metas(taken), strict=True):
            found[row] = (item_id, meta)
    return found


def load_store(store: str | Path) -> StoreData:
    """Read a complete store into memory; raises :class:`MPSCLIPError` if it is missing or unfinished."""
    info = open_store(store)
    dim, views = info.dim, info.views
    paths = [shard_path(info.path, i) for i in range(len(info.shard_rows))]
    versions = [_version(path) for path in paths]
    shards = [_read_table(path) for path in paths]
    embeddings = ["retrieval", "global", "perspectives", "valid"]
    parts = [
        _decode(info, shard, embeddings, path, version=version)
        for shard, path, version in zip(shards, paths, versions, strict=True)
    ]
    return StoreData(
        manifest=info.manifest,
        ids=[item_id for shard in shards for item_id in shard.column("id").to_pylist()],
        metas=[meta for shard in shards for meta in merged_metas(shard)],
        retrieval=torch.from_numpy(np.concatenate([p["retrieval"] for p in parts])),
        glob=torch.from_numpy(np.concatenate([p["global"] for p in parts])),
        perspectives=torch.from_numpy(np.concatenate([p["perspectives"] for p in parts])).view(-1, views, dim),
        valid=torch.from_numpy(np.concatenate([p["valid"] for p in parts])),
    )


def read_ids(store: Path, shard: int) -> list[str]:
    """The ``id`` column of one shard."""
    path = shard_path(store, shard)
    return [str(i) for i in _read_table(path, ["id"]).column("id").to_pylist()]


def pruned_rows(info: StoreInfo) -> np.ndarray:
    """Store rows (ascending) of the items ``mpsclip embed --prune`` recorded as gone from the source: searches and
    servers skip them."""
    offsets = info.offsets()
    rows = [
        offsets[p["shard"]] + p["row"]
        for p in read_pruned(info.path)
        if p["shard"] < len(offsets) and p["row"] < info.shard_rows[p["shard"]]
    ]
    return np.array(sorted(rows), dtype=np.int64)


def pruned_ids(store: Path) -> set[str]:
    """Ids of the items ``mpsclip embed --prune`` recorded as gone from the source."""
    return {p["id"] for p in read_pruned(store)}


@dataclass
class Verification:
    """What :func:`verify_store` found: ``problems`` (each names its file and what to do) and ``notes``."""

    store: Path
    shards: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _verified_table(info: StoreInfo, path: Path, record: dict[str, Any] | None) -> pa.Table:
    """The whole shard ``path``, read after its SHA-256 is compared with ``record`` (None: not recorded), its
    pages checked and its embeddings decoded (their norms checked)."""
    if record is not None:
        with reading(path):
            same = record.get("file") == path.name and sha256_file(path) == record.get("sha256")
        if not same:
            raise MPSCLIPError(f"{path}: its SHA-256 differs from the one {MANIFEST} records; " + _what_to_do(path))
    table = _read_table(path)
    if "dim" in info.manifest:
        _decode(info, table, [*EMBEDDING_COLUMNS, "valid"], path)
    return table


def verify_store(store: str | Path) -> Verification:
    """Check a whole store: every shard against its manifest record (SHA-256, read in full), its Parquet page
    checksums, the norm of every embedding, ids unique across shards, every item path inside the source folder
    (symlinks followed), and the failures and pruned records pointing at existing shards."""
    from mpsclip.archive.items import PATH_KEYS, contained_path

    report = Verification(Path(store))
    store = report.store
    manifest = read_manifest(store)
    if manifest is None:
        report.problems.append(f"{store}: no {MANIFEST}; is this a store made by 'mpsclip embed'?")
        return report
    if not manifest.get("complete"):
        report.notes.append("the store is unfinished: run 'mpsclip embed' again with the same arguments to finish it")
    try:
        n_shards = count_complete_shards(store)
    except MPSCLIPError as err:
        report.problems.append(str(err))
        n_shards = 0
        while shard_path(store, n_shards).exists():
            n_shards += 1
    records = manifest.get("shards")
    if records is None:
        report.notes.append("the manifest records no shard digests (made before they existed): digests not checked")
    elif len(records) != n_shards:
        report.problems.append(
            f"{store / MANIFEST}: records {len(records)} shards, {n_shards} found; run 'mpsclip embed' again with the "
            "same arguments"
        )
    root = Path(str(manifest.get("source_root", store)))
    if not root.is_dir():
        report.notes.append(f"the source folder {root} is not here: item paths checked by name only, not links")
    info = StoreInfo(store, manifest, tuple(0 for _ in range(n_shards)))
    first_shard: dict[str, int] = {}
    for shard in range(n_shards):
        path = shard_path(store, shard)
        record = records[shard] if records is not None and shard < len(records) else None
        try:
            table = _verified_table(info, path, record)
        except MPSCLIPError as err:
            report.problems.append(str(err))
            continue
        report.shards += 1
        report.rows += table.num_rows
        for item_id, meta in zip(table.column("id").to_pylist(), merged_metas(table), strict=True):
            if item_id in first_shard:
                report.problems.append(
                    f"{path}: item {item_id} is also in shard {first_shard[item_id]}; the store was made by an older "
                    "'mpsclip embed' from a source that changed during a run: embed the source again into a new store"
                )
            first_shard.setdefault(item_id, shard)
            key = PATH_KEYS.get(meta.get("kind", ""))
            if key is not None and isinstance(meta.get(key), str):
                try:
                    contained_path(root, meta[key], item_id)
                except MPSCLIPError as err:
                    report.problems.append(f"{path}: {err}")
    for name, entries in ((FAILURES, read_failures(store)), (PRUNED, read_pruned(store))):
        stray = [e for e in entries if not isinstance(e.get("shard"), int) or e["shard"] >= n_shards]
        if stray:
            report.problems.append(
                f"{store / name}: {len(stray)} records name shards that do not exist (first: {stray[0]}); run "
                "'mpsclip embed' again with the same arguments, which rewrites it"
            )
    stale = sorted(p.name for p in store.glob(".*.tmp"))
    if stale:
        report.notes.append(f"{len(stale)} temporary files of a killed run ({stale[0]}, ...): next embed removes them")
    return report
