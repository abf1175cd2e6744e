"""The query towers of the served stores, one per checkpoint, each behind the engine seam (:mod:`mpsclip.engines`).

A :class:`Tower` pairs a store's model (tokenizer, preprocessing, MPR head) with the :class:`~mpsclip.engines.Engine`
that runs its towers (``--engine torch|onnxruntime|tensorrt|aoti``). Both the in-process encoder and the Triton
models call these methods, so the two serving paths give the same embeddings.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from mpsclip.serve.catalog import Catalog, Store
from PIL import Image

from mpsclip.choices import SERVE_ENGINES
from mpsclip.data.transforms import eval_transform
from mpsclip.engines import Engine, load_engine, runtime_engine
from mpsclip.engines.precision import precision_note
from mpsclip.errors import MPSCLIPError
from mpsclip.family import RetrievalModel


@dataclass
class Tower:
    """One checkpoint's query towers: ``key`` is its sha256, as the stores' manifests record it."""

    key: str
    model: RetrievalModel
    engine: Engine

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def has_perspectives(self) -> bool:
        return bool(self.model.supports_perspectives)

    @property
    def context_length(self) -> int:
        return int(self.tokens(["x"]).shape[1])

    def tokens(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]`` (int64, CPU)."""
        return self.model.tokenize(texts).to(torch.int64).cpu()

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """CLIP-normalised pixels ``[N, 3, S, S]`` (float32, CPU)."""
        transform = eval_transform(self.image_size)
        return torch.stack([transform(image) for image in images])

    def _chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x`` in pieces the engine accepts (an exported engine has a largest batch)."""
        high = self.engine.batch_sizes[1] if self.engine.batch_sizes is not None else len(x)
        return x.split(max(high, 1))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, D]`` (float32, CPU)."""
        return torch.cat([self.engine.encode_text(part).float().cpu() for part in self._chunks(tokens)])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised global image embeddings ``[N, D]`` (float32, CPU)."""
        return torch.cat([self.engine.encode_image(part).float().cpu() for part in self._chunks(pixels)])

    @torch.inference_mode()
    def perspectives(self, glob: torch.Tensor) -> torch.Tensor:
        """MPR perspectives ``[N, k, D]`` of images given without sub-images, as ``mpsclip embed`` stores them for
        items that have none (the MPR head applied to the global embedding)."""
        if not self.has_perspectives:
            raise MPSCLIPError(f"checkpoint {self.key[:12]}: a {self.model.family} model has no MPR perspectives")
        device = next(self.model.parameters()).device  # type: ignore[attr-defined]
        glob = glob.to(device)
        no_regions = torch.zeros(glob.shape[0], 1, dtype=torch.bool, device=device)
        return self.model.perspectives_from(glob, glob, no_regions).float().cpu()  # type: ignore[attr-defined]


def load_tower(
    model: RetrievalModel,
    key: str,
    engine: str,
    engine_dir: Path | None,
    device: torch.device,
    precision: str | None = None,
) -> Tower:
    """``model``'s towers on the engine ``--engine`` names (an export folder from ``--engine-dir`` for the exported
    kinds, refused when it was exported from another checkpoint than ``key``), in ``precision`` (``--precision``;
    None: the engine's own)."""
    if engine not in SERVE_ENGINES:
        raise MPSCLIPError(f"--engine must be one of {', '.join(SERVE_ENGINES)}, got {engine!r}")
    if engine == "aoti":
        if engine_dir is None:
            raise MPSCLIPError("--engine aoti needs --engine-dir DIR, a folder written by mpsclip export --format aoti")
        runner = load_engine("aoti", engine_dir, device, precision=precision, checkpoint_sha256=key)
    else:
        runner = runtime_engine(engine, model, device, engine_dir, key, precision)
    return Tower(key, model, runner)


class TowerSet:
    """The towers by checkpoint sha256, built on first use with the engine ``--engine`` / ``--engine-dir`` name.

    ``frozen`` (the Triton path: its models are bound at start) refuses checkpoints not seen by :meth:`add`."""

    def __init__(self, engine: str = "torch", engine_dir: Path | None = None, device: torch.device | None = None,
                 precision: str | None = None):
        self.engine, self.engine_dir, self.device, self.precision = engine, engine_dir, device, precision
        self.towers: dict[str, Tower] = {}
        self.noted: set[str] = set()
        self.frozen = False

    def add(self, catalog: Catalog) -> TowerSet:
        """Build the towers of every store of ``catalog`` that has a model."""
        for store in catalog.stores.values():
            if store.model is not None:
                self.get(store)
        return self

    def get(self, store: Store) -> Tower:
        key = checkpoint_of(store)
        if key not in self.towers:
            if self.frozen:
                raise MPSCLIPError(
                    f"store {store.name!r}: its checkpoint {key[:12]} has no towers on the running Triton server "
                    "(it changed after the start); restart 'mpsclip serve'"
                )
            if store.model is None:
                raise MPSCLIPError(f"store {store.name!r}: loaded without its model, so it has no query towers")
            device = self.device or next(store.model.parameters()).device
            self.towers[key] = load_tower(store.model, key, self.engine, self.engine_dir, device, self.precision)
        if store.name not in self.noted:
            self.noted.add(store.name)
            note = precision_note(store.info.manifest.get("engine_precision"), self.towers[key].engine.precision)
            if note is not None:
                print(f"store {store.name!r}: {note}", file=sys.stderr)
        return self.towers[key]


def checkpoint_of(store: Store) -> str:
    return str(store.info.manifest["checkpoint_sha256"])
