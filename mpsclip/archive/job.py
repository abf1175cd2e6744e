"""The embedding job: embed an archive into a store of Parquet shards, resumably and append-only, on one executor.

Shards are made from item ids, never from positions in a listing. A run lists the source and reads the ids the
store's shards already hold; the items still to embed are the listed ids minus those in a shard minus those that
failed in a shard (unless ``retry_failed``), sorted by id and cut into chunks of ``shard_size``, which become the
shards numbered after the existing ones. Existing shards are never rewritten: a source that gained items gets only
them embedded, into new shards; a renamed, removed or re-ordered item can give neither a duplicate id nor a gap;
and a run that was killed and started again produces the same files as an uninterrupted one, because each shard's
failures are listed in ``failures.jsonl`` (rewritten before the shard, so it always covers every complete shard)
and count as done. With ``prune``, stored items whose source disappeared are listed in ``pruned.jsonl`` (searches
skip them; an item listed again is taken off). With ``retry_failed``, the failed items still listed are embedded
again. The manifest records each shard's rows and SHA-256 (:mod:`mpsclip.archive.store`), updated after each
shard; stale temporary files of a killed run are removed when a job opens. Several jobs must not write one store
at once.

:func:`open_job` lists the source and checks/creates the store (its identity comes from the checkpoint's JSON
config and file hash: no model is loaded), an executor makes the pending shards' rows
(:class:`LocalExecutor` in this process, :class:`~mpsclip.archive.ray_executor.RayExecutor` on a Ray actor pool;
both with :class:`~mpsclip.archive.embedder.Embedder`), :func:`run_job` records them in shard order
(:func:`record_shard`) and :func:`close_job` completes the manifest. The store records ``source_root`` and every
meta path relative to it (:func:`mpsclip.archive.items.resolve_source_path`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from mpsclip import __version__
from mpsclip.archive.embedder import Embedder, EmbedSettings, resolve_decode
from mpsclip.archive.hrefs import REMOTE_KINDS, remote_hosts
from mpsclip.archive.items import IMAGE_FORMATS, PATH_KEYS, Item, TileSettings, contained_path
from mpsclip.archive.sources import iter_items, source_identity, source_root
from mpsclip.archive.store import (
    FAILURES,
    MANIFEST,
    PRUNED,
    ShardRows,
    count_complete_shards,
    read_failures,
    read_manifest,
    read_pruned,
    shard_path,
    shard_record,
    write_failures,
    write_manifest,
    write_pruned,
    write_shard,
)
from mpsclip.archive.store_reader import check_shard, read_ids
from mpsclip.checkpoints import config_path, file_sha256, read_saved_config, resolve_checkpoint
from mpsclip.devices import resolve_device
from mpsclip.errors import MPSCLIPError
from mpsclip.io import remove_stale_temporaries
from mpsclip.keywords.zero_shot import load_rs_vocabulary

__all__ = [
    "EmbedSettings",
    "EmbedSummary",
    "Job",
    "LocalExecutor",
    "ShardExecutor",
    "close_job",
    "embed_archive",
    "open_job",
    "pending_items",
    "record_shard",
    "run_job",
]

PRECISION = "fp16"


@dataclass(frozen=True)
class EmbedSummary:
    store: Path
    n_items: int
    n_embedded: int
    n_failed: int
    n_shards: int
    n_resumed_shards: int
    complete: bool
    seconds: float
    n_new: int = 0
    """Rows this run added to the store (``n_embedded`` counts them all)."""
    n_pruned: int = 0


@dataclass
class Job:
    """One embedding run over a store: its listed items, the manifest to write and the items still to embed, as
    ``chunks`` that become shards ``resumed``, ``resumed + 1``, ... (``resumed``: the shards it found)."""

    store: Path
    items: list[Item]
    settings: EmbedSettings
    manifest: dict[str, Any]
    resumed: int
    chunks: list[list[Item]]
    failures: list[dict[str, Any]] = field(default_factory=list)
    pruned: list[dict[str, Any]] = field(default_factory=list)
    stored_rows: int = 0
    """Rows the store held when the job opened."""
    started: float = field(default_factory=time.perf_counter)

    @property
    def n_shards(self) -> int:
        return self.resumed + len(self.chunks)

    def shard_items(self, shard: int) -> list[Item]:
        return self.chunks[shard - self.resumed]

    def pending(self) -> range:
        return range(count_complete_shards(self.store), self.n_shards)


ShardResult = tuple[int, ShardRows, list[tuple[Item, str]]]
"""One embedded shard: its index, its rows and the ``(item, error)`` of the items that could not be read."""


class ShardExecutor(Protocol):
    """Where shards are embedded: yields ``(shard, rows, failed)`` for ``shards``, in shard order."""

    def embed_shards(self, job: Job, shards: list[int]) -> Iterator[ShardResult]: ...


def list_items(source: Path, settings: EmbedSettings) -> list[Item]:
    """The source's items sorted by id; raises :class:`MPSCLIPError` when there are none, an id repeats or an
    item's file lies outside the source folder (:func:`~mpsclip.archive.items.contained_path`)."""
    items = list(iter_items(source) if settings.tiles is None else iter_items(source, settings.tiles))
    if not items:
        raise MPSCLIPError(f"{source}: no {IMAGE_FORMATS} images found")
    items.sort(key=lambda item: item.id)
    for before, item in pairwise(items):
        if before.id == item.id:
            raise MPSCLIPError(f"{source}: item id {item.id} is listed twice; give each image once")
    _check_contained(items, source_root(source))
    return items


