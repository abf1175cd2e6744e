"""The per-shard embedding pipeline: items → pixels (and sub-images) → towers → one shard's fp16 rows.

:class:`Embedder` holds the model on its device and turns a list of items into :class:`ShardRows` plus the
items that could not be read. The single-process loop (:mod:`mpsclip.archive.embed`) and the Ray Data
variant both call it, so a shard's content does not depend on which of them ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mpsclip.archive.sources import READ_ERRORS, Item, TileSettings, is_image_file, open_item, open_rgb
from mpsclip.archive.store import ShardRows
from mpsclip.data.collate import collate
from mpsclip.data.datasets import Sample
from mpsclip.data.transforms import eval_transform
from mpsclip.errors import MPSCLIPError

PERSPECTIVES = ("none", "from-dir")


@dataclass(frozen=True)
class EmbedSettings:
    perspectives: str = "none"
    sub_root: Path | None = None
    max_sub_images: int | None = None
    batch_size: int = 64
    shard_size: int = 1024
    workers: int = 0
    device: str = "auto"
    tiles: TileSettings | None = None

    def check(self) -> None:
        """Raise :class:`MPSCLIPError` for inconsistent settings (named as the CLI flags)."""
        if self.perspectives not in PERSPECTIVES:
            raise MPSCLIPError(f"perspectives must be one of {', '.join(PERSPECTIVES)}, got {self.perspectives!r}")
        if self.perspectives == "from-dir" and (self.sub_root is None or not self.sub_root.is_dir()):
            raise MPSCLIPError(f"--perspectives from-dir needs --sub-root to be a folder, got {self.sub_root}")
        if self.perspectives != "from-dir" and self.sub_root is not None:
            raise MPSCLIPError("--sub-root is only used with --perspectives from-dir; add it or drop --sub-root")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise MPSCLIPError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(self, name)}")


@dataclass(frozen=True)
class _Loaded:
    index: int
    sample: Sample | None
    error: str | None


class _ItemDataset(Dataset[_Loaded]):
    """Reads one item (and its sub-images with ``from-dir``); a read error is returned, not raised."""

    def __init__(self, items: list[Item], size: int, sub_root: Path | None, max_sub_images: int | None) -> None:
        self.items = items
        self.transform = eval_transform(size)
        self.sub_root = sub_root
        self.max_sub_images = max_sub_images

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Loaded:
        item = self.items[index]
        try:
            image = self.transform(open_item(item))
        except READ_ERRORS as err:
            return _Loaded(index, None, f"{type(err).__name__}: {err}")
        regions = [self.transform(img) for img in self._sub_images(item)]
        stacked = torch.stack(regions) if regions else image.new_zeros((0, *image.shape))
        return _Loaded(index, Sample(image, stacked, None, index), None)

    def _sub_images(self, item: Item) -> list[Image.Image]:
        """Readable images in ``<sub_root>/<id without extension>/`` in name order (unreadable ones skipped)."""
        if self.sub_root is None:
            return []
        folder = self.sub_root / Path(item.id).with_suffix("")
        paths = sorted(p for p in folder.glob("*") if is_image_file(p)) if folder.is_dir() else []
        images = []
        for path in paths[: self.max_sub_images]:
            try:
                images.append(open_rgb(path))
            except READ_ERRORS:
                continue
        return images


def _split_loaded(loaded: list[_Loaded]) -> tuple[list[_Loaded], list[_Loaded]]:
    return [x for x in loaded if x.sample is not None], [x for x in loaded if x.sample is None]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MPSCLIPError(f"--device {device}: no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def _stack(parts: list[np.ndarray], empty_shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype=dtype)


class Embedder:
    """A model on its device plus the reading settings; :meth:`embed` makes one shard's rows."""

    def __init__(self, model: Any, settings: EmbedSettings) -> None:
        settings.check()
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.model = model.eval().to(self.device)
        self.dim, self.views = self._probe_dims()

    @classmethod
    def load(cls, checkpoint: str | Path, arch: str | None, settings: EmbedSettings) -> Embedder:
        from mpsclip.checkpoints import load_model

        return cls(load_model(checkpoint, arch=arch), settings)

    @torch.no_grad()
    def _probe_dims(self) -> tuple[int, int]:
        """(embedding size D, number of perspectives K) from one blank image."""
        size, device = self.model.image_size, self.device
        out = self.model.embed_all(
            torch.zeros(1, 3, size, size, device=device),
            torch.zeros(1, 0, 3, size, size, device=device),
            torch.zeros(1, 0, dtype=torch.bool, device=device),
        )
        return int(out["global"].shape[-1]), int(out["perspectives"].shape[1])

    def _loader(self, items: list[Item]) -> DataLoader:
        settings = self.settings
        sub_root = settings.sub_root if settings.perspectives == "from-dir" else None
        dataset = _ItemDataset(items, self.model.image_size, sub_root, settings.max_sub_images)
        return DataLoader(
            dataset, batch_size=settings.batch_size, num_workers=settings.workers, collate_fn=_split_loaded
        )

    @torch.no_grad()
    def embed(self, items: list[Item]) -> tuple[ShardRows, list[tuple[Item, str]]]:
        """Rows for the readable ``items`` (in order) and ``(item, error)`` for the others."""
        kept: list[int] = []
        failed: list[tuple[Item, str]] = []
        parts: dict[str, list[np.ndarray]] = {"retrieval": [], "global": [], "perspectives": [], "valid": []}
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for ok, bad in self._loader(items):
            failed.extend((items[x.index], x.error or "") for x in bad)
            if not ok:
                continue
            batch = collate([x.sample for x in ok]).to(self.device)
            with amp:
                out = self.model.embed_all(batch.images, batch.regions, batch.mask)
            kept.extend(x.index for x in ok)
            for name in ("retrieval", "global", "perspectives"):
                parts[name].append(out[name].float().cpu().numpy().astype(np.float16))
            has_regions = batch.mask.any(dim=1, keepdim=True).cpu().numpy()
            parts["valid"].append(np.repeat(has_regions, self.views, axis=1))
        dim, views = self.dim, self.views
        rows = ShardRows(
            ids=[items[i].id for i in kept],
            metas=[json.dumps(items[i].meta, sort_keys=True) for i in kept],
            retrieval=_stack(parts["retrieval"], (0, dim), np.float16),
            glob=_stack(parts["global"], (0, dim), np.float16),
            perspectives=_stack(parts["perspectives"], (0, views, dim), np.float16),
            valid=_stack(parts["valid"], (0, views), np.bool_),
        )
        return rows, failed
