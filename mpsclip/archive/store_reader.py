"""The one reader of an embedding store (:mod:`mpsclip.archive.store`): every read of its shards goes through here,
and so does every check of what is read.

Two ways to read, for the two kinds of callers:

* :func:`stream` gives the shards one by one (only the columns asked for, with an optional
  :class:`~mpsclip.archive.filters.ItemFilter` pushed down to the Parquet reader: row groups whose statistics
  exclude it are not decoded), decoding the next ones in threads meanwhile: ``mpsclip search``, index building.
* :func:`load_store` reads a whole store into memory (ids, parsed metas, the embedding columns), taking the shards
  unchanged since a ``previous`` load from it instead of reading them again: ``mpsclip serve`` and its reloads,
  ``mpsclip bench search``.

What is checked, here only: :func:`open_store` refuses an unfinished or incomplete store, compares each shard's
SHA-256 with its manifest record (a digest is computed again only when a file's size or mtime changed) and
refuses item paths that leave the source folder; every read verifies the Parquet page checksums; embeddings of a
store of unit vectors (:func:`unit_norm`) must have a unit norm (checked once per version of a shard file), and a
shard whose columns are not what the manifest says is an error naming it; :func:`pruned_rows` gives the rows of
items gone from their source (searches and servers skip them); :func:`verify_store` checks everything in full
(``mpsclip verify``). Every error names the file and what to do.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from mpsclip.archive.filters import ItemFilter, meta_arrays, table_arrays
from mpsclip.archive.geoparquet import BBOX
from mpsclip.archive.meta_columns import merged_metas, meta_columns_of
from mpsclip.archive.store import (
    FAILURES,
    MANIFEST,
    PRUNED,
    count_complete_shards,
    read_failures,
    read_manifest,
    read_pruned,
    reading,
    sha256_file,
    shard_num_rows,
    shard_path,
    shard_sha256,
    what_to_do,
)
from mpsclip.errors import MPSCLIPError

NORM_TOLERANCE = 1e-2
"""How far from 1 the norm of a stored fp16 unit vector may be (fp16 rounding moves it by about 1e-3 at most)."""
EMBEDDING_COLUMNS = ("retrieval", "global", "perspectives")
VECTOR_COLUMNS = ("retrieval", "global", "perspectives", "valid")
"""The columns :func:`load_store` holds besides ids and metas."""
READ_AHEAD = 2
"""Shards decoded in threads ahead of the one being used."""
READ_TRIES = 3
"""Reads of a store whose files changed while being read, before :func:`load_store` gives up."""
Stat = tuple[int, int]
"""``(mtime_ns, size)`` of a file."""
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ opening
@dataclass(frozen=True)
class StoreInfo:
    """A store on disk: its manifest and the number of rows of every shard read (nothing else is read)."""

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


def open_store(store: str | Path, source_root: str | Path | None = None, finished_shards: bool = False) -> StoreInfo:
    """Check that ``store`` is complete and count its rows; raises :class:`MPSCLIPError` if missing or unfinished.
    With ``finished_shards``, a store 'mpsclip embed' is still writing opens as the shards it finished so far (what
    a server serves). ``source_root`` relocates the store's SOURCE (:func:`relocate_source`)."""
    store = Path(store)
    manifest = read_manifest(store)
    if manifest is None:
        raise MPSCLIPError(f"{store}: no {MANIFEST}; is this a store made by 'mpsclip embed'?")
    if manifest.get("complete"):
        n_shards = _complete_shards(store, manifest)
    elif not finished_shards:
        raise MPSCLIPError(f"{store}: the store is unfinished; run 'mpsclip embed' again to complete it")
    elif "dim" not in manifest:
        raise MPSCLIPError(f"{store}: 'mpsclip embed' has not finished a shard of it yet; reload once it has")
    else:
        n_shards = count_complete_shards(store)
    rows = _checked_shard_rows(store, manifest, n_shards)
    if sum(rows) == 0 and manifest.get("complete"):
        raise MPSCLIPError(f"{store}: the store holds no embeddings")
    if sum(rows) == 0:
        raise MPSCLIPError(f"{store}: the shards finished so far hold no embeddings; reload once more are written")
    info = StoreInfo(store, manifest, rows)
    return info if source_root is None else relocate_source(info, source_root)


