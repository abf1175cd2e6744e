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

Integrity: shards are written with Parquet page checksums; the manifest records each shard's ``file``, ``rows`` and
``sha256`` (``shards``, :func:`shard_record`). Everything that reads a store, and checks what it reads against these
records, is :mod:`mpsclip.archive.store_reader`; this module knows the layout and writes it.

``pruned.jsonl`` lists the items (``id``, ``shard``, ``row``) whose source disappeared (``mpsclip embed --prune``):
their rows stay in their shards, and searches skip them (:func:`mpsclip.archive.store_reader.pruned_rows`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mpsclip.archive.geoparquet import BBOX, BBOX_FIELDS, GEOMETRY, ROW_GROUP_ROWS, geo_metadata, geometry_column
from mpsclip.archive.meta_columns import STATISTICS, lifted_arrays, split_meta
from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
PRUNED = "pruned.jsonl"
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


def what_to_do(path: Path) -> str:
    """What to do about the damaged shard ``path``: the end of every error naming one."""
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
            + what_to_do(path)
        ) from err


def shard_num_rows(path: Path) -> int:
    """The rows of a shard, from its footer."""
    with reading(path):
        return pq.read_metadata(path).num_rows


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
