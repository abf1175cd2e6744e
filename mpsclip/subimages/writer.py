"""Reading the images to cut, running a segmentation backend over them, and writing black-background sub-images.

Layout: ``<out>/<image stem>/<noun>_blackbg.png`` — the image with every pixel outside the noun's mask set to
black, same size as the image. Rules:

- resumable: a (image, noun) whose output file exists is skipped; files are written atomically;
- empty masks write no file (they are counted), so a re-run computes them again;
- sharded: image ``i`` (in order of first appearance in the annotation file) is handled when
  ``i % world_size == rank``;
- a failing image (unreadable file, missing oracle mask, backend error) is counted and reported; the run goes on.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from mpsclip.data.annotations import read_json_list
from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write

SUFFIX = "_blackbg.png"
_RECOVERABLE = (MPSCLIPError, OSError, ValueError, RuntimeError)
_SHOWN_FAILURES = 5


@dataclass(frozen=True)
class ImageItem:
    """One image and the distinct nouns to cut from it."""

    image: str  # as written in the annotation file
    path: Path  # on disk
    nouns: tuple[str, ...]

    @property
    def stem(self) -> str:
        return Path(self.image).stem


@dataclass(frozen=True)
class Request:
    """An image to segment: its pixels (H×W×3 uint8) and the nouns whose sub-images are still missing."""

    item: ImageItem
    rgb: np.ndarray
    nouns: tuple[str, ...]


class Backend(Protocol):
    """Gives one bool H×W mask per requested noun, for each request of a batch."""

    batch_size: int

    def segment(self, batch: list[Request]) -> list[dict[str, np.ndarray]]: ...


@dataclass
class Summary:
    images: int = 0
    keywords: int = 0
    written: int = 0
    empty: int = 0
    skipped: int = 0
    failures: int = 0
    messages: list[str] = field(default_factory=list)

    def format(self) -> str:
        line = (
            f"images {self.images}, keywords {self.keywords}, masks written {self.written}, "
            f"empty masks {self.empty} (no file), skipped existing {self.skipped}, failures {self.failures}"
        )
        shown = [f"  {message}" for message in self.messages[:_SHOWN_FAILURES]]
        more = len(self.messages) - len(shown)
        if more > 0:
            shown.append(f"  ... and {more} more")
        return "\n".join([line, *shown])


# ------------------------------------------------------------------------------------------- inputs


def load_items(annotation: str | Path, image_root: str | Path) -> list[ImageItem]:
    """Distinct images of an annotation file (records with ``image`` and ``nouns``), in order of first appearance.

    Per-caption training files list an image once per caption: its nouns are merged (first appearance order).
    """
    annotation = Path(annotation)
    records = read_json_list(annotation)
    nouns_by_image: dict[str, dict[str, None]] = {}
    for index, record in enumerate(records):
        image, nouns = _image_and_nouns(record, f"{annotation}: record {index}")
        nouns_by_image.setdefault(image, {}).update(dict.fromkeys(nouns))
    items = [ImageItem(image, Path(image_root) / image, tuple(nouns)) for image, nouns in nouns_by_image.items()]
    _check_unique_stems(items, annotation)
    return items


def _image_and_nouns(record: Any, where: str) -> tuple[str, list[str]]:
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        raise MPSCLIPError(f"{where}: needs an 'image' string; every record names its image file")
    nouns = record.get("nouns", [])
    if not isinstance(nouns, list) or not all(isinstance(noun, str) for noun in nouns):
        raise MPSCLIPError(f"{where}: 'nouns' must be a list of strings; extract them with `mpsclip keywords` first")
    return record["image"], [noun.strip() for noun in nouns if noun.strip()]


def _check_unique_stems(items: list[ImageItem], annotation: Path) -> None:
    seen: dict[str, str] = {}
    for item in items:
        if item.stem in seen:
            raise MPSCLIPError(
                f"{annotation}: images {seen[item.stem]!r} and {item.image!r} share the file stem {item.stem!r}, "
                "so their sub-image folders would collide; rename one of them"
            )
        seen[item.stem] = item.image


def shard(items: list[ImageItem], rank: int, world_size: int) -> list[ImageItem]:
    """Images ``i`` with ``i % world_size == rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise MPSCLIPError(f"--rank must be in [0, --world-size) and --world-size >= 1, got {rank} / {world_size}")
    return [item for index, item in enumerate(items) if index % world_size == rank]


def load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError as err:
        raise MPSCLIPError(f"{path}: image not found; check --image-root") from err
    except OSError as err:
        raise MPSCLIPError(f"{path}: not a readable image ({err})") from err


# ------------------------------------------------------------------------------------------- outputs


def subimage_path(out_root: str | Path, image: str, noun: str) -> Path:
    return Path(out_root) / Path(image).stem / f"{noun}{SUFFIX}"