def _check_contained(items: list[Item], root: Path) -> None:
    """Refuse an item whose file lies outside ``root`` (an absolute path of a list, a link out of the folder)."""
    checked: set[str] = set()
    for item in items:
        relative = item.meta.get(PATH_KEYS.get(item.kind, ""))
        if isinstance(relative, str) and relative not in checked:
            contained_path(root, relative, item.id)
            checked.add(relative)


def model_identity(ckpt: Path, arch: str | None) -> dict[str, Any]:
    """``checkpoint``, ``checkpoint_sha256``, ``arch`` and ``family`` from the checkpoint's JSON config and file
    hash; a foreign checkpoint without a JSON config (an authors' release) is loaded once on the CPU instead."""
    if config_path(ckpt).exists():
        saved = read_saved_config(ckpt)
        family, arch = str(saved.get("family", "mpsclip")), arch or saved["config"]["arch"]
    else:
        from mpsclip.factory import load_model

        model = load_model(ckpt, arch=arch)
        family, arch = model.family, model.config_dict()["arch"]
    return {"checkpoint": str(ckpt.resolve()), "checkpoint_sha256": file_sha256(ckpt), "arch": arch, "family": family}


def _identity(model: dict[str, Any], settings: EmbedSettings, decode: str, source: Path) -> dict[str, Any]:
    """Everything that must match for a store to be resumed or grown (or searched with a model); not the number of
    items, which grows."""
    return {
        **model,
        "precision": PRECISION,
        "perspectives": settings.perspectives,
        "sub_root": str(settings.sub_root.resolve()) if settings.sub_root else None,
        "max_sub_images": settings.max_sub_images,
        "shard_size": settings.shard_size,
        "source": source_identity(source),  # a URL as given (Path() would fold its //)
        "tiles": _tiles_identity(settings.tiles),
        "runtime": settings.engine,
        "engine_precision": settings.engine_precision(),
        "decode": decode,
        "zero_shot": _zero_shot_identity(settings) if settings.perspectives == "zero-shot" else None,
    }


def _zero_shot_identity(settings: EmbedSettings) -> dict[str, Any]:
    """The zero-shot settings; the vocabulary by its nouns' count and hash (its file path alone says too little)."""
    nouns = load_rs_vocabulary(settings.zero_shot.vocabulary)
    zero_shot = {**asdict(settings.zero_shot), "vocabulary": str(settings.zero_shot.vocabulary or "packaged")}
    zero_shot["vocabulary_nouns"] = len(nouns)
    zero_shot["vocabulary_sha256"] = hashlib.sha256("\n".join(nouns).encode("utf-8")).hexdigest()
    return zero_shot


def _tiles_identity(tiles: TileSettings | None) -> dict[str, Any] | None:
    """The tile settings as the manifest's JSON holds them (bands as a list)."""
    if tiles is None:
        return None
    identity = {**asdict(tiles), "bands": list(tiles.bands) if tiles.bands else None}
    if tiles.resolution is None:  # as stores made before --resolution existed record it
        del identity["resolution"]
    return identity


