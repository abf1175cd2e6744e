"""The items an int8 export is calibrated and gated on: images (as CLIP-normalised pixels) and captions.

``--calibration`` takes a folder of images (with an optional ``captions.txt``, one caption a line), an
evaluation file (``.json``: records with ``image``, relative to the file's folder, and ``caption``), or a
``.txt`` of captions. What is missing (images or captions) comes from the packaged synthetic scenes
(:mod:`mpsclip.data.synth`, drawn now, seeded), with a warning: the user's own data calibrates better.

Every fifth item is held back: it is never used to calibrate, and the quality gate reports it apart.
"""

from __future__ import annotations

import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mpsclip.archive.items import is_image_file
from mpsclip.data.annotations import load_eval
from mpsclip.data.datasets import read_image
from mpsclip.data.transforms import eval_transform
from mpsclip.errors import MPSCLIPError

DEFAULT_ITEMS = 256
HELD_BACK_EVERY = 5
CAPTIONS_FILE = "captions.txt"


@dataclass(frozen=True)
class CalibrationSet:
    pixels: torch.Tensor
    """``[N, 3, S, S]`` CLIP-normalised images."""
    captions: list[str]
    source: str
    synthetic: list[str]
    """What came from the packaged synthetic scenes: ``images``, ``captions``, both or neither."""

    def split(self, tower: str) -> tuple[list[int], list[int]]:
        """Indices of the calibration and held-back items of ``tower`` (every ``HELD_BACK_EVERY``-th is held back)."""
        n = len(self.pixels) if tower == "image" else len(self.captions)
        held = list(range(HELD_BACK_EVERY - 1, n, HELD_BACK_EVERY))
        return [i for i in range(n) if i % HELD_BACK_EVERY != HELD_BACK_EVERY - 1], held

    def record(self) -> dict[str, object]:
        """What the manifest says about the calibration."""
        return {
            "source": self.source,
            "images": len(self.pixels),
            "captions": len(self.captions),
            "synthetic": self.synthetic,
            "held_back_every": HELD_BACK_EVERY,
        }


def load_calibration(spec: Path | None, image_size: int, items: int = DEFAULT_ITEMS, seed: int = 0) -> CalibrationSet:
    """At most ``items`` images and captions from ``spec`` (see the module docstring), seeded."""
    rng = random.Random(seed)
    paths, captions = _from_spec(spec) if spec is not None else ([], [])
    if len(paths) > items:
        paths = sorted(rng.sample(paths, items))
    if len(captions) > items:
        captions = rng.sample(captions, items)
    synthetic = [kind for kind, have in (("images", paths), ("captions", captions)) if not have]
    transform = eval_transform(image_size)
    with tempfile.TemporaryDirectory(prefix="mpsclip-calibration-") as tmp:
        if synthetic:
            synth_paths, synth_captions = _synthetic(Path(tmp), items, image_size, seed)
            paths, captions = paths or synth_paths, captions or synth_captions
            _warn(spec, synthetic)
        pixels = torch.stack([transform(read_image(path)) for path in paths])
    return CalibrationSet(pixels, captions, str(spec) if spec is not None else "packaged synthetic scenes", synthetic)


def _from_spec(spec: Path) -> tuple[list[Path], list[str]]:
    if spec.is_dir():
        paths = sorted(p for p in spec.rglob("*") if p.is_file() and is_image_file(p))
        if not paths:
            raise MPSCLIPError(f"--calibration {spec}: no JPEG/PNG/TIFF images in the folder")
        text = spec / CAPTIONS_FILE
        return paths, _caption_lines(text) if text.is_file() else []
    if spec.suffix == ".json":
        records = load_eval(spec)
        return [spec.parent / r.image for r in records], [c for r in records for c in r.captions]
    if spec.suffix == ".txt":
        return [], _caption_lines(spec)
    raise MPSCLIPError(
        f"--calibration {spec}: give a folder of images, an evaluation .json (image + caption records) "
        "or a .txt of captions"
    )


def _caption_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MPSCLIPError(f"--calibration {path}: file not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise MPSCLIPError(f"--calibration {path}: no captions (one a line)")
    return lines


def _synthetic(folder: Path, items: int, image_size: int, seed: int) -> tuple[list[Path], list[str]]:
    from mpsclip.data.synth import generate

    generate(folder, n_train=0, n_test=items, seed=seed, image_size=image_size, workers=1)
    records = load_eval(folder / "test.json")
    return [folder / r.image for r in records], [r.captions[i % len(r.captions)] for i, r in enumerate(records)]


def _warn(spec: Path | None, synthetic: list[str]) -> None:
    what = " and ".join(synthetic)
    given = f"--calibration {spec} has no {what}" if spec is not None else "no --calibration given"
    print(
        f"warning: {given}: calibrating the int8 towers on packaged synthetic {what}; your own images and "
        "captions (a few hundred, --calibration DIR|FILE) calibrate better",
        file=sys.stderr,
    )