def _complete_shards(store: Path, manifest: dict[str, Any]) -> int:
    """The shards of a complete store, as many as its manifest counts and records."""
    n_shards = count_complete_shards(store)
    if n_shards != manifest["counts"]["shards"]:
        raise MPSCLIPError(f"{store}: {n_shards} shards found, the manifest says {manifest['counts']['shards']}")
    if "shards" in manifest and len(manifest["shards"]) != n_shards:
        raise MPSCLIPError(
            f"{store}: {n_shards} shards found, the manifest records {len(manifest['shards'])}; run 'mpsclip embed' "
            "again with the same arguments to record them"
        )
    return n_shards


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


def check_shard(path: Path, record: dict[str, Any], again: bool = False) -> None:
    """Raise :class:`MPSCLIPError` unless the shard ``path`` is the file its manifest ``record`` describes; its
    SHA-256 is computed again only if the file changed since the last time, or with ``again``."""
    if record.get("file") != path.name:
        raise MPSCLIPError(
            f"{path.parent / MANIFEST}: records {record.get('file')!r} where {path.name} should be; the manifest was "
            "edited or damaged: delete the store and embed again"
        )
    with reading(path):
        digest = sha256_file(path) if again else shard_sha256(path)
    if digest != record.get("sha256"):
        raise MPSCLIPError(
            f"{path}: its SHA-256 differs from the one {MANIFEST} records: the file changed or was damaged after "
            "it was written; " + what_to_do(path)
        )


_PATHS_CHECKED: dict[Path, Stat] = {}
"""Shards whose item paths were checked, with the ``(mtime_ns, size)`` they had then."""


def _check_item_paths(path: Path, source_root: str | Path) -> None:
    """Refuse a shard holding an item whose ``source_path`` is absolute or climbs out with ``..``, naming the
    item (links are followed when an item is opened: :func:`~mpsclip.archive.items.contained_path`). Shards
    written before the lifted columns are left to that check."""
    from mpsclip.archive.items import contained_path

    stat = _stat(path)
    key = path.absolute()
    if _PATHS_CHECKED.get(key) == stat:
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
    _PATHS_CHECKED[key] = stat


def _checked_shard_rows(store: Path, manifest: dict[str, Any], n_shards: int) -> tuple[int, ...]:
    """The rows of shards ``0..n_shards-1``; those the manifest records are checked against their record (a shard
    written since, which 'mpsclip embed' records next, and the shards of stores made before records are counted
    from their footer). Every shard's item paths are checked."""
    records = manifest.get("shards") or []
    rows = []
    for shard in range(n_shards):
        path = shard_path(store, shard)
        if shard < len(records):
            check_shard(path, records[shard])
            rows.append(int(records[shard]["rows"]))
        else:
            rows.append(shard_num_rows(path))
        _check_item_paths(path, manifest.get("source_root", store))
    return tuple(rows)


def pruned_rows(info: StoreInfo) -> np.ndarray:
    """Store rows (ascending) of the items ``mpsclip embed --prune`` recorded as gone from the source: searches and
    servers skip them. Records naming rows the store does not hold are ignored."""
    offsets = info.offsets()
    rows = [
        offsets[p["shard"]] + p["row"]
        for p in read_pruned(info.path)
        if p["shard"] < len(offsets) and p["row"] < info.shard_rows[p["shard"]]
    ]
    return np.array(sorted(rows), dtype=np.int64)


# ------------------------------------------------------------------------------------------ reading shards
def _stat(path: Path) -> Stat:
    with reading(path):
        stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    with reading(path):
        return pq.read_table(path, columns=columns, page_checksum_verification=True)


def _column_names(path: Path) -> list[str]:
    with reading(path):
        return pq.read_schema(path).names


