"""Embed an archive into a store of Parquet shards, resumably.

Items are processed in the source's deterministic order; shard ``i`` holds items
``[i * shard_size, (i + 1) * shard_size)`` minus those that could not be read, so a run that was killed and
started again produces the same files as an uninterrupted one. ``failures.jsonl`` is rewritten before each
shard, so it always covers every complete shard.

The work is split so that other executors (Ray Data) can reuse it: :func:`open_job` lists the source and
checks/creates the store, :class:`~mpsclip.archive.embedder.Embedder` makes a shard's rows,
:func:`record_shard` writes them (in shard order) and :func:`close_job` completes the manifest.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mpsclip import __version__
from mpsclip.archive.embedder import Embedder, EmbedSettings
from mpsclip.archive.sources import Item, TileSettings, iter_items
from mpsclip.archive.store import (
    ShardRows,
    count_complete_shards,
    read_failures,
    read_manifest,
    shard_path,
    write_failures,
    write_manifest,
    write_shard,
)
from mpsclip.checkpoints import resolve_checkpoint
from mpsclip.errors import MPSCLIPError

__all__ = ["EmbedSettings", "EmbedSummary", "Job", "close_job", "embed_archive", "open_job", "record_shard"]

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


@dataclass
class Job:
    """One embedding run over a store: its items, the manifest to write and the shards still to make."""

    store: Path
    items: list[Item]
    settings: EmbedSettings
    manifest: dict[str, Any]
    n_shards: int
    resumed: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def shard_items(self, shard: int) -> list[Item]:
        size = self.settings.shard_size
        return self.items[shard * size : (shard + 1) * size]

    def pending(self) -> range:
        return range(count_complete_shards(self.store), self.n_shards)


def list_items(source: Path, settings: EmbedSettings) -> list[Item]:
    items = list(iter_items(source) if settings.tiles is None else iter_items(source, settings.tiles))
    if not items:
        raise MPSCLIPError(f"{source}: no JPEG/PNG/TIFF images found")
    return items


def _identity(embedder: Embedder, ckpt: Path, source: Path, n_items: int) -> dict[str, Any]:
    """Everything that must match for a store to be resumed (or searched with a model)."""
    model, settings = embedder.model, embedder.settings
    return {
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_sha256": embedder.checkpoint_sha256,
        "arch": model.config.arch,
        "family": type(model).__name__,
        "precision": PRECISION,
        "perspectives": settings.perspectives,
        "sub_root": str(settings.sub_root.resolve()) if settings.sub_root else None,
        "max_sub_images": settings.max_sub_images,
        "shard_size": settings.shard_size,
        "source": str(source.resolve()),
        "n_source_items": n_items,
        "tiles": _tiles_identity(settings.tiles),
        "runtime": settings.runtime,
        "decode": embedder.decode,
        "zero_shot": _zero_shot_identity(embedder) if embedder.zero_shot is not None else None,
    }


def _zero_shot_identity(embedder: Embedder) -> dict[str, Any]:
    """The zero-shot settings; the vocabulary by its nouns' count and hash (its file path alone says too little)."""
    settings = embedder.settings
    nouns = embedder.zero_shot.scorer.vocabulary
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


def _check_resumable(store: Path, identity: dict[str, Any]) -> None:
    old = read_manifest(store)
    if old is None:
        if store.exists() and any(store.iterdir()):
            raise MPSCLIPError(f"{store}: exists, is not empty and has no manifest.json; choose another --out")
        return
    differ = [key for key, value in identity.items() if old.get(key) != value and key != "checkpoint"]
    if differ:
        detail = "; ".join(f"{k}: store {old.get(k)!r} vs now {identity[k]!r}" for k in differ)
        raise MPSCLIPError(
            f"{store}: made with other settings ({detail}); embedding into it would mix incompatible vectors. "
            "Use another --out, or delete the store to start again"
        )


def open_job(
    source: Path, store: Path, checkpoint: Path, embedder: Embedder, items: list[Item] | None = None
) -> Job:
    """List ``source``, refuse a store made otherwise, write an unfinished manifest and keep the failures of
    the complete shards."""
    settings = embedder.settings
    items = items if items is not None else list_items(source, settings)
    identity = _identity(embedder, checkpoint, source, len(items))
    _check_resumable(store, identity)
    manifest = {**identity, "dim": embedder.dim, "views": embedder.views, "mpsclip_version": __version__}
    store.mkdir(parents=True, exist_ok=True)
    write_manifest(store, {**manifest, "complete": False})
    n_shards = (len(items) + settings.shard_size - 1) // settings.shard_size
    done = count_complete_shards(store)
    failures = [f for f in read_failures(store) if f["shard"] < done]
    return Job(store, items, settings, manifest, n_shards, done, failures)


def record_shard(job: Job, shard: int, rows: ShardRows, failed: list[tuple[Item, str]]) -> None:
    """Write shard ``shard`` (shards must be recorded in order); its failures are listed first."""
    expected = count_complete_shards(job.store)
    if shard != expected:
        raise MPSCLIPError(f"{job.store}: shard {shard} recorded out of order (next is {expected})")
    job.failures += [{"id": it.id, "path": str(it.path), "error": err, "shard": shard} for it, err in failed]
    write_failures(job.store, job.failures)  # before the shard: a complete shard always has its failures listed
    write_shard(shard_path(job.store, shard), rows, job.manifest["dim"], job.manifest["views"])


def close_job(job: Job) -> EmbedSummary:
    """Mark the store complete when every shard exists, and summarise the run."""
    n_done = count_complete_shards(job.store)
    complete = n_done == job.n_shards
    covered = min(n_done * job.settings.shard_size, len(job.items))
    n_failed = len(job.failures)
    if complete:
        counts = {"items": len(job.items), "embedded": covered - n_failed, "failed": n_failed, "shards": n_done}
        write_manifest(job.store, {**job.manifest, "complete": True, "counts": counts})
    return EmbedSummary(
        store=job.store,
        n_items=len(job.items),
        n_embedded=covered - n_failed,
        n_failed=n_failed,
        n_shards=n_done,
        n_resumed_shards=job.resumed,
        complete=complete,
        seconds=time.perf_counter() - job.started,
    )


def embed_archive(
    source: str | Path,
    store: str | Path,
    checkpoint: str | Path,
    arch: str | None = None,
    settings: EmbedSettings | None = None,
    stop_after_shards: int | None = None,
    progress: bool = True,
) -> EmbedSummary:
    """Embed ``source`` into ``store`` (resuming a partial store); ``stop_after_shards`` stops after writing
    that many shards in this call (for tests of resuming)."""
    settings = settings or EmbedSettings()
    settings.check()
    source, store = Path(source), Path(store)
    items = list_items(source, settings)
    ckpt = resolve_checkpoint(checkpoint)
    embedder = Embedder.load(ckpt, arch, settings)
    job = open_job(source, store, ckpt, embedder, items)
    bar = tqdm(
        total=len(items),
        initial=min(job.resumed * settings.shard_size, len(items)),
        unit="img",
        desc="embedding",
        disable=not progress,
        dynamic_ncols=True,
    )
    for written, shard in enumerate(job.pending()):
        if stop_after_shards is not None and written >= stop_after_shards:
            break
        chunk = job.shard_items(shard)
        rows, failed = embedder.embed(chunk)
        record_shard(job, shard, rows, failed)
        bar.update(len(chunk))
    bar.close()
    return close_job(job)
