"""Zero-shot perspectives inside the embedding pass (``mpsclip embed --perspectives zero-shot``).

For a batch of preprocessed images on the embedding device, one pass of the image tower gives the global
embeddings and the projected patch tokens. Then, without writing any file:

1. keywords: each image is scored against the noun vocabulary with the model's text tower (as
   :class:`mpsclip.keywords.zero_shot.ZeroShotKeywords`: softmax at the model's logit scale, the ``top_k`` nouns
   whose probability is at least ``threshold``);
2. masks: ``clip-saliency`` (:func:`mpsclip.subimages.saliency.saliency_masks`) from the similarity of the
   patch tokens with each keyword's text embedding, at the model's input resolution;
3. sub-images: the image with black outside the mask (black in CLIP-normalised units), as the authors'
   ``<noun>_blackbg.png`` files are, but cut from the resized image rather than the original file.

A keyword whose mask is empty gives no sub-image; an image with none keeps only its global perspective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import torch

from mpsclip.data.transforms import CLIP_MEAN, CLIP_STD
from mpsclip.errors import MPSCLIPError
from mpsclip.family import RetrievalModel
from mpsclip.keywords.zero_shot import DEFAULT_TEMPLATE, ZeroShotKeywords, load_rs_vocabulary
from mpsclip.subimages.saliency import DEFAULT_K, DEFAULT_MIN_AREA, grid_side, saliency_masks


@dataclass(frozen=True)
class ZeroShotSettings:
    """Keyword and mask settings (recorded in the store's manifest)."""

    vocabulary: Path | None = None  # None: the packaged remote-sensing vocabulary
    top_k: int = 3
    threshold: float = 0.02
    saliency_k: float = DEFAULT_K
    min_area: float = DEFAULT_MIN_AREA
    template: str = DEFAULT_TEMPLATE

    def check(self) -> None:
        if self.top_k < 1:
            raise MPSCLIPError(f"--keywords-top-k must be 1 or more, got {self.top_k}")
        if "{noun}" not in self.template:
            raise MPSCLIPError(f"prompt template {self.template!r} has no {{noun}} placeholder")


class PatchTokenModel(RetrievalModel, Protocol):
    """A :class:`~mpsclip.family.RetrievalModel` whose ``supports_perspectives`` is True: its image tower also
    gives the projected patch tokens the saliency masks are cut from."""

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global embedding [B, D] and projected patch tokens [B, P, D], both L2-normalised."""
        ...


@dataclass
class ZeroShotBatch:
    """Global embeddings [B, D], sub-images [B, R, 3, H, W] with their mask [B, R], and each image's nouns."""

    glob: torch.Tensor
    regions: torch.Tensor
    mask: torch.Tensor
    keywords: list[list[str]]


class ZeroShotPerspectives:
    """Keywords, masks and sub-images for batches of preprocessed images (see the module docstring)."""

    def __init__(self, model: RetrievalModel, settings: ZeroShotSettings, device: torch.device) -> None:
        if not model.supports_perspectives:
            raise MPSCLIPError(
                f"--perspectives zero-shot needs an MPS-CLIP model (patch tokens); {type(model).__name__} has none; "
                "use --perspectives none or an MPS-CLIP checkpoint"
            )
        settings.check()
        self.model = cast(PatchTokenModel, model)  # supports_perspectives: the family has encode_image_tokens
        self.settings = settings
        self.scorer = ZeroShotKeywords(model, load_rs_vocabulary(settings.vocabulary), settings.template, device)
        self.noun_index = {noun: i for i, noun in enumerate(self.scorer.vocabulary)}
        mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1)
        std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
        self.black = -mean / std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> ZeroShotBatch:
        glob, tokens = self.model.encode_image_tokens(images)
        probabilities = (self.scorer.scale * glob.float() @ self.scorer.text.float().T).softmax(dim=-1)
        nouns = self.scorer.keywords(probabilities.cpu(), self.settings.top_k, self.settings.threshold)
        b, _, height, width = images.shape
        regions = images.new_zeros(b, self.settings.top_k, 3, height, width)
        mask = torch.zeros(b, self.settings.top_k, dtype=torch.bool, device=images.device)
        pairs = [(i, noun) for i, image_nouns in enumerate(nouns) for noun in image_nouns]
        kept: list[list[str]] = [[] for _ in range(b)]
        if not pairs:
            return ZeroShotBatch(glob, regions, mask, kept)
        # every (image, noun) pair of the batch in one similarity map and one mask computation
        image_rows = torch.tensor([i for i, _ in pairs], device=images.device)
        noun_rows = torch.tensor([self.noun_index[noun] for _, noun in pairs], device=images.device)
        text = self.scorer.text[noun_rows].to(tokens.dtype)
        side = grid_side(tokens.shape[1])
        similarity = torch.einsum("nd,npd->np", text, tokens[image_rows]).view(len(pairs), side, side)
        masks = saliency_masks(similarity, (height, width), self.settings.saliency_k, None, self.settings.min_area)
        nonempty = masks.flatten(1).any(dim=1).tolist()
        slots = []
        for (i, noun), ok in zip(pairs, nonempty, strict=True):
            if ok:
                slots.append(len(kept[i]))
                kept[i].append(noun)
        chosen = torch.tensor(nonempty, device=images.device)
        image_rows, masks = image_rows[chosen], masks[chosen]
        slot_rows = torch.tensor(slots, dtype=torch.long, device=images.device)
        black = self.black.to(images.dtype)
        regions[image_rows, slot_rows] = torch.where(masks[:, None], images[image_rows], black)
        mask[image_rows, slot_rows] = True
        return ZeroShotBatch(glob, regions, mask, kept)
