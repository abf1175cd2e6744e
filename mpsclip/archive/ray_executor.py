"""The Ray executor: embed a job's shards on a Ray Data actor pool, across GPUs and nodes; the same store as
:func:`mpsclip.archive.job.embed_archive`.

The driver lists the source and opens the job (:func:`~mpsclip.archive.job.open_job`: the store's identity comes
from the checkpoint's JSON config and hash, no model is loaded on the driver), then turns the pending shards into a
Ray Dataset (one row per shard: its index and its items as JSON). An actor pool (``map_batches`` with
:class:`_ShardWorker`, one GPU per actor when the cluster has GPUs) reads and embeds each shard with the same
:class:`~mpsclip.archive.embedder.Embedder` as the local executor; Ray schedules the actors and restarts them when
they die. :func:`~mpsclip.archive.job.run_job` receives the shards in order and records them, so the store is
byte-identical to a local run and a killed run resumes the same way. When every shard is already done, Ray is not
started. Image paths must be readable on every node (a shared filesystem). Ray is imported here only:
``import mpsclip`` never needs it.
"""

from __future__ import annotations

import json
import pickle
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpsclip.archive.embedder import Embedder, EmbedSettings, resolve_decode
from mpsclip.archive.items import Item
from mpsclip.archive.job import (
    EmbedSummary,
    Job,
    LocalExecutor,
    ShardResult,
    list_items,
    open_job,
    pending_items,
    run_job,
)
from mpsclip.archive.store import read_manifest
from mpsclip.checkpoints import resolve_checkpoint
from mpsclip.errors import MPSCLIPError
from mpsclip.trust import checkpoints_trusted, trusting_checkpoints

__all__ = ["RayExecutor", "ShardRecord", "embed_archive_ray"]

ACTOR_START_TIMEOUT_S = 600
"""How long the actor pool may take to start (models loaded on every node) before the job fails."""
CONNECT_TIMEOUT_S = 5.0
"""How long to wait for a ``--ray-address`` cluster to answer before giving up."""


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the Data library is a separate extra of ray)
    except ImportError as err:
        raise MPSCLIPError(f"--ray needs Ray Data ({err}); install it with: pip install 'mpsclip[ray]'") from err
    return ray


def _probe(address: str) -> None:
    """Fail within :data:`CONNECT_TIMEOUT_S` when nothing listens at a ``host:port`` (or ``ray://host:port``)
    address, rather than letting ``ray.init`` wait for minutes; other addresses (``auto``) are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise MPSCLIPError(
            f"--ray-address {address}: nothing answers there within {CONNECT_TIMEOUT_S:g} s ({err}); start a cluster "
            "with 'ray start --head' and pass its address, or drop --ray-address to run on a local Ray instance"
        ) from err


def _connect(ray: Any, address: str | None) -> None:
    """Start a local Ray instance (``address`` None) or join the cluster at ``address``."""
    if address is not None:
        _probe(address)
    try:
        ray.init(address=address, include_dashboard=False)
    except ConnectionError as err:
        raise MPSCLIPError(
            f"--ray-address {address}: no Ray cluster found there ({err}); start one with 'ray start --head', "
            "or drop --ray-address to run on a local Ray instance"
        ) from err


def _pack(items: list[Item]) -> str:
    """A shard's items as JSON, so that a Ray Dataset row carries plain data."""
    return json.dumps(
        [{"id": it.id, "path": str(it.path), "meta": it.meta, "kind": it.kind, "hrefs": it.hrefs} for it in items]
    )


def _unpack(text: str) -> list[Item]:
    return [Item(d["id"], Path(d["path"]), d["meta"], d["kind"], tuple(d["hrefs"])) for d in json.loads(text)]


def _node_address(ray: Any) -> str:
    return str(ray.util.get_node_ip_address())


def _check_readable(node: str, what: str, path: Path) -> None:
    """Fail on this node, naming it and the path, when ``path`` (a file of SOURCE or the checkpoint) is not there."""
    if not path.is_file():
        raise MPSCLIPError(
            f"Ray node {node} cannot read the {what}: every node must see the same paths (a shared file "
            "system or the same copy on each node); mount it there, or remove the node from the cluster"
        )


