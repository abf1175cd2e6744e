"""What every model family offers the rest of the package (embedding, search, export, serving).

Both :class:`mpsclip.model.MPSCLIP` and :class:`mpsclip.priorclip.PriorCLIP` implement :class:`RetrievalModel`;
code past the model stage takes this protocol instead of probing attributes. Each family module also defines
its :class:`Family` entry (``FAMILY_ENTRY``), which :mod:`mpsclip.factory` registers: the factory imports the
families, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from mpsclip.checkpoints import Checkpoint


@runtime_checkable
class RetrievalModel(Protocol):
    """A two-tower retrieval model. Embeddings are L2-normalised float tensors ``[B, embed_dim]``."""

    family: str
    supports_perspectives: bool
    """True when the family has MPR perspectives and patch tokens (zero-shot sub-images, max-response)."""

    @property
    def embed_dim(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    @property
    def logit_scale(self) -> torch.Tensor:
        """The scale of image-text logits (the exponentiated learned temperature)."""
        ...

    def tokenize(self, texts: str | list[str]) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def perspectives(self, images: torch.Tensor, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def embed_all(
        self,
        images: torch.Tensor,
        regions: torch.Tensor,
        mask: torch.Tensor,
        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every retrieval mode's image embeddings (``global``, ``regions``, ``retrieval``, ``perspectives``);
        ``encode`` replaces the image tower (an engine's ``encode_image``). Families without sub-image branches
        score every mode with the global embedding."""
        ...

    def optimize(self, precision: str = "fp16") -> Any: ...

    def config_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Family:
    """One model family's entry in the registry of :mod:`mpsclip.factory`."""

    name: str
    create: Callable[..., RetrievalModel]
    """``create(arch, pretrained=None, **options)``: a fresh model."""
    claims: Callable[[Checkpoint], bool]
    build: Callable[..., RetrievalModel]
    """``build(checkpoint, arch=None, **options)``: a model filled strictly from a checkpoint it claims."""
    fallback: bool = False
    """Claims any foreign backbone (MPS-CLIP on an open_clip state dict): asked after the specific families."""