def _check_resumable(store: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The store's manifest (None for a new store), when it was made with ``identity``."""
    old = read_manifest(store)
    if old is None:
        if store.exists() and any(store.iterdir()):
            raise MPSCLIPError(f"{store}: exists, is not empty and has no manifest.json; choose another --out")
        return None
    if isinstance(old.get("family"), str):  # stores made before identities came from configs: the class name
        old = {**old, "family": old["family"].lower()}
    differ = [key for key, value in identity.items() if old.get(key) != value and key != "checkpoint"]
    if differ:
        detail = "; ".join(f"{k}: store {old.get(k)!r} vs now {identity[k]!r}" for k in differ)
        raise MPSCLIPError(
            f"{store}: made with other settings ({detail}); embedding into it would mix incompatible vectors. "
            "Use another --out, or delete the store to start again"
        )
    return old


@dataclass(frozen=True)
class _Plan:
    """What a store holds and what is left to embed for a listing (see the module's docstring)."""

    done: int
    stored: dict[str, tuple[int, int]]
    """Every stored id with its ``(shard, row)``."""
    failures: list[dict[str, Any]]
    pending: list[Item]


def _plan(store: Path, items: list[Item], retry_failed: bool) -> _Plan:
    done = count_complete_shards(store) if store.is_dir() else 0
    stored: dict[str, tuple[int, int]] = {}
    for shard in range(done):
        for row, item_id in enumerate(read_ids(store, shard)):
            stored.setdefault(item_id, (shard, row))
    listed = {item.id for item in items}
    failures = [f for f in read_failures(store) if f["shard"] < done]  # later ones belong to an unwritten shard
    if retry_failed:
        failures = [f for f in failures if f["id"] not in listed]
    covered = stored.keys() | {f["id"] for f in failures}
    return _Plan(done, stored, failures, [item for item in items if item.id not in covered])


def pending_items(store: Path, items: list[Item], retry_failed: bool = False) -> list[Item]:
    """The ``items`` (sorted by id) that a job over ``store`` would embed."""
    return _plan(store, items, retry_failed).pending


def _shard_records(store: Path, old: dict[str, Any] | None, done: int) -> list[dict[str, Any]]:
    """The manifest's records of shards ``0..done-1``: those recorded checked against their files, the others
    (written by a run killed before it recorded them, or by a version before records) made from their files."""
    records = list((old or {}).get("shards") or [])[:done]
    for shard, record in enumerate(records):
        check_shard(shard_path(store, shard), record)
    return records + [shard_record(shard_path(store, shard)) for shard in range(len(records), done)]


def _pruned(store: Path, plan: _Plan, items: list[Item], prune: bool) -> list[dict[str, Any]]:
    """The pruned records to keep: those of existing shards whose item is not listed again, plus, with ``prune``,
    every stored item no longer listed; in store order."""
    listed = {item.id for item in items}
    pruned = {p["id"]: p for p in read_pruned(store) if p["shard"] < plan.done and p["id"] not in listed}
    if prune:
        for item_id, (shard, row) in plan.stored.items():
            if item_id not in listed:
                pruned.setdefault(item_id, {"id": item_id, "shard": shard, "row": row})
    return sorted(pruned.values(), key=lambda p: (p["shard"], p["row"]))


def open_job(
    source: Path,
    store: Path,
    checkpoint: Path,
    arch: str | None,
    settings: EmbedSettings,
    decode: str,
    items: list[Item] | None = None,
    prune: bool = False,
    retry_failed: bool = False,
) -> Job:
    """List ``source``, refuse a store made otherwise, check the shards it holds against their records, work out
    the items still to embed (see the module's docstring) and write an unfinished manifest when there are any.
    ``decode`` is the JPEG decoding the executor resolved (``cpu`` or ``device``)."""
    items = items if items is not None else list_items(source, settings)
    identity = _identity(model_identity(checkpoint, arch), settings, decode, source)
    for name in ("shard-*", MANIFEST, FAILURES, PRUNED):  # left by a killed run; removed first, so that a folder
        remove_stale_temporaries(store, name)  # holding only them is not refused as not a store
    old = _check_resumable(store, identity)
    manifest = {**identity, "source_root": str(source_root(source)), "mpsclip_version": __version__}
    manifest["unit_norm"] = True
    hosts = set((old or {}).get("remote_hosts") or []) | set(remote_hosts(items))
    if hosts:  # the only hosts a stored remote item is read from again (thumbnails, renders, re-embedding)
        manifest["remote_hosts"] = sorted(hosts)
    if old is not None and "dim" in old:
        manifest |= {"dim": old["dim"], "views": old["views"]}
    store.mkdir(parents=True, exist_ok=True)
    plan = _plan(store, items, retry_failed)
    manifest["shards"] = _shard_records(store, old, plan.done)
    pruned = _pruned(store, plan, items, prune)
    if plan.failures != read_failures(store):
        write_failures(store, plan.failures)
    if pruned != read_pruned(store):
        write_pruned(store, pruned)
    size = settings.shard_size
    chunks = [plan.pending[i : i + size] for i in range(0, len(plan.pending), size)]
    if chunks:
        write_manifest(store, {**manifest, "complete": False})
    stored_rows = sum(int(r["rows"]) for r in manifest["shards"])
    return Job(store, items, settings, manifest, plan.done, chunks, plan.failures, pruned, stored_rows)


def _public_path(item: Item) -> str:
    """What ``failures.jsonl`` names: the file, or a remote item's URLs as stored (no credentials, no query)."""
    return ", ".join(item.meta["hrefs"]) if item.kind in REMOTE_KINDS else str(item.path)


def record_shard(job: Job, shard: int, rows: ShardRows, failed: list[tuple[Item, str]]) -> None:
    """Write shard ``shard`` (shards must be recorded in order); its failures are listed first and its record
    (rows, SHA-256) is added to the manifest after. The first shard recorded gives the manifest its ``dim`` and
    ``views``."""
    expected = count_complete_shards(job.store)
    if shard != expected:
        raise MPSCLIPError(f"{job.store}: shard {shard} recorded out of order (next is {expected})")
    if "dim" not in job.manifest:
        job.manifest |= {"dim": int(rows.retrieval.shape[1]), "views": int(rows.perspectives.shape[1])}
    job.failures += [{"id": it.id, "path": _public_path(it), "error": err, "shard": shard} for it, err in failed]
    write_failures(job.store, job.failures)  # before the shard: a complete shard always has its failures listed
    path = shard_path(job.store, shard)
    write_shard(path, rows, job.manifest["dim"], job.manifest["views"])
    job.manifest["shards"] = [*job.manifest["shards"], shard_record(path)]
    write_manifest(job.store, {**job.manifest, "complete": False})


def close_job(job: Job) -> EmbedSummary:
    """Mark the store complete when every shard exists, and summarise the run."""
    n_done = count_complete_shards(job.store)
    complete = n_done == job.n_shards
    embedded = sum(int(r["rows"]) for r in job.manifest["shards"])
    n_failed = len(job.failures)
    if complete:
        counts = {"items": len(job.items), "embedded": embedded, "failed": n_failed, "shards": n_done}
        write_manifest(job.store, {**job.manifest, "complete": True, "counts": counts})
    return EmbedSummary(
        store=job.store,
        n_items=len(job.items),
        n_embedded=embedded,
        n_failed=n_failed,
        n_shards=n_done,
        n_resumed_shards=job.resumed,
        complete=complete,
        seconds=time.perf_counter() - job.started,
        n_new=embedded - job.stored_rows,
        n_pruned=len(job.pruned),
    )


class LocalExecutor:
    """Embeds shards in this process with one :class:`Embedder`: ``embedder``, or one loaded on the first shard."""

    def __init__(
        self, checkpoint: Path, arch: str | None, settings: EmbedSettings, embedder: Embedder | None = None
    ) -> None:
        self.checkpoint, self.arch, self.settings = checkpoint, arch, settings
        self.embedder = embedder

    def decode(self) -> str:
        return resolve_decode(self.settings.decode, resolve_device(self.settings.device))

    def embed_shards(self, job: Job, shards: list[int]) -> Iterator[ShardResult]:
        for shard in shards:
            if self.embedder is None:
                self.embedder = Embedder.load(self.checkpoint, self.arch, self.settings)
            rows, failed = self.embedder.embed(job.shard_items(shard))
            yield shard, rows, failed


def run_job(job: Job, executor: ShardExecutor, progress: bool = True) -> EmbedSummary:
    """Embed the job's pending shards on ``executor``, record them in order and close the job."""
    shards = list(job.pending())
    n_items = len(job.items)
    with tqdm(
        total=n_items,
        initial=n_items - sum(len(job.shard_items(shard)) for shard in job.pending()),
        unit="img",
        desc="embedding",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for shard, rows, failed in executor.embed_shards(job, shards) if shards else ():
            record_shard(job, shard, rows, failed)
            bar.update(len(job.shard_items(shard)))
    return close_job(job)


def embed_archive(
    source: str | Path,
    store: str | Path,
    checkpoint: str | Path,
    arch: str | None = None,
    settings: EmbedSettings | None = None,
    progress: bool = True,
    prune: bool = False,
    retry_failed: bool = False,
) -> EmbedSummary:
    """Embed ``source`` into ``store`` in this process (resuming a partial store, or growing a complete one with
    the source's new items); ``prune`` and ``retry_failed`` as in :func:`open_job`."""
    settings = settings or EmbedSettings()
    settings.check()
    source, store, ckpt = Path(source), Path(store), resolve_checkpoint(checkpoint)
    executor = LocalExecutor(ckpt, arch, settings)
    job = open_job(source, store, ckpt, arch, settings, executor.decode(), prune=prune, retry_failed=retry_failed)
    return run_job(job, executor, progress)