def _stored_columns(columns: list[str], names: list[str]) -> list[str]:
    """The stored columns that give ``columns`` of a shard whose columns are ``names`` (``meta``: the item's
    whole meta, from ``meta`` and the lifted columns)."""
    stored = [c for c in columns if c != "meta"]
    return stored + (meta_columns_of(names) if "meta" in columns else [])


@dataclass(frozen=True)
class ShardPart:
    """Rows of one shard as :func:`read_shard` gives them: the shard's first store row ``offset``, the positions in
    the shard of the rows read (``positions``, ascending) and their ``columns``: ``id`` (str)
    and ``meta`` (each item's whole meta, a dict) as object arrays, ``retrieval``/``global`` ``[n, D]`` and
    ``perspectives`` ``[n, K, D]`` fp16, ``valid`` ``[n, K]`` bool."""

    offset: int
    positions: np.ndarray
    columns: dict[str, np.ndarray]

    def rows(self) -> np.ndarray:
        """The store rows of the rows read."""
        return self.positions + self.offset


def read_shard(info: StoreInfo, shard: int, columns: list[str], where: ItemFilter | None = None) -> ShardPart:
    """Only ``columns`` of one shard; with ``where``, of the items that pass it. Only the row groups whose
    statistics may hold such items are read; a shard written before GeoParquet columns is read whole and filtered
    on its JSON."""
    path = shard_path(info.path, shard)
    offset = info.offsets()[shard]
    version = _version(path)
    with reading(path):
        file = pq.ParquetFile(path, page_checksum_verification=True)
        names = file.schema_arrow.names
        if where is None:
            table = file.read(columns=_stored_columns(columns, names))
            every = np.arange(table.num_rows, dtype=np.int64)
            return ShardPart(offset, every, _decode(info, table, columns, path, version=version))
        if BBOX not in names:
            whole = read_shard(info, shard, list(dict.fromkeys([*columns, "meta"])))
            keep = where.rows(meta_arrays(list(whole.columns["meta"])))
            return ShardPart(offset, keep, {c: whole.columns[c][keep] for c in columns})
        groups = where.row_groups(file.metadata)
        stored = list(dict.fromkeys([*_stored_columns(columns, names), *where.columns(names)]))
        sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
        table = file.read_row_groups(groups, columns=stored)
    starts = np.cumsum([0, *sizes])
    positions = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups] or [np.zeros(0, np.int64)])
    keep = where.rows(table_arrays(table))
    positions = positions[keep].astype(np.int64)
    decoded = _decode(info, table.take(pa.array(keep, pa.int64())), columns, path, positions)
    return ShardPart(offset, positions, decoded)


def _read_ahead(tasks: list[Callable[[], T]], progress: str | None = None) -> Iterator[T]:
    """The results of ``tasks`` in order, the next :data:`READ_AHEAD` running in threads meanwhile (pyarrow
    decodes without the GIL); ``progress`` names a progress bar."""
    with ThreadPoolExecutor(max_workers=READ_AHEAD) as pool:
        pending = deque(pool.submit(task) for task in tasks[:READ_AHEAD])
        for i in tqdm(range(len(tasks)), desc=progress, unit="shard", disable=progress is None):
            result = pending.popleft().result()
            if i + READ_AHEAD < len(tasks):
                pending.append(pool.submit(tasks[i + READ_AHEAD]))
            yield result


def stream(
    info: StoreInfo,
    columns: list[str],
    where: ItemFilter | None = None,
    shards: range | None = None,
    progress: str | None = None,
) -> Iterator[ShardPart]:
    """:func:`read_shard` of every shard (or of ``shards``) in order, the next ones decoded in threads meanwhile,
    so that only a few shards' columns are in memory at a time; ``progress`` names a progress bar."""
    shards = range(len(info.shard_rows)) if shards is None else shards
    tasks = [lambda s=s: read_shard(info, s, columns, where) for s in shards]
    return _read_ahead(tasks, progress)


def read_ids_metas(info: StoreInfo, rows: list[int]) -> dict[int, tuple[str, dict[str, Any]]]:
    """``id`` and parsed ``meta`` of the given store rows, reading only the shards that hold them."""
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


