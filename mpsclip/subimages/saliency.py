"""``clip-saliency`` backend: keyword masks from the model's own patch tokens, with no extra weights.

For an image and a noun:

1. similarity map: cosine between each projected patch token (:meth:`MPSCLIP.encode_image_tokens`) and the
   noun's text embedding (``encode_text(tokenize(template.format(noun=noun)))``) on the patch grid;
2. standardise the map over the image's own patches (z = (s - mean) / std), so the threshold is relative;
3. upsample bilinearly to the image size and keep pixels with z > ``k`` (``--saliency-k``, default 1.0: for a
   bell-shaped map about the top 16 % of the image; raise it for smaller regions);
4. clean: a morphological opening (removes specks smaller than the kernel) then a closing (fills small holes),
   with a square kernel of ``clean_kernel`` pixels (default: about 1/32 of the shorter image side, odd; 0 turns
   cleaning off), built from max-pooling;
5. a mask covering less than ``min_area`` (fraction of the image, default 0.001) is made empty.

Several images and all their nouns go through the model per batch; text embeddings are computed once per noun.
The quality depends on how well the model's patch tokens align with text: expect coarse blobs, not outlines.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mpsclip.choices import PROMPT_TEMPLATE, SALIENCY_K
from mpsclip.data.transforms import eval_transform
from mpsclip.model import MPSCLIP
from mpsclip.subimages.writer import Request

DEFAULT_TEMPLATE = PROMPT_TEMPLATE
DEFAULT_K = SALIENCY_K
DEFAULT_MIN_AREA = 0.001


def default_kernel(height: int, width: int) -> int:
    """An odd kernel of about 1/32 of the shorter side, at least 3."""
    side = max(3, round(min(height, width) / 32))
    return side if side % 2 == 1 else side + 1


def dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Binary dilation of float masks [N, 1, H, W] with a square kernel (odd size)."""
    return F.max_pool2d(mask, kernel, stride=1, padding=kernel // 2)


def erode(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    return 1.0 - dilate(1.0 - mask, kernel)


def clean(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Opening (drop specks) then closing (fill holes); ``kernel`` < 2 leaves the masks as they are."""
    if kernel < 2:
        return mask
    opened = dilate(erode(mask, kernel), kernel)
    return erode(dilate(opened, kernel), kernel)


def saliency_masks(
    similarity: torch.Tensor,
    size: tuple[int, int],
    k: float = DEFAULT_K,
    kernel: int | None = None,
    min_area: float = DEFAULT_MIN_AREA,
) -> torch.Tensor:
    """Bool masks [N, H, W] from similarity maps [N, g, g] on the patch grid (see the module docstring)."""
    maps = similarity.float().unsqueeze(1)
    flat = maps.flatten(1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1).clamp(min=1e-6).view(-1, 1, 1, 1)
    z = F.interpolate((maps - mean) / std, size=size, mode="bilinear", align_corners=False)
    mask = clean((z > k).float(), default_kernel(*size) if kernel is None else kernel)
    big_enough = (mask.flatten(1).mean(dim=1) >= min_area).view(-1, 1, 1, 1)
    return (mask * big_enough)[:, 0] > 0.5


def grid_side(patches: int) -> int:
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patch tokens do not form a square grid")
    return side


class SaliencyBackend:
    """Masks from patch-token/text similarity of an :class:`MPSCLIP` (see the module docstring)."""

    def __init__(
        self,
        model: MPSCLIP,
        device: str | torch.device = "cpu",
        template: str = DEFAULT_TEMPLATE,
        k: float = DEFAULT_K,
        kernel: int | None = None,
        min_area: float = DEFAULT_MIN_AREA,
        batch_size: int = 16,
    ) -> None:
        if "{noun}" not in template:
            raise ValueError(f"prompt template {template!r} has no {{noun}} placeholder")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.transform = eval_transform(model.image_size)
        self.template = template
        self.k = k
        self.kernel = kernel
        self.min_area = min_area
        self.batch_size = batch_size
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embeddings(self, nouns: list[str]) -> torch.Tensor:
        """[N, D] text embeddings of the prompted nouns; each noun is encoded once per backend."""
        new = [noun for noun in dict.fromkeys(nouns) if noun not in self._text]
        if new:
            prompts = [self.template.format(noun=noun) for noun in new]
            embeddings = self.model.encode_text(self.model.tokenize(prompts).to(self.device))
            self._text.update(zip(new, embeddings, strict=True))
        return torch.stack([self._text[noun] for noun in nouns])

    @torch.no_grad()
    def segment(self, batch: list[Request]) -> list[dict[str, np.ndarray]]:
        self.text_embeddings([noun for request in batch for noun in request.nouns])
        images = torch.stack([self.transform(Image.fromarray(request.rgb)) for request in batch])
        _, patches = self.model.encode_image_tokens(images.to(self.device))
        side = grid_side(patches.shape[1])
        results = []
        for request, tokens in zip(batch, patches, strict=True):
            text = self.text_embeddings(list(request.nouns))
            similarity = (text @ tokens.T).view(len(request.nouns), side, side)
            height, width = request.rgb.shape[:2]
            masks = saliency_masks(similarity, (height, width), self.k, self.kernel, self.min_area).cpu().numpy()
            results.append(dict(zip(request.nouns, masks, strict=True)))
        return results
