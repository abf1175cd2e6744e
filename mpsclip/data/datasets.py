"""Torch datasets over annotation records: an image, its noun sub-images ("regions") and a caption.

Sub-images are found with :func:`mpsclip.data.annotations.sub_image_paths` from the record's nouns.
A missing or unreadable main image raises :class:`MPSCLIPError` naming the file, unless
``skip_bad_images=True``: then every image is opened once at construction, records whose image
fails are dropped, and ``num_skipped`` / ``bad_images`` say what was dropped. An unreadable
sub-image is skipped with a warning, never replaced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from torch.utils.data import Dataset

from mpsclip.data.annotations import EvalImage, TrainRecord, sub_image_paths
from mpsclip.data.transforms import eval_transform, train_transform
from mpsclip.errors import MPSCLIPError

Transform = Callable[[Image.Image], torch.Tensor]
_Item = TypeVar("_Item")
_READ_ERRORS = (OSError, ValueError, SyntaxError)


@dataclass
class Sample:
    """One dataset item. ``regions`` is ``[R, 3, H, W]`` (``R`` may be 0); ``caption`` is None for eval."""

    image: torch.Tensor
    regions: torch.Tensor
    caption: str | None
    image_id: int


class _ImageRecords(Dataset[Sample]):
    """Loading shared by both datasets: ``items`` pairs each record with the image id it reports."""

    def __init__(
        self,
        items: list[tuple[int, TrainRecord | EvalImage]],
        image_root: str | Path,
        sub_root: str | Path | None,
        transform: Transform,
        max_sub_images: int | None,
        skip_bad_images: bool,
    ) -> None:
        self.image_root = Path(image_root)
        self.loader = _RegionLoader(sub_root, transform, max_sub_images)
        names = [record.image for _, record in items]
        self.items, self.bad_images = _keep_readable(items, names, self.image_root, skip_bad_images)
        self.num_skipped = len(items) - len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        image_id, record = self.items[index]
        image, regions = self.loader.load(self.image_root, record.image, record.nouns)
        caption = record.caption if isinstance(record, TrainRecord) else None
        return Sample(image, regions, caption, image_id)


class TrainDataset(_ImageRecords):
    """One item per caption record; ``transform`` defaults to :func:`train_transform`."""

    def __init__(
        self,
        records: Sequence[TrainRecord],
        image_root: str | Path,
        sub_root: str | Path | None = None,
        transform: Transform | None = None,
        max_sub_images: int | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        items = [(r.image_id, r) for r in records]
        transform = train_transform() if transform is None else transform
        super().__init__(items, image_root, sub_root, transform, max_sub_images, skip_bad_images)

    @property
    def records(self) -> list[TrainRecord]:
        return [record for _, record in self.items]  # type: ignore[misc]


class EvalImageDataset(_ImageRecords):
    """One item per evaluation image; ``image_id`` is the image's index in ``images`` (kept when skipping).

    ``transform`` defaults to :func:`eval_transform`.
    """

    def __init__(
        self,
        images: Sequence[EvalImage],
        image_root: str | Path,
        sub_root: str | Path | None = None,
        transform: Transform | None = None,
        max_sub_images: int | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        transform = eval_transform() if transform is None else transform
        super().__init__(list(enumerate(images)), image_root, sub_root, transform, max_sub_images, skip_bad_images)


@dataclass(frozen=True)
class _RegionLoader:
    sub_root: str | Path | None
    transform: Transform
    max_sub_images: int | None

    def load(
        self, image_root: Path, image: str, nouns: tuple[str, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = self.transform(read_image(image_root / image))
        regions = []
        if self.sub_root is not None and nouns:
            for path in sub_image_paths(self.sub_root, image, nouns)[: self.max_sub_images]:
                try:
                    regions.append(self.transform(_open_rgb(path)))
                except _READ_ERRORS as err:
                    warnings.warn(f"skipping unreadable sub-image {path}: {err}", stacklevel=2)
        stacked = torch.stack(regions) if regions else tensor.new_zeros((0, *tensor.shape))
        return tensor, stacked


def read_image(path: Path) -> Image.Image:
    """Open an image as RGB, raising :class:`MPSCLIPError` naming the file if it is missing or unreadable."""
    if not path.is_file():
        raise MPSCLIPError(
            f"{path}: image not found; check image_root, or pass skip_bad_images=True to drop such records"
        )
    try:
        return _open_rgb(path)
    except _READ_ERRORS as err:
        raise MPSCLIPError(
            f"{path}: cannot read image ({err}); replace the file, or pass skip_bad_images=True to drop it"
        ) from err


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _keep_readable(
    items: list[_Item], names: list[str], image_root: Path, skip_bad_images: bool
) -> tuple[list[_Item], list[Path]]:
    """Drop items whose image (``names[i]``) cannot be opened, when skipping; also return the bad files."""
    if not skip_bad_images:
        return items, []
    ok = {name: _readable(image_root / name) for name in dict.fromkeys(names)}
    kept = [item for item, name in zip(items, names, strict=True) if ok[name]]
    return kept, [image_root / name for name, good in ok.items() if not good]


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
    except _READ_ERRORS:
        return False
    return True
