"""The per-shard embedding pipeline: items → pixels (and sub-images) → towers → one shard's fp16 rows.

:class:`Embedder` holds the model on its device and turns a list of items into :class:`ShardRows` plus the
items that could not be read. The local and the Ray executors of :mod:`mpsclip.archive.job` both call it, so a
shard's content does not depend on which of them ran.

Reading runs in DataLoader worker processes, batches ahead of the towers, into pinned memory on a GPU; a batch
holding remote items (:mod:`mpsclip.archive.remote`) is read :data:`READ_THREADS` items at a time, so the latency
of an object store overlaps instead of adding up. With
``decode="device"`` (the default on a GPU) JPEG files are only read there and decoded on the embedding device
with ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA), then resized (bicubic, antialiased) and normalised there;
other formats, GeoTIFF tiles and sub-images are decoded with PIL in the workers. The image tower runs on the
engine of ``runtime`` (:func:`mpsclip.engines.runtime_engine`); sub-images come from files (``from-dir``) or are cut
in the same pass
(``zero-shot``, :mod:`mpsclip.archive.perspectives`).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mpsclip.archive.items import READ_ERRORS, REMOTE_KINDS, Item, TileSettings, is_image_file
from mpsclip.archive.perspectives import ZeroShotPerspectives, ZeroShotSettings
from mpsclip.archive.readers import jpeg_bytes, open_item, open_rgb
from mpsclip.archive.store import ShardRows
from mpsclip.checkpoints import file_sha256
from mpsclip.choices import DECODERS, PERSPECTIVES, RUNTIMES
from mpsclip.data.collate import collate
from mpsclip.data.datasets import Sample
from mpsclip.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform
from mpsclip.devices import resolve_device
from mpsclip.engines import embedding_precision, runtime_engine
from mpsclip.engines.manifest import read_export
from mpsclip.engines.precision import DEFAULT_PRECISION
from mpsclip.errors import MPSCLIPError
from mpsclip.family import RetrievalModel
from mpsclip.scoring import perspective_validity

READ_THREADS = 8
"""Items of a batch read at once when it holds remote items, so object-store latency overlaps."""


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
    engine: str = "torch"
    engine_dir: Path | None = None
    decode: str = "auto"
    zero_shot: ZeroShotSettings = ZeroShotSettings()
    gdal_config: tuple[tuple[str, str], ...] = ()
    """``--gdal-config KEY=VALUE`` pairs for remote reads (:func:`mpsclip.archive.remote.set_gdal_config`)."""
    precision: str | None = None
    """``--precision``: the image engine's (None: its own; an export folder's manifest says it)."""

    def engine_precision(self) -> str:
        """The precision the image engine runs in, for the store's manifest (without loading the engine):
        ``--precision``, else an export folder's manifest, else the torch engine's default on the device."""
        if self.precision is not None:
            return self.precision
        if self.engine != "torch" and self.engine_dir is not None:
            return read_export(self.engine_dir, self.engine).precision
        return DEFAULT_PRECISION["optimized" if resolve_device(self.device).type == "cuda" else "torch"]

    def check(self) -> None:
        """Raise :class:`MPSCLIPError` for inconsistent settings (named as the CLI flags)."""
        if self.perspectives not in PERSPECTIVES:
            raise MPSCLIPError(f"--perspectives must be one of {', '.join(PERSPECTIVES)}, got {self.perspectives!r}")
        if self.engine not in RUNTIMES:
            raise MPSCLIPError(f"--engine must be one of {', '.join(RUNTIMES)}, got {self.engine!r}")
        if self.decode not in DECODERS:
            raise MPSCLIPError(f"--decode must be one of {', '.join(DECODERS)}, got {self.decode!r}")
        if self.perspectives == "zero-shot":
            self.zero_shot.check()
        if self.perspectives == "from-dir" and (self.sub_root is None or not self.sub_root.is_dir()):
            raise MPSCLIPError(f"--perspectives from-dir needs --sub-root to be a folder, got {self.sub_root}")
        if self.perspectives != "from-dir" and self.sub_root is not None:
            raise MPSCLIPError("--sub-root is only used with --perspectives from-dir; add it or drop --sub-root")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise MPSCLIPError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(self, name)}")


@dataclass(frozen=True)
class _Loaded:
    """A read item: ``sample`` (its ``image`` is empty when ``jpeg`` holds the undecoded file) or ``error``."""

    index: int
    sample: Sample | None
    error: str | None
    jpeg: torch.Tensor | None = None

    def pin_memory(self) -> _Loaded:
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``), so host-to-GPU copies are
        asynchronous."""
        if self.sample is None:
            return self
        sample = Sample(self.sample.image.pin_memory(), self.sample.regions.pin_memory(), None, self.sample.image_id)
        return _Loaded(self.index, sample, None, self.jpeg)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class _ItemDataset(Dataset[_Loaded]):
    """Reads one item (and its sub-images with ``from-dir``); a read error is returned, not raised.
    With ``raw_jpeg``, JPEG files are returned undecoded (for decoding on the embedding device)."""

    def __init__(
        self, items: list[Item], size: int, sub_root: Path | None, max_sub_images: int | None, raw_jpeg: bool
    ) -> None:
        self.items = items
        self.size = size
        self.transform = eval_transform(size)
        self.sub_root = sub_root
        self.max_sub_images = max_sub_images
        self.raw_jpeg = raw_jpeg

    def __len__(self) -> int:
        return len(self.items)

    def __getitems__(self, indices: list[int]) -> list[_Loaded]:
        """A batch (the DataLoader's call): remote items are read READ_THREADS at a time, others one by one."""
        if len(indices) < 2 or not any(self.items[i].kind in REMOTE_KINDS for i in indices):
            return [self[i] for i in indices]
        with ThreadPoolExecutor(min(READ_THREADS, len(indices)), thread_name_prefix="mpsclip-read") as pool:
            return list(pool.map(self.__getitem__, indices))

    def __getitem__(self, index: int) -> _Loaded:
        item = self.items[index]
        jpeg = None
        try:
            data = jpeg_bytes(item) if self.raw_jpeg else None
            if data is not None:
                jpeg = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                image = torch.empty(0)
            else:
                image = self.transform(open_item(item))
        except READ_ERRORS as err:
            return _Loaded(index, None, _error(err))
        regions = [self.transform(img) for img in self._sub_images(item)]
        stacked = torch.stack(regions) if regions else torch.zeros((0, 3, self.size, self.size))
        return _Loaded(index, Sample(image, stacked, None, index), None, jpeg)

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


