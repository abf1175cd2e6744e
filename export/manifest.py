"""``manifest.json``: what an exported artefact holds and how to feed it.

Its tower files are named relative to the folder and stay inside it (:func:`write_manifest` checks, as
:func:`mpsclip.engines.manifest.read_export` does when reading).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mpsclip.export.towers import INPUT_NAMES, OUTPUT_NAME, context_length, input_shape

from mpsclip import __version__
from mpsclip.checkpoints import file_sha256
from mpsclip.data.transforms import CLIP_MEAN, CLIP_STD
from mpsclip.engines.manifest import contained_file
from mpsclip.io import atomic_write
from mpsclip.model import MPSCLIP

MANIFEST = "manifest.json"
INPUT_DTYPES = {"image": "float32", "text": "int64"}


def tower_io(model: MPSCLIP, tower: str) -> dict[str, Any]:
    """Input and output names, dtypes and shapes (``"batch"`` marks the dynamic axis)."""
    return {
        "inputs": [{"name": INPUT_NAMES[tower], "dtype": INPUT_DTYPES[tower], "shape": input_shape(model, tower)}],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", model.embed_dim]}],
    }


def build_manifest(
    *,
    checkpoint: Path,
    model: MPSCLIP,
    fmt: str,
    precision: str,
    files: dict[str, str],
    batch: dict[str, int],
    verification: dict[str, dict[str, object]],
    device: str | None = None,
) -> dict[str, Any]:
    """``files`` maps each tower to its artefact path relative to the folder; ``verification`` its figures;
    ``device`` is the device an AOTInductor package was compiled for (omitted for other formats)."""
    return {
        "format": fmt,
        **({"device": device} if device is not None else {}),
        "mpsclip_version": __version__,
        "checkpoint": {"file": checkpoint.name, "sha256": file_sha256(checkpoint)},
        "arch": model.config.arch,
        "precision": precision,
        "embed_dim": model.embed_dim,
        "batch": batch,
        "towers": {tower: {"file": path, **tower_io(model, tower)} for tower, path in files.items()},
        "image_preprocessing": {
            "size": model.image_size,
            "resize": "bicubic",
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
        },
        "tokenizer": {"library": "open_clip", "name": model.config.arch, "context_length": context_length(model)},
        "verification": verification,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    for tower, entry in manifest["towers"].items():
        contained_file(folder, entry["file"], f"{folder / MANIFEST}: towers.{tower}.file")
    return atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
