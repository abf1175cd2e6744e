"""Embed an archive into a store of Parquet shards, resumably.

Items are processed in the source's deterministic order; shard ``i`` holds items
``[i * shard_size, (i + 1) * shard_size)`` minus those that could not be read, so a run that was killed and
started again produces the same files as an uninterrupted one. ``failures.jsonl`` is rewritten before each
shard, so it always covers every complete shard.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mpsclip import __version__
from mpsclip.archive.sources import Item, TileSettings, is_image_file, iter_items
from mpsclip.archive.store import (
    ShardRows,
    count_complete_shards,
    read_failures,
    read_manifest,
    shard_path,
    write_failures,
    write_manifest,
    write_shard,
)
from mpsclip.checkpoints import file_sha256, resolve_checkpoint
from mpsclip.data.collate import collate
from mpsclip.data.datasets import Sample
from mpsclip.data.transforms import eval_transform
from mpsclip.errors import MPSCLIPError

PERSPECTIVES = ("none", "from-dir")
PRECISION = "fp16"
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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


@dataclass(frozen=True)
class EmbedSummary:
    store: Path
    n_items: int
    n_embedded: int
    n_failed: int
    n_shards: int
    n_resumed_shards: int
    complete: bool
    seconds: float


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
        except _READ_ERRORS as err:
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
                images.append(_open_rgb(path))
            except _READ_ERRORS:
                continue
        return images


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def open_item(item: Item) -> Image.Image:
    """An item's RGB pixels: a GeoTIFF tile's window (meta ``window``) or the whole image file."""
    if "window" in item.meta:
        from mpsclip.archive.geotiff import read_tile

        return read_tile(item.path, item.meta)
    return _open_rgb(item.path)


def _collate_loaded(loaded: list[_Loaded]) -> tuple[list[_Loaded], list[_Loaded]]:
    return [x for x in loaded if x.sample is not None], [x for x in loaded if x.sample is None]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MPSCLIPError(f"--device {device}: no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def _check_settings(settings: EmbedSettings) -> None:
    if settings.perspectives not in PERSPECTIVES:
        raise MPSCLIPError(f"perspectives must be one of {', '.join(PERSPECTIVES)}, got {settings.perspectives!r}")
    if settings.perspectives == "from-dir" and (settings.sub_root is None or not settings.sub_root.is_dir()):
        raise MPSCLIPError(f"--perspectives from-dir needs --sub-root to be a folder, got {settings.sub_root}")
    if settings.perspectives == "none" and settings.sub_root is not None:
        raise MPSCLIPError("--sub-root is only used with --perspectives from-dir; add it or drop --sub-root")
    for name in ("batch_size", "shard_size"):
        if getattr(settings, name) < 1:
            raise MPSCLIPError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(settings, name)}")


@torch.no_grad()
def _probe_dims(model: Any, device: torch.device) -> tuple[int, int]:
    """(embedding size D, number of perspectives K) from one blank image."""
    size = model.image_size
    out = model.embed_all(
        torch.zeros(1, 3, size, size, device=device),
        torch.zeros(1, 0, 3, size, size, device=device),
        torch.zeros(1, 0, dtype=torch.bool, device=device),
    )
    return int(out["global"].shape[-1]), int(out["perspectives"].shape[1])


def _identity(model: Any, ckpt: Path, source: Path, settings: EmbedSettings, n_items: int) -> dict[str, Any]:
    """Everything that must match for a store to be resumed (or searched with a model)."""
    return {
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_sha256": file_sha256(ckpt),
        "arch": model.config.arch,
        "family": type(model).__name__,
        "precision": PRECISION,
        "perspectives": settings.perspectives,
        "sub_root": str(settings.sub_root.resolve()) if settings.sub_root else None,
        "max_sub_images": settings.max_sub_images,
        "shard_size": settings.shard_size,
        "source": str(source.resolve()),
        "n_source_items": n_items,
        "tiles": _tiles_identity(settings.tiles),
    }


def _tiles_identity(tiles: TileSettings | None) -> dict[str, Any] | None:
    """The tile settings as the manifest's JSON holds them (bands as a list)."""
    if tiles is None:
        return None
    return {**asdict(tiles), "bands": list(tiles.bands) if tiles.bands else None}


def _check_resumable(store: Path, identity: dict[str, Any]) -> None:
    old = read_manifest(store)
    if old is None:
        if store.exists() and any(store.iterdir()):
            raise MPSCLIPError(f"{store}: exists, is not empty and has no manifest.json; choose another --out")
        return
    differ = [key for key, value in identity.items() if old.get(key) != value and key != "checkpoint"]
    if differ:
        detail = "; ".join(f"{k}: store {old.get(k)!r} vs now {identity[k]!r}" for k in differ)
        raise MPSCLIPError(
            f"{store}: made with other settings ({detail}); embedding into it would mix incompatible vectors. "
            "Use another --out, or delete the store to start again"
        )


