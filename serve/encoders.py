"""How the API turns a text or image query into an embedding: a :class:`QueryEncoder`, of which there are two.

* :class:`InProcessEncoder` (``mpsclip serve --no-triton``): the towers run in the API's process behind our bounded
  batcher (:class:`~mpsclip.serve.batching.Batcher`: one consumer, deadline-closed batches, model in a thread).
* :class:`TritonEncoder` (``--triton``): each query is one gRPC request to the towers on the Triton Inference
  Server (:mod:`mpsclip.serve.triton`), whose dynamic batcher merges concurrent requests.

A batch of queries (:meth:`QueryEncoder.encode_many`, ``POST /search/batch``) is one batcher request in process
(one tower call per checkpoint and kind) and concurrent gRPC requests to Triton, which its batcher merges.

Both raise :class:`~mpsclip.serve.batching.Overloaded` when ``max_queue`` queries already wait (the API answers 503
with Retry-After), and an HTTP 503 naming the cause when the towers cannot answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Literal, Protocol

import numpy as np
import torch
from fastapi import HTTPException
from mpsclip.serve import metrics
from mpsclip.serve.batching import Batcher, Overloaded
from mpsclip.serve.catalog import Catalog, Store
from mpsclip.serve.towers import Tower, TowerSet
from PIL import Image

from mpsclip.errors import MPSCLIPError

PROBE_TEXT = "a test query sent at start-up"
NORM_TOLERANCE = 1e-2
VERSIONED = ("numpy", "torch", "nvidia-pytriton", "tritonclient")
Kind = Literal["text", "image"]
Query = str | Image.Image
Job = tuple[Tower, Kind, Query]
LOG = logging.getLogger(__name__)


class QueryEncoder(Protocol):
    """What :func:`mpsclip.serve.app.create_app` needs from an encoder (started and stopped by the app's lifespan)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def depth(self) -> int:
        """Queries waiting for the towers."""
        ...

    async def encode(self, store: Store, kind: Kind, query: Query) -> torch.Tensor:
        """The L2-normalised embedding ``[D]`` (float32, CPU) of one query with ``store``'s checkpoint."""
        ...

    async def encode_many(self, queries: Sequence[tuple[Store, Kind, Query]]) -> list[torch.Tensor]:
        """:meth:`encode` of each ``(store, kind, query)``, handed to the towers together (``POST /search/batch``)."""
        ...


def tower_for(towers: TowerSet, store: Store) -> Tower:
    """``store``'s tower, or a 503 naming why there is none."""
    try:
        return towers.get(store)
    except MPSCLIPError as err:
        raise HTTPException(503, str(err)) from err


class InProcessEncoder:
    """The towers in this process behind :class:`Batcher` (``batching=False``: one query per tower call)."""

    def __init__(
        self,
        towers: TowerSet | None = None,
        *,
        batching: bool = True,
        max_batch: int = 32,
        max_queue: int = 256,
        max_wait_s: float = 0.004,
    ) -> None:
        self.towers = towers or TowerSet()  # default: each store's model, eager
        self.batcher = Batcher(self.encode_batch, max_batch if batching else 1, max_wait_s, max_queue)

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    @property
    def depth(self) -> int:
        return self.batcher.depth

    async def encode(self, store: Store, kind: Kind, query: Query) -> torch.Tensor:
        return (await self.encode_many([(store, kind, query)]))[0]

    async def encode_many(self, queries: Sequence[tuple[Store, Kind, Query]]) -> list[torch.Tensor]:
        """The queries as one request to the batcher: they reach the towers in the same batch."""
        jobs = [(tower_for(self.towers, store), kind, query) for store, kind, query in queries]
        return await self.batcher.submit(jobs)

    @staticmethod
    def encode_batch(requests: list[list[Job]]) -> list[list[torch.Tensor]]:
        """Each request's embeddings, with one tower call per (checkpoint, kind) among all their jobs (run in the
        batcher's worker thread)."""
        jobs = [job for request in requests for job in request]
        metrics.BATCH.observe(len(jobs))
        out = [torch.empty(0)] * len(jobs)
        groups: dict[tuple[str, Kind], list[int]] = {}
        for i, (tower, kind, _) in enumerate(jobs):
            groups.setdefault((tower.key, kind), []).append(i)
        for (_, kind), positions in groups.items():
            tower = jobs[positions[0]][0]
            queries = [jobs[i][2] for i in positions]
            if kind == "text":
                emb = tower.encode_text(tower.tokens(queries))  # type: ignore[arg-type]
            else:
                emb = tower.encode_image(tower.pixels(queries))  # type: ignore[arg-type]
            for row, i in enumerate(positions):
                out[i] = emb[row]
        answers = iter(out)
        return [[next(answers) for _ in request] for request in requests]


class TritonEncoder:
    """Queries as single-row gRPC requests to the Triton towers at ``url`` (``127.0.0.1:PORT``).

    Tokenising and image preprocessing happen here, as any Triton client does them; ``model_names`` maps a
    checkpoint sha256 to its ``(text model, image model)`` names on the server."""

    def __init__(
        self, towers: TowerSet, url: str, model_names: dict[str, tuple[str, str]], *, max_queue: int = 256
    ) -> None:
        self.towers, self.url, self.model_names, self.max_queue = towers, url, model_names, max_queue
        self.in_flight = 0
        self._client: object | None = None

    async def start(self) -> None:
        from tritonclient.grpc.aio import InferenceServerClient

        self._client = InferenceServerClient(self.url)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()  # type: ignore[attr-defined]
            self._client = None

    @property
    def depth(self) -> int:
        return self.in_flight

    async def encode(self, store: Store, kind: Kind, query: Query) -> torch.Tensor:
        from tritonclient.grpc import InferInput
        from tritonclient.utils import InferenceServerException

        tower = tower_for(self.towers, store)
        if self._client is None:
            raise HTTPException(503, "the Triton encoder is not started (the app's lifespan starts it)")
        if self.in_flight >= self.max_queue:
            raise Overloaded
        text_model, image_model = self.model_names[tower.key]
        if kind == "text":
            model, name, array = text_model, "tokens", tower.tokens([query]).numpy()  # type: ignore[list-item]
        else:  # resizing takes milliseconds: off the event loop
            pixels = await asyncio.to_thread(tower.pixels, [query])  # type: ignore[list-item]
            model, name, array = image_model, "pixels", pixels.numpy()
        request = InferInput(name, list(array.shape), "INT64" if kind == "text" else "FP32")
        request.set_data_from_numpy(array)
        self.in_flight += 1
        try:
            result = await self._client.infer(model, [request])  # type: ignore[attr-defined]
        except InferenceServerException as err:
            LOG.warning("Triton model %s failed: %s", model, err)
            metrics.ERRORS.labels("triton").inc()
            raise HTTPException(503, f"the Triton towers did not answer ({model}: {err.message()})") from err
        finally:
            self.in_flight -= 1
        return torch.from_numpy(np.array(result.as_numpy("embedding")[0], dtype=np.float32))

    async def encode_many(self, queries: Sequence[tuple[Store, Kind, Query]]) -> list[torch.Tensor]:
        """The queries as concurrent requests, which Triton's dynamic batcher merges (one model call when they fit
        in its ``max_batch_size``)."""
        if self.in_flight + len(queries) > self.max_queue:
            raise Overloaded
        return list(await asyncio.gather(*(self.encode(store, kind, query) for store, kind, query in queries)))


def versions(names: tuple[str, ...] = VERSIONED) -> str:
    """``numpy 1.26.4, torch 2.11.0, ...``: the installed versions of ``names`` (those missing left out)."""
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


async def probe(catalog: Catalog, encoder: QueryEncoder) -> str | None:
    """Send :data:`PROBE_TEXT` through ``encoder`` once per checkpoint of the stores that have a model; None when
    every answer is a finite unit vector of the store's dimension, else why not (the installed versions named)."""
    tried: set[object] = set()
    for store in catalog.stores.values():
        key = store.info.manifest.get("checkpoint_sha256")
        if store.model is None or key in tried:
            continue
        tried.add(key)
        start = time.perf_counter()
        try:
            vec = await encoder.encode(store, "text", PROBE_TEXT)
            problem = answer_problem(vec, store.info.dim)
        except Exception as err:  # noqa: BLE001 - whatever broke, the server must not say it is ready
            detail = err.detail if isinstance(err, HTTPException) else err
            problem = f"{type(err).__name__}: {detail}"
        if problem is not None:
            reason = (f"the towers did not answer a test query for store {store.name!r} right ({problem}); "
                      f"installed: {versions()}")
            LOG.error("%s", reason)
            return reason
        LOG.info("store %s: the towers answered a test query in %.0f ms", store.name,
                 1000 * (time.perf_counter() - start))
    return None


def answer_problem(vec: torch.Tensor, dim: int) -> str | None:
    """What is wrong with an embedding the towers gave back for one query (None: a finite unit vector of ``dim``)."""
    if tuple(vec.shape) != (dim,):
        return f"an embedding of shape {tuple(vec.shape)}, expected ({dim},)"
    if not torch.isfinite(vec).all():
        return "an embedding with NaN or infinite values"
    norm = float(vec.norm())
    if abs(norm - 1) > NORM_TOLERANCE:
        return f"an embedding of norm {norm:.4g}, expected 1"
    return None
