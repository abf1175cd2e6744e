"""Batch :class:`~mpsclip.data.datasets.Sample` items, padding sub-images to the batch maximum.

Use with a DataLoader as ``collate_fn=collate`` or ``functools.partial(collate, max_regions=4)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mpsclip.data.datasets import Sample


@dataclass
class Batch:
    """``images [B,3,H,W]``, ``regions [B,R,3,H,W]`` (zero padded), ``mask [B,R]`` (True = real region).

    ``captions`` is None for evaluation batches (items without captions).
    """

    images: torch.Tensor
    regions: torch.Tensor
    mask: torch.Tensor
    captions: list[str] | None
    image_ids: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            regions=self.regions.to(device, non_blocking=non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
            captions=self.captions,
            image_ids=self.image_ids.to(device, non_blocking=non_blocking),
        )


def collate(batch: Sequence[Sample], max_regions: int | None = None) -> Batch:
    """Stack images; keep at most ``max_regions`` sub-images per item and pad to the batch maximum ``R``."""
    if not batch:
        raise ValueError("collate() needs at least one sample")
    images = torch.stack([s.image for s in batch])
    kept = [s.regions[:max_regions] for s in batch]
    num_regions = max(len(r) for r in kept)
    regions = images.new_zeros((len(batch), num_regions, *images.shape[1:]))
    mask = torch.zeros((len(batch), num_regions), dtype=torch.bool)
    for i, r in enumerate(kept):
        regions[i, : len(r)] = r
        mask[i, : len(r)] = True
    captions = [s.caption for s in batch if s.caption is not None]
    if captions and len(captions) != len(batch):
        raise ValueError("collate() got a mix of samples with and without captions")
    return Batch(
        images=images,
        regions=regions,
        mask=mask,
        captions=captions or None,
        image_ids=torch.tensor([s.image_id for s in batch], dtype=torch.long),
    )