class _ShardWorker:
    """A Ray actor holding one :class:`Embedder`: each row in, that shard's pickled ``(rows, failed)`` out, with
    the address of the node that embedded it. It first checks that its node sees the source and the checkpoint."""

    def __init__(
        self, checkpoint: Path, arch: str | None, settings: EmbedSettings, root: str, probe: str | None, trust: bool
    ) -> None:
        import ray

        self.node = _node_address(ray)
        _check_readable(self.node, "checkpoint", checkpoint)
        if probe is not None:
            _check_readable(self.node, f"source folder {root} (no {probe} there)", Path(root) / probe)
        with trusting_checkpoints(trust):  # the driver's --trust-checkpoint: this is another process
            self.embedder = Embedder.load(checkpoint, arch, settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for text in batch["items"]:
            started = time.perf_counter()
            result = self.embedder.embed(_unpack(str(text)))
            results.append(pickle.dumps((result, self.node, time.perf_counter() - started)))
        return {"shard": batch["shard"], "result": np.array(results, dtype=object)}


@dataclass(frozen=True)
class _Actors:
    """The actor pool: how many actors, what each reserves, and the settings they embed with."""

    count: int
    cpus: float
    gpus: float
    settings: EmbedSettings


def _plan_actors(ray: Any, settings: EmbedSettings, num_actors: int | None, gpus_per_actor: float | None) -> _Actors:
    """A GPU per actor when the cluster has GPUs (unless ``--device cpu``), one actor per GPU by default; CPU
    actors reserve their own thread plus their image-reading processes, as many as fit by default."""
    cluster = ray.cluster_resources()
    cluster_gpus, cluster_cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    if settings.device.startswith("cuda:"):
        raise MPSCLIPError(f"--device {settings.device}: with --ray, Ray assigns the GPUs; use --device auto or cuda")
    if settings.device == "cpu":
        gpus = 0.0
    else:
        gpus = (1.0 if cluster_gpus else 0.0) if gpus_per_actor is None else gpus_per_actor
    if gpus > cluster_gpus or (settings.device == "cuda" and gpus <= 0):
        raise MPSCLIPError(
            f"--device {settings.device}: the Ray cluster has {cluster_gpus:g} GPUs and each actor asks for "
            f"{gpus:g}; use --device cpu, or a cluster with GPUs"
        )
    cpus = min(1.0 + settings.workers, cluster_cpus)  # capped so that one actor always fits
    if num_actors is None:
        num_actors = max(1, int(cluster_gpus // gpus if gpus > 0 else cluster_cpus // cpus))
    return _Actors(num_actors, cpus, gpus, replace(settings, device="cuda" if gpus > 0 else "cpu"))


@dataclass(frozen=True)
class ShardRecord:
    """Where and how long one shard was embedded (one line of ``--ray-log``)."""

    shard: int
    node: str
    items: int
    seconds: float


class RayExecutor:
    """Embeds shards on a Ray Data actor pool (see the module's docstring); the cluster must be connected.
    ``on_shard`` hears where each shard was embedded, in shard order."""

    def __init__(
        self,
        ray: Any,
        checkpoint: Path,
        arch: str | None,
        actors: _Actors,
        on_shard: Callable[[ShardRecord], None] | None = None,
    ) -> None:
        self.ray, self.checkpoint, self.arch, self.actors, self.on_shard = ray, checkpoint, arch, actors, on_shard

    def embed_shards(self, job: Job, shards: list[int]) -> Iterator[ShardResult]:
        """Embed ``shards`` in a Ray actor pool; yields ``(shard, rows, failed)`` in shard order."""
        ray, actors = self.ray, self.actors
        rows = [{"shard": shard, "items": _pack(job.shard_items(shard))} for shard in shards]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds.context.execution_options.preserve_order = True  # this dataset's own copy of the context
        ds.context.enable_progress_bars = False  # the driver shows one bar over items
        ds.context.max_consecutive_actor_init_deaths = 2  # a node that cannot read the paths fails the job
        ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S  # the whole pool is up before shards are handed out
        kwargs = {"checkpoint": self.checkpoint, "arch": self.arch, "settings": actors.settings,
                  "trust": checkpoints_trusted()}
        ds = ds.map_batches(
            _ShardWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(actors.count, len(rows))),
            fn_constructor_kwargs=kwargs | _source_probe(job),
            num_cpus=actors.cpus,
            num_gpus=actors.gpus,
        )
        for row in _rows_or_clear_error(ray, ds):
            (shard_rows, failed), node, seconds = pickle.loads(row["result"])
            shard = int(row["shard"])
            if self.on_shard is not None:
                self.on_shard(ShardRecord(shard, node, len(shard_rows.ids) + len(failed), round(seconds, 3)))
            yield shard, shard_rows, failed


def _source_probe(job: Job) -> dict[str, str | None]:
    """The source root and one of its files every actor must see: the first listed item's, when it is local."""
    root = str(job.manifest["source_root"])
    local = [item.path for item in job.items[:1] if str(item.path).startswith(root)]
    return {"root": root, "probe": local[0].relative_to(root).as_posix() if local else None}


def _rows_or_clear_error(ray: Any, ds: Any) -> Iterator[dict[str, Any]]:
    """The dataset's rows; an actor that failed with an :class:`MPSCLIPError` (a node that cannot read a path)
    ends the job with that message instead of Ray's traceback."""
    try:
        yield from ds.iter_rows()
    except ray.exceptions.RayError as err:
        message = _mpsclip_message(err)
        if message is None:
            raise
        raise MPSCLIPError(message) from None


def _mpsclip_message(err: BaseException) -> str | None:
    """The message of the :class:`MPSCLIPError` behind a Ray error: Ray keeps an actor's creation error only as
    text (``ActorDiedError``), so it is found in the error's lines."""
    marker = f"{MPSCLIPError.__module__}.{MPSCLIPError.__name__}: "
    for line in str(err).splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return None


def _all_done(store: Path, items: list[Item], retry_failed: bool) -> bool:
    return read_manifest(store) is not None and not pending_items(store, items, retry_failed)


def _decode_without_cluster(store: Path, settings: EmbedSettings) -> str:
    """The decoding a finished store is checked against without asking a cluster: ``--decode auto`` resolves on
    the actors' device, so it accepts the store's own."""
    if settings.decode != "auto":
        return settings.decode
    if settings.device == "cpu":
        return "cpu"
    return str((read_manifest(store) or {}).get("decode", "cpu"))


def embed_archive_ray(
    source: str | Path,
    store: str | Path,
    checkpoint: str | Path,
    arch: str | None = None,
    settings: EmbedSettings | None = None,
    address: str | None = None,
    num_actors: int | None = None,
    gpus_per_actor: float | None = None,
    progress: bool = True,
    prune: bool = False,
    retry_failed: bool = False,
    on_shard: Callable[[ShardRecord], None] | None = None,
) -> EmbedSummary:
    """Embed ``source`` into ``store`` (resuming a partial store) with a Ray Data actor pool.

    Uses the Ray instance this process is already connected to, else ``ray.init(address)``: None starts a
    local instance (shut down at the end), ``"auto"`` joins a running cluster; an address where nothing answers
    fails within :data:`CONNECT_TIMEOUT_S`. ``num_actors`` defaults to one actor per GPU (``gpus_per_actor``,
    default 1 when the cluster has GPUs), else to the CPUs divided by each actor's share (1 +
    ``settings.workers``). A store whose shards are all done is closed without starting Ray; ``prune`` and
    ``retry_failed`` as in :func:`~mpsclip.archive.job.open_job`. ``on_shard`` hears which node embedded each shard
    (:class:`ShardRecord`), in shard order."""
    ray = _import_ray()
    if num_actors is not None and num_actors < 1:
        raise MPSCLIPError(f"--ray-actors must be 1 or more, got {num_actors}")
    settings = settings or EmbedSettings()
    settings.check()
    source, store = Path(source), Path(store)
    items = list_items(source, settings)
    ckpt = resolve_checkpoint(checkpoint)
    grow = {"prune": prune, "retry_failed": retry_failed}
    if _all_done(store, items, retry_failed):
        job = open_job(source, store, ckpt, arch, settings, _decode_without_cluster(store, settings), items, **grow)
        return run_job(job, LocalExecutor(ckpt, arch, settings), progress)  # nothing left to embed
    started = not ray.is_initialized()
    if started:
        _connect(ray, address)
    try:
        actors = _plan_actors(ray, settings, num_actors, gpus_per_actor)
        decode = resolve_decode(actors.settings.decode, torch.device(actors.settings.device))
        job = open_job(source, store, ckpt, arch, settings, decode, items, **grow)
        return run_job(job, RayExecutor(ray, ckpt, arch, actors, on_shard), progress)
    finally:
        if started:
            ray.shutdown()
