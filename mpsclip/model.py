"""MPSCLIP: an open_clip CLIP (frozen) with G²A adapters in both towers and an MPR head."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from mpsclip.adapters import AdapterConfig, attach_adapters
from mpsclip.backbone import create_backbone
from mpsclip.checkpoints import Checkpoint, load_strict, read_checkpoint, save_checkpoint
from mpsclip.distributed import gather_features
from mpsclip.errors import MPSCLIPError
from mpsclip.family import Family
from mpsclip.heads import MPRHead
from mpsclip.losses import LossConfig, mpsclip_loss

FAMILY = "mpsclip"

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
"""Pixels [B, 3, H, W] → L2-normalised global embeddings [B, D] (the eager tower, or an engine's encode_image)."""


@dataclass
class ModelConfig:
    """Everything needed to rebuild an MPSCLIP (saved beside its weights)."""

    arch: str = "ViT-B-32-quickgelu"
    mpr_k: int = 4
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        adapter = AdapterConfig(**data.pop("adapter", {}))
        loss = LossConfig(**data.pop("loss", {}))
        return cls(adapter=adapter, loss=loss, **data)


class MPSCLIP(nn.Module):
    """Frozen open_clip backbone + G²A adapters + MPR head (implements :class:`mpsclip.family.RetrievalModel`).

    ``pretrained`` is passed to ``open_clip.create_model``: ``None`` (random init), ``"openai"`` (downloads
    through open_clip where there is network) or a path to a backbone checkpoint.
    """

    def __init__(
        self,
        arch: str = "ViT-B-32-quickgelu",
        pretrained: str | None = None,
        *,
        config: ModelConfig | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.family = FAMILY
        self.supports_perspectives = True
        self.config = config or ModelConfig(arch=arch)
        self.clip = create_backbone(self.config.arch, pretrained, cache_dir)
        attach_adapters(self.clip.visual.transformer, self.config.adapter)
        attach_adapters(self.clip.transformer, self.config.adapter)
        self.mpr_head = MPRHead(self.embed_dim, self.config.mpr_k)
        self.register_buffer("temp", torch.tensor(self.config.loss.temperature))
        self._tokenizer = open_clip.get_tokenizer(self.config.arch)
        self.freeze_backbone()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(
        cls, path: str | Path, arch: str | None = None, map_location: str = "cpu", trust_checkpoint: bool = False
    ) -> MPSCLIP:
        """Load ours (safetensors + JSON), the authors' ``checkpoint_best.pth``, an open_clip state dict or an
        OpenAI JIT archive (backbone only: adapters then start at identity; it runs code when loaded, so only with
        ``trust_checkpoint``). Another family's file is refused: :func:`mpsclip.load_model` builds whichever family
        a file holds."""
        checkpoint = read_checkpoint(path, map_location, trust_checkpoint)
        if not claims(checkpoint):
            raise MPSCLIPError(
                f"{checkpoint.path}: saved as a {checkpoint.family} model, not MPS-CLIP; use mpsclip.load_model"
            )
        return build(checkpoint, arch)

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json`` (config); returns the weights path."""
        return save_checkpoint(self, self.config_dict(), FAMILY, path)

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def optimize(self, precision: str = "fp16", kernels: bool = True, cuda_graphs: bool = True) -> Any:
        """Inference-only towers (:func:`mpsclip.kernels.optimize`): SDPA attention, compiled towers and CUDA
        graphs; per tower and batch size ``mpsclip.kernels.runtime.ADAPTER_IMPL`` picks the adapter, either
        compiled by Inductor with the backbone or the fused Triton kernel (today: fused only for image batches
        of 256 and more). Falls back to eager PyTorch with a warning without a GPU or Triton."""
        from mpsclip.kernels import optimize

        return optimize(self.clip, precision=precision, kernels=kernels, cuda_graphs=cuda_graphs)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.clip.visual.image_size[0])

    @property
    def logit_scale(self) -> torch.Tensor:
        """The backbone's learned temperature, exponentiated: the scale of image-text logits."""
        return self.clip.logit_scale.exp()

    def adapters(self) -> list[nn.Module]:
        return [b.g2adapter for t in (self.clip.visual.transformer, self.clip.transformer) for b in t.resblocks]

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Train only adapters and MPR (default); ``frozen=False`` also trains the backbone.
        ``logit_scale`` always stays frozen."""
        for name, param in self.named_parameters():
            trainable = ".g2adapter." in name or name.startswith("mpr_head.")
            param.requires_grad = trainable or (not frozen and name != "clip.logit_scale")

    # ----------------------------------------------------------------- towers
    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return self._tokenizer(texts)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global embedding [B, D] and projected patch tokens [B, P, D], both L2-normalised."""
        visual = self.clip.visual
        pooled, tokens = visual._pool(visual.transformer(visual._embeds(images)))
        return F.normalize(pooled @ visual.proj, dim=-1), F.normalize(tokens @ visual.proj, dim=-1)

    def encode_regions(
        self, regions: torch.Tensor, mask: torch.Tensor, encode: ImageEncoder | None = None
    ) -> torch.Tensor:
        """Masked mean of the sub-images' global embeddings, L2-normalised; zeros where an image has none.

        ``regions`` [B, R, 3, H, W], ``mask`` [B, R] bool. Only valid sub-images go through the tower
        (``encode``, default :meth:`encode_image`).
        """
        b, r = mask.shape
        feats = regions.new_zeros(b, r, self.embed_dim)
        if bool(mask.any()):
            feats[mask] = (encode or self.encode_image)(regions[mask]).to(feats.dtype)
        mean = feats.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1).to(feats.dtype)
        return F.normalize(mean, dim=-1)

    # ----------------------------------------------------------------- MPS-CLIP embeddings
    def embed_images(self, images: torch.Tensor, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Retrieval embedding ``normalize(0.5 * (global + regions))``."""
        glob = self.encode_image(images)
        return F.normalize(0.5 * (glob + self.encode_regions(regions, mask)), dim=-1)

    def perspectives_from(self, glob: torch.Tensor, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MPR perspectives [B, k, D] of the regions embedding (global embedding where no sub-image)."""
        has_regions = mask.any(dim=1, keepdim=True)
        return self.mpr_head(torch.where(has_regions, regions, glob))

    def perspectives(self, images: torch.Tensor, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        glob = self.encode_image(images)
        return self.perspectives_from(glob, self.encode_regions(regions, mask), mask)

    def embed_all(
        self, images: torch.Tensor, regions: torch.Tensor, mask: torch.Tensor, encode: ImageEncoder | None = None
    ) -> dict[str, torch.Tensor]:
        """One pass giving ``global``, ``regions``, ``retrieval`` and ``perspectives`` embeddings; ``encode``
        replaces the image tower (default :meth:`encode_image`)."""
        return self.embed_from_global((encode or self.encode_image)(images), regions, mask, encode)

    def embed_from_global(
        self, glob: torch.Tensor, regions: torch.Tensor, mask: torch.Tensor, encode: ImageEncoder | None = None
    ) -> dict[str, torch.Tensor]:
        """:meth:`embed_all` for images whose global embeddings ``glob`` are already computed."""
        reg = self.encode_regions(regions, mask, encode).to(glob.dtype)
        return {
            "global": glob,
            "regions": reg,
            "retrieval": F.normalize(0.5 * (glob + reg), dim=-1),
            "perspectives": self.perspectives_from(glob, reg, mask),
        }

    # ----------------------------------------------------------------- objective
    def forward(
        self,
        images: torch.Tensor,
        regions: torch.Tensor | None,
        mask: torch.Tensor | None,
        tokens: torch.Tensor,
        image_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Same as :meth:`loss` (``forward`` is what DistributedDataParallel wraps)."""
        return self.loss(images, regions, mask, tokens, image_ids)

    def loss(
        self,
        images: torch.Tensor,
        regions: torch.Tensor | None,
        mask: torch.Tensor | None,
        tokens: torch.Tensor,
        image_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"contrastive", "triplet", "total"}``; features are gathered across DDP ranks first."""
        glob = self.encode_image(images)
        text = gather_features(self.encode_text(tokens))
        views = None
        if regions is not None and mask is not None and regions.shape[1] > 0:
            views = gather_features(self.perspectives_from(glob, self.encode_regions(regions, mask), mask))
        ids = gather_features(image_ids.view(-1)) if image_ids is not None else None
        return mpsclip_loss(
            gather_features(glob),
            text,
            views,
            self.logit_scale,
            self.config.loss,
            ids=ids,
            temperature=self.temp.clamp(min=1e-3),
        )


def claims(checkpoint: Checkpoint) -> bool:
    """Ours saved as MPS-CLIP, the authors' release, or (as the fallback family) any foreign open_clip backbone."""
    if checkpoint.family is not None:
        return checkpoint.family == FAMILY
    return True


def build(checkpoint: Checkpoint, arch: str | None = None) -> MPSCLIP:
    """An MPSCLIP filled strictly from ``checkpoint`` (backbone-only files leave adapters at identity)."""
    if checkpoint.kind == "ours":
        try:
            config = ModelConfig.from_dict(checkpoint.config)
        except (KeyError, TypeError) as err:
            raise MPSCLIPError(f"{checkpoint.path.with_suffix('.json')}: not an mpsclip config ({err})") from err
        checkpoint.check_arch(config.arch, arch)
    else:
        config = ModelConfig(arch=arch or ModelConfig.arch)
    model = MPSCLIP(config=config)
    if checkpoint.kind == "backbone":
        state = {f"clip.{k}": v for k, v in checkpoint.state.items()}
        load_strict(model, state, checkpoint.path, require_adapters=False, arch=config.arch)
    else:
        load_strict(model, checkpoint.state, checkpoint.path, require_adapters=True, arch=config.arch)
    return model


def create(arch: str, pretrained: str | None = None, **options: Any) -> MPSCLIP:
    return MPSCLIP(arch, pretrained, **options)


FAMILY_ENTRY = Family(FAMILY, create=create, claims=claims, build=build, fallback=True)
"""MPS-CLIP in the family registry (:mod:`mpsclip.factory`): the fallback for any foreign open_clip backbone."""