def black_background(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``rgb`` with every pixel outside ``mask`` set to black."""
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask of shape {mask.shape} for an image of shape {rgb.shape[:2]}")
    return rgb * mask.astype(bool)[..., None].astype(rgb.dtype)


def write_png(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def _unsafe_noun(noun: str) -> bool:
    return "/" in noun or "\\" in noun or noun.startswith(".")


# ------------------------------------------------------------------------------------------- the run


def write_subimages(
    items: Iterable[ImageItem],
    backend: Backend,
    out_root: str | Path,
    progress: bool = False,
) -> Summary:
    """Cut every (image, noun) of ``items`` with ``backend`` and write the sub-images under ``out_root``."""
    from tqdm import tqdm

    items = list(items)
    summary = Summary(images=len(items))
    pending: list[Request] = []
    with tqdm(total=len(items), unit="img", desc="subimages", disable=not progress) as bar:
        for item in items:
            request = _prepare(item, out_root, summary)
            if request is None:
                bar.update(1)
                continue
            pending.append(request)
            if len(pending) >= max(1, backend.batch_size):
                _flush(pending, backend, out_root, summary)
                bar.update(len(pending))
                pending = []
        if pending:
            _flush(pending, backend, out_root, summary)
            bar.update(len(pending))
    return summary


def _prepare(item: ImageItem, out_root: str | Path, summary: Summary) -> Request | None:
    """The request for the nouns still missing, or None when there is nothing to do (or the image failed)."""
    summary.keywords += len(item.nouns)
    todo = []
    for noun in item.nouns:
        if _unsafe_noun(noun):
            _fail(summary, 1, f"{item.image}: noun {noun!r} cannot be a file name; fix the nouns")
        elif subimage_path(out_root, item.image, noun).exists():
            summary.skipped += 1
        else:
            todo.append(noun)
    if not todo:
        return None
    try:
        rgb = load_rgb(item.path)
    except MPSCLIPError as err:
        _fail(summary, len(todo), str(err))
        return None
    return Request(item, rgb, tuple(todo))


def _flush(batch: list[Request], backend: Backend, out_root: str | Path, summary: Summary) -> None:
    """Segment a batch; when it fails, retry its images one by one so that one bad image costs only itself."""
    try:
        results = backend.segment(batch)
    except _RECOVERABLE as err:
        if len(batch) > 1:
            for request in batch:
                _flush([request], backend, out_root, summary)
            return
        _fail(summary, len(batch[0].nouns), f"{batch[0].item.image}: {err}")
        return
    for request, masks in zip(batch, results, strict=True):
        _write_request(request, masks, out_root, summary)


def _write_request(request: Request, masks: dict[str, np.ndarray], out_root: str | Path, summary: Summary) -> None:
    for noun in request.nouns:
        mask = masks.get(noun)
        if mask is None:
            _fail(summary, 1, f"{request.item.image}: no mask for {noun!r} (oracle: no such file under --mask-root)")
            continue
        if not mask.any():
            summary.empty += 1
            continue
        try:
            write_png(subimage_path(out_root, request.item.image, noun), black_background(request.rgb, mask))
        except (OSError, ValueError) as err:
            _fail(summary, 1, f"{request.item.image}: {noun!r}: {err}")
            continue
        summary.written += 1


def _fail(summary: Summary, count: int, message: str) -> None:
    summary.failures += count
    summary.messages.append(message)


# ------------------------------------------------------------------------------------------- scoring


def read_mask(path: Path) -> np.ndarray:
    """A bool mask from a 0/255 mask PNG."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 127


def subimage_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The mask of a black-background sub-image (non-black pixels); all False when the file is missing.

    A pixel that is pure black inside the true mask reads as outside: IoU is then very slightly underestimated.
    """
    if not path.is_file():
        return np.zeros(shape, dtype=bool)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).any(axis=-1)


def oracle_pairs(oracle_mask_dir: str | Path) -> list[tuple[str, str]]:
    """Every (image stem, noun) with a ``<oracle_mask_dir>/<stem>/<noun>.png`` mask, sorted."""
    root = Path(oracle_mask_dir)
    return sorted((path.parent.name, path.stem) for path in root.glob("*/*.png"))


def mask_iou(
    pred_dir: str | Path,
    oracle_mask_dir: str | Path,
    pairs: Iterable[tuple[str, str]] | None = None,
) -> float:
    """Mean IoU of predicted sub-images against oracle masks over (image stem, noun) pairs.

    ``pairs`` defaults to every oracle mask. A missing prediction counts as an empty mask; two empty masks
    score 1.
    """
    pred_root, oracle_root = Path(pred_dir), Path(oracle_mask_dir)
    chosen = oracle_pairs(oracle_root) if pairs is None else list(pairs)
    if not chosen:
        raise MPSCLIPError(f"{oracle_root}: no oracle masks (<stem>/<noun>.png) to score against; check the path")
    scores = []
    for stem, noun in chosen:
        truth = read_mask(oracle_root / stem / f"{noun}.png")
        pred = subimage_mask(pred_root / stem / f"{noun}{SUFFIX}", truth.shape)
        union = np.logical_or(truth, pred).sum()
        scores.append(1.0 if union == 0 else float(np.logical_and(truth, pred).sum() / union))
    return float(np.mean(scores))