@torch.no_grad()
def _embed_shard(
    model: Any, items: list[Item], settings: EmbedSettings, device: torch.device, dim: int, views: int
) -> tuple[ShardRows, list[tuple[Item, str]]]:
    sub_root = settings.sub_root if settings.perspectives == "from-dir" else None
    dataset = _ItemDataset(items, model.image_size, sub_root, settings.max_sub_images)
    loader = DataLoader(
        dataset, batch_size=settings.batch_size, num_workers=settings.workers, collate_fn=_collate_loaded
    )
    kept: list[int] = []
    failed: list[tuple[Item, str]] = []
    parts: dict[str, list[np.ndarray]] = {"retrieval": [], "global": [], "perspectives": [], "valid": []}
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for ok, bad in loader:
        failed.extend((items[x.index], x.error or "") for x in bad)
        if not ok:
            continue
        batch = collate([x.sample for x in ok]).to(device)
        with amp:
            out = model.embed_all(batch.images, batch.regions, batch.mask)
        kept.extend(x.index for x in ok)
        for name in ("retrieval", "global", "perspectives"):
            parts[name].append(out[name].float().cpu().numpy().astype(np.float16))
        has_regions = batch.mask.any(dim=1, keepdim=True).cpu().numpy()
        parts["valid"].append(np.repeat(has_regions, views, axis=1))
    rows = ShardRows(
        ids=[items[i].id for i in kept],
        metas=[json.dumps(items[i].meta, sort_keys=True) for i in kept],
        retrieval=_stack(parts["retrieval"], (0, dim), np.float16),
        glob=_stack(parts["global"], (0, dim), np.float16),
        perspectives=_stack(parts["perspectives"], (0, views, dim), np.float16),
        valid=_stack(parts["valid"], (0, views), np.bool_),
    )
    return rows, failed


def _stack(parts: list[np.ndarray], empty_shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype=dtype)


def embed_archive(
    source: str | Path,
    store: str | Path,
    checkpoint: str | Path,
    arch: str | None = None,
    settings: EmbedSettings | None = None,
    stop_after_shards: int | None = None,
    progress: bool = True,
) -> EmbedSummary:
    """Embed ``source`` into ``store`` (resuming a partial store); ``stop_after_shards`` stops after writing
    that many shards in this call (for tests of resuming)."""
    from mpsclip.checkpoints import load_model

    start = time.perf_counter()
    settings = settings or EmbedSettings()
    _check_settings(settings)
    source, store = Path(source), Path(store)
    items = list(iter_items(source) if settings.tiles is None else iter_items(source, settings.tiles))
    if not items:
        raise MPSCLIPError(f"{source}: no JPEG/PNG/TIFF images found")
    ckpt = resolve_checkpoint(checkpoint)
    device = resolve_device(settings.device)
    model = load_model(ckpt, arch=arch).eval().to(device)
    identity = _identity(model, ckpt, source, settings, len(items))
    _check_resumable(store, identity)
    dim, views = _probe_dims(model, device)
    base = {**identity, "dim": dim, "views": views, "mpsclip_version": __version__}
    store.mkdir(parents=True, exist_ok=True)
    write_manifest(store, {**base, "complete": False})

    n_shards = (len(items) + settings.shard_size - 1) // settings.shard_size
    done = count_complete_shards(store)
    failures = [f for f in read_failures(store) if f["shard"] < done]
    bar = tqdm(
        total=len(items),
        initial=min(done * settings.shard_size, len(items)),
        unit="img",
        desc="embedding",
        disable=not progress,
        dynamic_ncols=True,
    )
    written = 0
    for shard in range(done, n_shards):
        if stop_after_shards is not None and written >= stop_after_shards:
            break
        chunk = items[shard * settings.shard_size : (shard + 1) * settings.shard_size]
        rows, failed = _embed_shard(model, chunk, settings, device, dim, views)
        failures += [{"id": it.id, "path": str(it.path), "error": err, "shard": shard} for it, err in failed]
        write_failures(store, failures)  # before the shard: a complete shard always has its failures listed
        write_shard(shard_path(store, shard), rows, dim, views)
        written += 1
        bar.update(len(chunk))
    bar.close()

    n_done = count_complete_shards(store)
    complete = n_done == n_shards
    covered = min(n_done * settings.shard_size, len(items))
    if complete:
        counts = {"items": len(items), "embedded": covered - len(failures), "failed": len(failures), "shards": n_shards}
        write_manifest(store, {**base, "complete": True, "counts": counts})
    return EmbedSummary(
        store=store,
        n_items=len(items),
        n_embedded=covered - len(failures),
        n_failed=len(failures),
        n_shards=n_done,
        n_resumed_shards=done,
        complete=complete,
        seconds=time.perf_counter() - start,
    )
