"""Oracle backend: the exact per-noun masks shipped with a synthetic set (``<synth>/masks/<stem>/<noun>.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mpsclip.errors import MPSCLIPError
from mpsclip.subimages.writer import Request, read_mask


class OracleBackend:
    """Reads ``<mask_root>/<image stem>/<noun>.png`` (0/255) for every requested noun."""

    batch_size = 1

    def __init__(self, mask_root: str | Path) -> None:
        self.mask_root = Path(mask_root)
        if not self.mask_root.is_dir():
            raise MPSCLIPError(f"{self.mask_root}: no such mask folder; pass --mask-root <synth>/masks")

    def segment(self, batch: list[Request]) -> list[dict[str, np.ndarray]]:
        """Masks of the nouns that have an oracle mask; a noun without one is left out (the writer reports it)."""
        results = []
        for request in batch:
            folder = self.mask_root / request.item.stem
            found = [noun for noun in request.nouns if (folder / f"{noun}.png").is_file()]
            results.append({noun: self._mask(request, folder / f"{noun}.png") for noun in found})
        return results

    def _mask(self, request: Request, path: Path) -> np.ndarray:
        mask = read_mask(path)
        if mask.shape != request.rgb.shape[:2]:
            raise MPSCLIPError(f"{path}: mask is {mask.shape} but the image is {request.rgb.shape[:2]}")
        return mask