def jpeg_pixels(files: list[torch.Tensor], size: int, device: torch.device) -> list[torch.Tensor | str]:
    """Decode JPEG files on ``device`` and preprocess them as :func:`eval_transform` does (bicubic resize to
    ``size`` × ``size`` with antialiasing, CLIP normalisation); an undecodable file gives its error message."""
    try:
        decoded: list[torch.Tensor | str] = list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the batch call: decode one by one to find it
        decoded = []
        for data in files:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as err:
                decoded.append(_error(err))
    mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(decoded):
        if isinstance(image, torch.Tensor):
            by_shape.setdefault(tuple(image.shape), []).append(i)
    out = list(decoded)
    for rows in by_shape.values():  # one resize call per distinct source size (archives of tiles have one)
        stacked = torch.stack([decoded[i] for i in rows])
        resized = TF.resize(stacked, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        for i, image in zip(rows, (resized.float() / 255.0 - mean) / std, strict=True):
            out[i] = image
    return out


def resolve_decode(decode: str, device: torch.device) -> str:
    """``auto`` decodes JPEGs on the device when it is a GPU, with PIL in the reading workers otherwise."""
    if decode == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return decode


def _stack(parts: list[np.ndarray], empty_shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype=dtype)


class Embedder:
    """A model on its device plus the reading settings; :meth:`embed` makes one shard's rows."""

    def __init__(self, model: RetrievalModel, settings: EmbedSettings, checkpoint_sha256: str) -> None:
        settings.check()
        self.settings = settings
        if settings.gdal_config:  # before the reading processes fork, and in each Ray actor
            from mpsclip.archive.remote import set_gdal_config

            set_gdal_config(dict(settings.gdal_config))
        self.checkpoint_sha256 = checkpoint_sha256
        self.device = resolve_device(settings.device)
        self.model = model.eval().to(self.device)
        self.decode = resolve_decode(settings.decode, self.device)
        self.engine = runtime_engine(
            settings.engine, self.model, self.device, settings.engine_dir, checkpoint_sha256, settings.precision
        )
        self.encode = self.engine.encode_image
        self.precision = embedding_precision(self.engine.kind, self.device, self.engine.precision)
        self.zero_shot = (
            ZeroShotPerspectives(self.model, settings.zero_shot, self.device)
            if settings.perspectives == "zero-shot"
            else None
        )
        self.dim, self.views = self._probe_dims()

    @classmethod
    def load(cls, checkpoint: str | Path, arch: str | None, settings: EmbedSettings) -> Embedder:
        from mpsclip.factory import load_model

        return cls(load_model(checkpoint, arch=arch), settings, file_sha256(Path(checkpoint)))

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
        dataset = _ItemDataset(
            items, self.model.image_size, sub_root, settings.max_sub_images, raw_jpeg=self.decode == "device"
        )
        return DataLoader(
            dataset,
            batch_size=settings.batch_size,
            num_workers=settings.workers,
            collate_fn=_split_loaded,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if settings.workers else None,
        )

    def _on_device(self, ok: list[_Loaded]) -> tuple[list[Sample], list[tuple[int, str]]]:
        """Samples whose images are on the device (JPEGs decoded there), and the indices that failed."""
        raw = [x for x in ok if x.jpeg is not None]
        decoded = jpeg_pixels([x.jpeg for x in raw], self.model.image_size, self.device) if raw else []
        pixels = {x.index: image for x, image in zip(raw, decoded, strict=True)}
        samples, failed = [], []
        for x in ok:
            image = pixels.get(x.index, x.sample.image)
            if isinstance(image, str):
                failed.append((x.index, image))
                continue
            samples.append(Sample(image.to(self.device, non_blocking=True), x.sample.regions, None, x.index))
        return samples, failed

    def _embed_batch(
        self, samples: list[Sample]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[list[str]] | None]:
        """The embeddings of a batch, its sub-image mask [B, R] and (zero-shot) each image's keywords."""
        batch = collate(samples).to(self.device, non_blocking=True)
        with self.precision.context(self.device):  # the engine's precision rules the whole path
            if self.zero_shot is None:
                out = self.model.embed_all(batch.images, batch.regions, batch.mask, self.encode)
                return out, batch.mask, None
            cut = self.zero_shot(batch.images)
            return self.model.embed_from_global(cut.glob, cut.regions, cut.mask, self.encode), cut.mask, cut.keywords

    @torch.no_grad()
    def embed(self, items: list[Item]) -> tuple[ShardRows, list[tuple[Item, str]]]:
        """Rows for the readable ``items`` (in order) and ``(item, error)`` for the others."""
        kept: list[int] = []
        metas: list[str] = []
        failed: list[tuple[int, str]] = []
        parts: dict[str, list[np.ndarray]] = {"retrieval": [], "global": [], "perspectives": [], "valid": []}
        for ok, bad in self._loader(items):
            failed.extend((x.index, x.error or "") for x in bad)
            samples, undecodable = self._on_device(ok)
            failed.extend(undecodable)
            if not samples:
                continue
            out, mask, keywords = self._embed_batch(samples)
            for j, sample in enumerate(samples):
                meta = dict(items[sample.image_id].meta)
                if keywords is not None:
                    meta["keywords"] = keywords[j]
                kept.append(sample.image_id)
                metas.append(json.dumps(meta, sort_keys=True))
            for name in ("retrieval", "global", "perspectives"):
                parts[name].append(out[name].float().cpu().numpy().astype(np.float16))
            parts["valid"].append(perspective_validity(mask, self.views).cpu().numpy())
        rows = ShardRows(
            ids=[items[i].id for i in kept],
            metas=metas,
            retrieval=_stack(parts["retrieval"], (0, self.dim), np.float16),
            glob=_stack(parts["global"], (0, self.dim), np.float16),
            perspectives=_stack(parts["perspectives"], (0, self.views, self.dim), np.float16),
            valid=_stack(parts["valid"], (0, self.views), np.bool_),
        )
        return rows, [(items[i], err) for i, err in sorted(failed)]