def read_ids(store: Path, shard: int) -> list[str]:
    """The ``id`` column of one shard of a store being written (what 'mpsclip embed' resumes from)."""
    return [str(i) for i in _read_table(shard_path(store, shard), ["id"]).column("id").to_pylist()]


# ------------------------------------------------------------------------------------------- decoding, norms
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
            f"{int(bad.sum())} rows of this shard read so far are off: the shard is damaged; " + what_to_do(path)
        )


_NORMS_CHECKED: set[tuple[tuple[Path, int, int], str]] = set()
"""``(shard version, column)`` whose every embedding norm was checked in this process."""


def _version(path: Path) -> tuple[Path, int, int]:
    """A shard file's version: its absolute path, mtime and size (taken before reading it)."""
    return path.absolute(), *_stat(path)


def _decode(
    info: StoreInfo,
    table: pa.Table,
    columns: list[str],
    path: Path,
    positions: np.ndarray | None = None,
    version: tuple[Path, int, int] | None = None,
) -> dict[str, np.ndarray]:
    """``columns`` of a shard's ``table`` as :class:`ShardPart` holds them, embedding norms checked (once per
    ``version`` of a whole shard: a shard is read again for every search); a column that is not what the manifest
    says (width, JSON) is an error naming the shard ``path``."""
    try:
        out = {name: _decoded(info, table, name) for name in columns}
    except (ValueError, KeyError, TypeError, pa.ArrowException) as err:  # JSONDecodeError is a ValueError
        raise MPSCLIPError(
            f"{path}: its columns are not those of a shard with the manifest's dim {info.manifest.get('dim')} and "
            f"views {info.manifest.get('views')} ({type(err).__name__}: {err}); " + what_to_do(path)
        ) from err
    if unit_norm(info.manifest):
        for name in [c for c in EMBEDDING_COLUMNS if c in columns and (version, c) not in _NORMS_CHECKED]:
            check_norms(path, name, out[name], positions)
            if version is not None:
                _NORMS_CHECKED.add((version, name))
    return out


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _decoded(info: StoreInfo, table: pa.Table, name: str) -> np.ndarray:
    if name == "meta":
        return _objects(merged_metas(table))
    if name == "id":
        return _objects([str(i) for i in table.column(name).to_pylist()])
    if name == "valid":
        return _column(table, name, info.views, np.bool_)
    if name == "perspectives":
        return _column(table, name, info.views * info.dim, np.float16).reshape(-1, info.views, info.dim)
    return _column(table, name, info.dim, np.float16)


def _column(table: pa.Table, name: str, width: int, dtype: type) -> np.ndarray:
    """A ``[rows, width]`` writable array (for torch) of a fixed-size binary column of fp16 rows, or of a
    fixed-size list column (the layout of stores written before binary rows)."""
    column = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_binary(column.type):
        data = np.frombuffer(column.buffers()[1], dtype="<f2", count=(column.offset + len(column)) * width)
        return data[column.offset * width :].astype(dtype).reshape(len(column), width)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.array(flat, dtype=dtype).reshape(table.num_rows, width)


# ---------------------------------------------------------------------------------------------- in memory
@dataclass(frozen=True)
class StoreVersion:
    """What a store folder holds now: ``(mtime_ns, size)`` of its manifest and of each finished shard."""

    manifest: Stat
    shards: tuple[Stat, ...]


def store_version(path: Path) -> StoreVersion:
    """The store's :class:`StoreVersion` (a few ``stat`` calls: cheap enough to check every few seconds)."""
    try:
        stat = (path / MANIFEST).stat()
    except FileNotFoundError as err:
        raise MPSCLIPError(f"{path}: no {MANIFEST}; is this a store made by 'mpsclip embed'?") from err
    shards: list[Stat] = []
    while True:
        try:
            shard = shard_path(path, len(shards)).stat()
        except FileNotFoundError:
            break
        shards.append((shard.st_mtime_ns, shard.st_size))
    return StoreVersion((stat.st_mtime_ns, stat.st_size), tuple(shards))


