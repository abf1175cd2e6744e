"""The embedding store: a folder of Parquet shards plus ``manifest.json`` and ``failures.jsonl``.

Each shard ``shard-NNNNN.parquet`` has the columns ``id`` (string), ``meta`` (JSON string), ``retrieval`` and
``global`` (``dim`` fp16 numbers as one fixed-size binary value per row), ``perspectives`` (``views × dim``
fp16, flattened, the same way) and ``valid`` (``views`` bools). Stores written with fixed-size lists of fp16
(before binary rows) read the same. Every file is written to a temporary file and renamed, so it appears only
when complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

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
    """Write one shard atomically (an empty shard keeps its schema)."""
    n = len(rows.ids)
    table = pa.table(
        {
            "id": pa.array(rows.ids, type=pa.string()),
            "meta": pa.array(rows.metas, type=pa.string()),
            "retrieval": _fp16_rows(rows.retrieval.reshape(n, dim)),
            "global": _fp16_rows(rows.glob.reshape(n, dim)),
            "perspectives": _fp16_rows(rows.perspectives.reshape(n, views * dim)),
            "valid": _fixed_list(rows.valid.astype(bool).reshape(n, views), views),
        }
    )
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


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


def open_store(store: str | Path) -> StoreInfo:
    """Check that ``store`` is complete and count its rows; raises :class:`MPSCLIPError` if missing or unfinished."""
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
    return StoreInfo(store, manifest, rows)


def read_shard(info: StoreInfo, shard: int, columns: list[str]) -> dict[str, np.ndarray]:
    """Only ``columns`` of one shard: ``id``/``meta`` as object arrays of str, embeddings as
    ``retrieval``/``global`` [n, D], ``perspectives`` [n, K, D] (fp16) and ``valid`` [n, K] (bool)."""
    table = pq.read_table(shard_path(info.path, shard), columns=columns)
    out: dict[str, np.ndarray] = {}
    for name in columns:
        if name in ("id", "meta"):
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
        table = pq.read_table(shard_path(info.path, shard), columns=["id", "meta"])
        taken = table.take(pa.array([row - offsets[shard] for row in wanted]))
        ids, metas = taken.column("id").to_pylist(), taken.column("meta").to_pylist()
        for row, item_id, meta in zip(wanted, ids, metas, strict=True):
            found[row] = (item_id, json.loads(meta))
    return found


def load_store(store: str | Path) -> StoreData:
    """Read a complete store into memory; raises :class:`MPSCLIPError` if it is missing or unfinished."""
    info = open_store(store)
    dim, views = info.dim, info.views
    table = pa.concat_tables([pq.read_table(shard_path(info.path, i)) for i in range(len(info.shard_rows))])
    return StoreData(
        manifest=info.manifest,
        ids=table.column("id").to_pylist(),
        metas=[json.loads(m) for m in table.column("meta").to_pylist()],
        retrieval=torch.from_numpy(_column(table, "retrieval", dim, np.float16)),
        glob=torch.from_numpy(_column(table, "global", dim, np.float16)),
        perspectives=torch.from_numpy(_column(table, "perspectives", views * dim, np.float16)).view(-1, views, dim),
        valid=torch.from_numpy(_column(table, "valid", views, np.bool_)),
    )
