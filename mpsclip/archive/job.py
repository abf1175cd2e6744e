"""The embedding job: embed an archive into a store of Parquet shards, resumably, on one executor.

Items are processed in the source's deterministic order; shard ``i`` holds items
``[i * shard_size, (i + 1) * shard_size)`` minus those that could not be read, so a run that was killed and
started again produces the same files as an uninterrupted one. ``failures.jsonl`` is rewritten before each
shard, so it always covers every complete shard.

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
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from mpsclip import __version__
from mpsclip.archive.embedder import Embedder, EmbedSettings, resolve_decode, resolve_device
from mpsclip.archive.items import Item, TileSettings
from mpsclip.archive.sources import iter_items, source_root
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
from mpsclip.checkpoints import config_path, file_sha256, read_saved_config, resolve_checkpoint
from mpsclip.errors import MPSCLIPError
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


ShardResult = tuple[int, ShardRows, list[tuple[Item, str]]]
"""One embedded shard: its index, its rows and the ``(item, error)`` of the items that could not be read."""


class ShardExecutor(Protocol):
    """Where shards are embedded: yields ``(shard, rows, failed)`` for ``shards``, in shard order."""

    def embed_shards(self, job: Job, shards: list[int]) -> Iterator[ShardResult]: ...


def list_items(source: Path, settings: EmbedSettings) -> list[Item]:
    items = list(iter_items(source) if settings.tiles is None else iter_items(source, settings.tiles))
    if not items:
        raise MPSCLIPError(f"{source}: no JPEG/PNG/TIFF images found")
    return items


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


def _identity(
    model: dict[str, Any], settings: EmbedSettings, decode: str, source: Path, n_items: int
) -> dict[str, Any]:
    """Everything that must match for a store to be resumed (or searched with a model)."""
    return {
        **model,
        "precision": PRECISION,
        "perspectives": settings.perspectives,
        "sub_root": str(settings.sub_root.resolve()) if settings.sub_root else None,
        "max_sub_images": settings.max_sub_images,
        "shard_size": settings.shard_size,
        "source": str(source.resolve()),
        "n_source_items": n_items,
        "tiles": _tiles_identity(settings.tiles),
        "runtime": settings.runtime,
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


def open_job(
    source: Path,
    store: Path,
    checkpoint: Path,
    arch: str | None,
    settings: EmbedSettings,
    decode: str,
    items: list[Item] | None = None,
) -> Job:
    """List ``source``, refuse a store made otherwise, write an unfinished manifest and keep the failures of
    the complete shards. ``decode`` is the JPEG decoding the executor resolved (``cpu`` or ``device``)."""
    items = items if items is not None else list_items(source, settings)
    identity = _identity(model_identity(checkpoint, arch), settings, decode, source, len(items))
    old = _check_resumable(store, identity)
    manifest = {**identity, "source_root": str(source_root(source)), "mpsclip_version": __version__}
    if old is not None and "dim" in old:
        manifest |= {"dim": old["dim"], "views": old["views"]}
    store.mkdir(parents=True, exist_ok=True)
    write_manifest(store, {**manifest, "complete": False})
    n_shards = (len(items) + settings.shard_size - 1) // settings.shard_size
    done = count_complete_shards(store)
    failures = [f for f in read_failures(store) if f["shard"] < done]
    return Job(store, items, settings, manifest, n_shards, done, failures)


def record_shard(job: Job, shard: int, rows: ShardRows, failed: list[tuple[Item, str]]) -> None:
    """Write shard ``shard`` (shards must be recorded in order); its failures are listed first. The first shard
    recorded gives the manifest its ``dim`` and ``views``."""
    expected = count_complete_shards(job.store)
    if shard != expected:
        raise MPSCLIPError(f"{job.store}: shard {shard} recorded out of order (next is {expected})")
    if "dim" not in job.manifest:
        job.manifest |= {"dim": int(rows.retrieval.shape[1]), "views": int(rows.perspectives.shape[1])}
        write_manifest(job.store, {**job.manifest, "complete": False})
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


def run_job(
    job: Job, executor: ShardExecutor, progress: bool = True, stop_after_shards: int | None = None
) -> EmbedSummary:
    """Embed the job's pending shards on ``executor``, record them in order and close the job;
    ``stop_after_shards`` stops after writing that many shards (for tests of resuming)."""
    shards = list(job.pending())[:stop_after_shards]
    size, n_items = job.settings.shard_size, len(job.items)
    with tqdm(
        total=n_items,
        initial=min(job.resumed * size, n_items),
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
    stop_after_shards: int | None = None,
    progress: bool = True,
) -> EmbedSummary:
    """Embed ``source`` into ``store`` in this process (resuming a partial store); ``stop_after_shards`` stops
    after writing that many shards in this call (for tests of resuming)."""
    settings = settings or EmbedSettings()
    settings.check()
    source, store, ckpt = Path(source), Path(store), resolve_checkpoint(checkpoint)
    executor = LocalExecutor(ckpt, arch, settings)
    job = open_job(source, store, ckpt, arch, settings, executor.decode())
    return run_job(job, executor, progress, stop_after_shards)