@dataclass
class StoreData:
    """A whole store in memory: every item's ``id`` and ``meta`` and the :data:`VECTOR_COLUMNS` as
    :class:`ShardPart` holds them, rows in store order; ``version``: the files they were read from; ``pruned``:
    :func:`pruned_rows`."""

    info: StoreInfo
    ids: list[str]
    metas: list[dict[str, Any]]
    columns: dict[str, np.ndarray]
    version: StoreVersion
    pruned: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def manifest(self) -> dict[str, Any]:
        return self.info.manifest


def load_store(
    store: str | Path,
    source_root: str | Path | None = None,
    previous: StoreData | None = None,
    finished_shards: bool = False,
) -> StoreData:
    """Read the store into memory (:func:`open_store`: ``finished_shards`` takes the shards finished so far of a
    store still being written, ``source_root`` relocates its SOURCE). Shards whose files are unchanged since
    ``previous`` was read (and of the same rows and layout) are taken from it. Read again when the files change
    meanwhile, so the result is one version of the store."""
    path = Path(store)
    for _ in range(READ_TRIES):
        version = store_version(path)
        info = open_store(path, source_root, finished_shards)
        parts = _shard_parts(info, version, previous)
        if store_version(path) == version:
            break
    else:
        raise MPSCLIPError(f"{path}: its files changed every time it was read ({READ_TRIES} tries); read it later")
    columns = {c: np.concatenate([p.columns[c] for p in parts]) for c in VECTOR_COLUMNS}
    ids = [i for p in parts for i in p.columns["id"]]
    metas = [m for p in parts for m in p.columns["meta"]]
    return StoreData(info, ids, metas, columns, version, pruned_rows(info))


def _shard_parts(info: StoreInfo, version: StoreVersion, previous: StoreData | None) -> list[ShardPart]:
    """Every shard's ids, metas and vectors: those ``previous`` holds as they are now sliced from it, the others
    read (in threads)."""
    kept = {s: _kept_part(previous, info, version, s) for s in range(len(info.shard_rows))}
    tasks = [lambda s=s: read_shard(info, s, ["id", "meta", *VECTOR_COLUMNS]) for s, p in kept.items() if p is None]
    read = iter(list(_read_ahead(tasks)))
    return [part if part is not None else next(read) for part in kept.values()]


def _kept_part(previous: StoreData | None, info: StoreInfo, version: StoreVersion, shard: int) -> ShardPart | None:
    """Shard ``shard`` sliced from ``previous`` if it read the file as it is now (mtime, size, rows, layout)."""
    if previous is None or shard >= min(len(previous.version.shards), len(version.shards)):
        return None
    old = previous.info
    if (
        previous.version.shards[shard] != version.shards[shard]
        or (old.dim, old.views) != (info.dim, info.views)
        or old.shard_rows[shard] != info.shard_rows[shard]
    ):
        return None
    start = old.offsets()[shard]
    stop = start + info.shard_rows[shard]
    columns = {c: previous.columns[c][start:stop] for c in VECTOR_COLUMNS}
    columns |= {"id": _objects(previous.ids[start:stop]), "meta": _objects(previous.metas[start:stop])}
    return ShardPart(info.offsets()[shard], np.arange(stop - start, dtype=np.int64), columns)


# ------------------------------------------------------------------------------------------------ verify
@dataclass
class Verification:
    """What :func:`verify_store` found: ``problems`` (each names its file and what to do) and ``notes``."""

    store: Path
    shards: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _verified_table(info: StoreInfo, path: Path, record: dict[str, Any] | None) -> pa.Table:
    """The whole shard ``path``, read after its SHA-256 is computed again and compared with ``record`` (None: not
    recorded), its pages checked and its embeddings decoded (their norms checked)."""
    if record is not None:
        check_shard(path, record, again=True)
    table = _read_table(path)
    if "dim" in info.manifest:
        _decode(info, table, list(VECTOR_COLUMNS), path)
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
