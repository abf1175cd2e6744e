"""What every engine shares: the :class:`Engine` protocol and the checks on what it is fed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from mpsclip.engines.manifest import ExportedTowers
from mpsclip.errors import MPSCLIPError

TOWERS = frozenset({"image", "text"})
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
"""The dtype each precision computes in around the engine; int8 towers (``mpsclip export --precision int8``) take
and give float32, and what surrounds them runs float32."""


@runtime_checkable
class Engine(Protocol):
    """Something that turns CLIP-normalised pixels ``[B, 3, H, W]`` or tokens ``[B, 77]`` into embeddings.

    ``encode_*`` take tensors on :attr:`device` (others are moved there) and return float32 ``[B, D]``
    L2-normalised rows on :attr:`device`; they run in the engine's own :attr:`precision` whatever
    ``torch.autocast`` context surrounds the call. ``batch_sizes`` is ``None`` (any) or ``(min, max)``."""

    kind: str
    name: str
    device: torch.device
    dtype: torch.dtype
    precision: str
    batch_sizes: tuple[int, int] | None
    towers: frozenset[str]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


def precision_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISION_DTYPES:
        raise MPSCLIPError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[precision]


def check_input(engine: Engine, tower: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the engine's device, after checking the engine has ``tower`` and accepts the batch size."""
    if tower not in engine.towers:
        raise MPSCLIPError(
            f"{engine.name}: has no {tower} tower (it has {', '.join(sorted(engine.towers)) or 'none'}); "
            f"export it with --towers {tower}"
        )
    if engine.batch_sizes is not None:
        low, high = engine.batch_sizes
        if not low <= x.shape[0] <= high:
            raise MPSCLIPError(
                f"{engine.name}: batch of {x.shape[0]} is outside the exported range [{low}, {high}]; "
                f"split the batch, or export again with --min-batch/--max-batch covering it"
            )
    return x.to(engine.device, non_blocking=True)


def no_autocast(device: torch.device) -> torch.autocast:
    """A context that switches off any surrounding ``torch.autocast`` for ``device``'s type."""
    return torch.autocast(device.type, enabled=False)


TowerFn = Callable[[torch.Tensor], torch.Tensor]
"""One loaded tower artefact: pixels or tokens in, embeddings out (not :class:`mpsclip.serve.towers.Tower`, a
checkpoint's query towers)."""


class ExportedEngine:
    """An ``mpsclip export`` folder run by one runtime. A subclass names its :attr:`kind`, says why it cannot
    run (:meth:`availability`) and loads one tower file into a callable (:meth:`load_tower`); the checks and
    the two ``encode_*`` calls are the same for every runtime."""

    kind: str

    def __init__(self, export: ExportedTowers, device: torch.device) -> None:
        reason = self.availability(device)
        if reason is not None:
            raise MPSCLIPError(f"{self.kind} engine on {device}: {reason}")
        self.check_export(export, device)
        self.device = device
        self.precision = export.precision
        self.dtype = precision_dtype(export.precision)
        self.batch_sizes = export.batch_sizes
        self.towers = frozenset(export.files)
        self.name = f"{self.kind} {export.folder.name} ({self.precision}, {device})"
        self.runners = {tower: self.load_tower(path) for tower, path in export.files.items()}

    @staticmethod
    def availability(device: torch.device) -> str | None:
        raise NotImplementedError

    def check_export(self, export: ExportedTowers, device: torch.device) -> None:
        """Raise when ``export`` cannot run on ``device`` (beyond :meth:`availability`)."""

    def load_tower(self, path: Path) -> TowerFn:
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.runners["image"](check_input(self, "image", pixels).float())

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.runners["text"](check_input(self, "text", tokens).long())
