"""Deterministic synthetic top-down "remote-sensing" scenes in the authors' annotation format.

Eight scene classes (airport, harbor, farmland, residential, industrial, river, forest, parking) are
drawn with class-typical objects whose counts, colours and positions vary per image. Every image gets
five template captions naming its objects, their counts, colours and relations, plus exact per-noun
masks (``masks/<stem>/<noun>.png``, 0/255) and the matching black-background sub-images
(``subimages/<stem>/<noun>_blackbg.png``): a perfect segmenter. Output layout under ``out_dir``::

    images/<class>_<n>.png   train.json (per caption)   test.json / val.json (per image)

The same seed gives byte-identical files, whatever the number of workers.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw

from mpsclip.io import atomic_write

CLASSES = ("airport", "harbor", "farmland", "residential", "industrial", "river", "forest", "parking")
CAPTIONS_PER_IMAGE = 5
# Ground cover: tints the unnamed ground of a scene and is named in every caption, so that images of one
# class differ in a way a small model can see and a caption can say.
TERRAINS: dict[str, tuple[tuple[float, float, float], tuple[str, ...]]] = {
    "snowy": ((232.0, 234.0, 238.0), ("in a snowy area", "on snow-covered ground", "surrounded by snow")),
    "sandy": ((214.0, 186.0, 128.0), ("in a sandy desert area", "on sandy ground", "surrounded by sand")),
    "grassy": ((96.0, 150.0, 70.0), ("surrounded by green grassland", "on grassy ground", "in a green meadow")),
    "rocky": ((92.0, 88.0, 84.0), ("on dark rocky ground", "in a rocky area", "surrounded by dark rocks")),
}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_Z_HUFFMAN_ONLY = 2

_T = TypeVar("_T")
Color = tuple[float, float, float]
Point = tuple[float, float]

COLORS: dict[str, Color] = {
    "white": (232, 232, 228),
    "grey": (138, 138, 136),
    "black": (38, 38, 40),
    "red": (184, 52, 44),
    "orange": (222, 128, 40),
    "yellow": (218, 196, 70),
    "blue": (52, 92, 178),
    "brown": (128, 88, 56),
}
_NUMBERS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)


@dataclass(frozen=True)
class SynthSummary:
    out_dir: Path
    n_train: int
    n_val: int
    n_test: int
    n_train_captions: int
    per_class: dict[str, int]
    seconds: float


def dataset_paths(root: str | Path) -> dict[str, Path]:
    """Where a synthetic set keeps what training and evaluation read (image paths are relative to ``root``)."""
    root = Path(root)
    return {
        "train_file": root / "train.json",
        "eval_file": root / "test.json",
        "image_root": root,
        "sub_root": root / "subimages",
    }


def generate(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    n_val: int = 0,
    image_size: int = 224,
    workers: int | None = None,
    progress: bool = False,
) -> SynthSummary:
    """Write a synthetic dataset under ``out_dir`` and return a summary.

    ``workers`` defaults to the CPU count; 1 draws in this process. ``progress`` shows a tqdm bar.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    jobs = _jobs(out, {"train": n_train, "val": n_val, "test": n_test}, seed, image_size)
    for sub in ("images", "masks", "subimages"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    metas = list(_run_jobs(jobs, workers or os.cpu_count() or 1, progress))
    by_split: dict[str, list[dict[str, Any]]] = {split: [] for split in _SPLIT_CODES}
    for job, meta in zip(jobs, metas, strict=True):
        by_split[job.split].append(meta)
    train = [
        {
            "caption": c,
            "image": m["image"],
            "image_id": i,
            "label_name": m["label_name"],
            "label": m["label"],
            "nouns": nouns,
        }
        for i, m in enumerate(by_split["train"])
        for c, nouns in zip(m["captions"], m["nouns"], strict=True)
    ]
    _write_json(out / "train.json", train)
    for split in ("val", "test"):
        if split == "test" or by_split[split]:
            _write_json(out / f"{split}.json", [_eval_record(m) for m in by_split[split]])
    return SynthSummary(
        out_dir=out,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        n_train_captions=len(train),
        per_class=dict(Counter(m["label_name"] for m in metas)),
        seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class _Job:
    out_dir: Path
    split: str
    index: int
    number: int
    seed: int
    size: int


def _jobs(out: Path, counts: dict[str, int], seed: int, size: int) -> list[_Job]:
    jobs = []
    for split, count in counts.items():
        if count < 0:
            raise ValueError(f"number of {split} images must be >= 0, got {count}")
        jobs += [_Job(out, split, i, len(jobs) + i, seed, size) for i in range(count)]
    return jobs


def _run_jobs(jobs: list[_Job], workers: int, progress: bool) -> Iterator[dict[str, Any]]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="img", desc="synth")
    if workers <= 1 or len(jobs) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        results: Iterator[dict[str, Any]] = map(make_image, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(min(workers, len(jobs)))
        results = pool.imap(make_image, jobs, chunksize=4)
    try:
        for meta in results:
            if bar is not None:
                bar.update(1)
            yield meta
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()


def _eval_record(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "image": meta["image"],
        "caption": meta["captions"],
        "nouns": [n for nouns in meta["nouns"] for n in nouns],
        "label_name": meta["label_name"],
        "label": meta["label"],
    }


def make_image(job: _Job) -> dict[str, Any]:
    """Draw one scene, write its image, masks and sub-images; return its captions and nouns."""
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, _SPLIT_CODES[job.split], job.index]))
    label = job.index % len(CLASSES)
    name = CLASSES[label]
    canvas, candidates = _SCENES[name](_Canvas(job.size, rng))
    phrases = _apply_terrain(canvas, rng)
    rgb, owner = canvas.finish()
    picks = rng.choice(len(candidates), size=CAPTIONS_PER_IMAGE, replace=False)
    captions = [_with_phrase(candidates[i], phrases[j % len(phrases)]) for j, i in enumerate(sorted(picks))]
    nouns = [_nouns_in(c, canvas.nouns) for c in captions]
    stem = f"{name}_{job.number}"
    _write_png(job.out_dir / "images" / f"{stem}.png", rgb)
    for noun in dict.fromkeys(n for ns in nouns for n in ns):
        mask = owner == canvas.nouns.index(noun)
        _write_png(job.out_dir / "masks" / stem / f"{noun}.png", mask.astype(np.uint8) * 255)
        _write_png(job.out_dir / "subimages" / stem / f"{noun}_blackbg.png", rgb * mask[..., None])
    return {
        "image": f"images/{stem}.png",
        "label_name": name,
        "label": label,
        "captions": captions,
        "nouns": nouns,
    }


def _apply_terrain(canvas: _Canvas, rng: np.random.Generator) -> tuple[str, ...]:
    """Tint the unnamed ground towards a random terrain colour; return that terrain's caption phrases."""
    color, phrases = TERRAINS[_pick(rng, sorted(TERRAINS))]
    ground = canvas.owner == -1
    canvas.rgb[ground] = 0.35 * canvas.rgb[ground] + 0.65 * np.asarray(color, dtype=np.float32)
    return phrases


def _with_phrase(caption: str, phrase: str) -> str:
    return caption.rstrip(".") + " " + phrase + "."


def _nouns_in(caption: str, nouns: list[str]) -> list[str]:
    """Object nouns that occur as whole words in ``caption``, in order of appearance."""
    found = {}
    for noun in nouns:
        match = re.search(rf"\b{re.escape(noun)}\b", caption.lower())
        if match:
            found[noun] = match.start()
    return sorted(found, key=found.__getitem__)


# ---------------------------------------------------------------------------------------------- drawing


class _Canvas:
    """An RGB float image plus an owner map: pixel -> index into ``nouns`` (-1 = unnamed)."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.rgb = np.zeros((size, size, 3), dtype=np.float32)
        self.owner = np.full((size, size), -1, dtype=np.int16)
        self.nouns: list[str] = []

    def fill(self, color: Color) -> None:
        self.rgb[:] = color

    def layer(self, noun: str | None, jitter: float = 8.0) -> _Layer:
        return _Layer(self, noun, jitter)

    def commit(self, layer: _Layer) -> None:
        index = np.asarray(layer.image, dtype=np.int32)
        where = index > 0
        palette = np.asarray([(0.0, 0.0, 0.0), *layer.colors], dtype=np.float32)
        self.rgb[where] = palette[index[where]]
        if layer.noun is None:
            self.owner[where] = -1
        else:
            if layer.noun not in self.nouns:
                self.nouns.append(layer.noun)
            self.owner[where] = self.nouns.index(layer.noun)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Add lighting and sensor noise, apply a random rotation/flip; return uint8 RGB and owner map."""
        s = self.size
        coarse = Image.fromarray(self.rng.normal(1.0, 0.06, (6, 6)).astype(np.float32), mode="F")
        light = np.asarray(coarse.resize((s, s), Image.Resampling.BILINEAR))[..., None]
        noise = self.rng.standard_normal((s, s, 3), dtype=np.float32) * 3.0
        rgb = np.clip(self.rgb * light + noise, 0, 255).astype(np.uint8)
        k = int(self.rng.integers(4))
        rgb, owner = np.rot90(rgb, k), np.rot90(self.owner, k)
        if self.rng.random() < 0.5:
            rgb, owner = rgb[:, ::-1], owner[:, ::-1]
        return np.ascontiguousarray(rgb), np.ascontiguousarray(owner)


class _Layer:
    """Shapes drawn for one noun; each shape gets its own jittered colour. Paints when the block exits."""

    def __init__(self, canvas: _Canvas, noun: str | None, jitter: float) -> None:
        self.canvas = canvas
        self.noun = noun
        self.jitter = jitter
        self.image = Image.new("I", (canvas.size, canvas.size), 0)
        self.draw = ImageDraw.Draw(self.image)
        self.colors: list[Color] = []

    def __enter__(self) -> _Layer:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.canvas.commit(self)

    def _ink(self, color: Color) -> int:
        shift = self.canvas.rng.normal(0.0, self.jitter, 3)
        self.colors.append(tuple(np.clip(np.asarray(color) + shift, 0, 255)))
        return len(self.colors)

    def polygon(self, points: list[Point], color: Color) -> None:
        self.draw.polygon(points, fill=self._ink(color))

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: Color) -> None:
        self.draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=self._ink(color))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, color: Color) -> None:
        self.draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=self._ink(color))

    def circle(self, cx: float, cy: float, r: float, color: Color) -> None:
        self.ellipse(cx, cy, r, r, color)

    def line(self, points: list[Point], width: float, color: Color) -> None:
        ink = self._ink(color)
        self.draw.line(points, fill=ink, width=max(1, round(width)), joint="curve")
        r = width / 2
        for x, y in (points[0], points[-1]):
            self.draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)


def _place(points: list[Point], cx: float, cy: float, scale: float, angle: float) -> list[Point]:
    """Scale, rotate by ``angle`` (radians) and move a unit shape to ``(cx, cy)``."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in points]


def _box(half_length: float, half_width: float) -> list[Point]:
    return [
        (-half_length, -half_width),
        (half_length, -half_width),
        (half_length, half_width),
        (-half_length, half_width),
    ]


def _shade(color: Color, factor: float) -> Color:
    return (color[0] * factor, color[1] * factor, color[2] * factor)


# ---------------------------------------------------------------------------------------------- words


def _num(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else "many"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _sentence(text: str) -> str:
    return _cap(text.strip()) + "."


def _pl(n: int, singular: str, plural: str) -> str:
    return singular if n == 1 else plural


def _pick(rng: np.random.Generator, options: Sequence[_T]) -> _T:
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------------------------- scenes
# Each scene draws in a fixed orientation (the canvas rotates/flips it afterwards, so captions never
# name absolute directions) and returns the canvas and at least five candidate captions.


def _airport(c: _Canvas) -> tuple[_Canvas, list[str]]:
    rng, s = c.rng, c.size
    c.fill(_pick(rng, [(118, 134, 84), (184, 168, 124)]))
    ry, rw = s * rng.uniform(0.18, 0.32), s * rng.uniform(0.09, 0.13)
    apron_top = ry + rw / 2 + s * 0.07
    term_top = s * rng.uniform(0.78, 0.84)
    with c.layer(None, jitter=3) as lay:
        lay.rect(s * 0.04, apron_top, s * 0.96, s * 0.97, (168, 168, 162))
        lay.rect(s * 0.45, ry, s * 0.52, apron_top, (150, 150, 146))
    with c.layer("runway", jitter=3) as lay:
        lay.rect(-2, ry - rw / 2, s + 2, ry + rw / 2, (74, 74, 78))
        for x in np.arange(s * 0.03, s, s * 0.1):
            lay.rect(x, ry - s * 0.006, x + s * 0.05, ry + s * 0.006, COLORS["white"])
    tcolor = _pick(rng, ["white", "grey", "blue", "red"])
    with c.layer("terminal") as lay:
        x0 = s * rng.uniform(0.1, 0.35)
        lay.rect(x0, term_top, x0 + s * rng.uniform(0.35, 0.55), s * 0.95, COLORS[tcolor])
    n = int(rng.integers(1, 6))
    pcolor = _pick(rng, ["white", "white", "grey", "red", "blue"])
    plane = [(0.5, 0), (0.42, -0.05), (-0.45, -0.04), (-0.5, 0), (-0.45, 0.04), (0.42, 0.05)]
    wings = [
        (0.12, -0.04),
        (-0.12, -0.5),
        (-0.22, -0.5),
        (-0.08, 0),
        (-0.22, 0.5),
        (-0.12, 0.5),
        (0.12, 0.04),
    ]
    tail = [(-0.36, 0), (-0.48, -0.2), (-0.53, -0.2), (-0.47, 0), (-0.53, 0.2), (-0.48, 0.2)]
    length = s * rng.uniform(0.12, 0.15)
    cy = (apron_top + term_top) / 2
    with c.layer(_pl(n, "plane", "planes")) as lay:
        for i in range(n):
            cx = s * (0.12 + 0.76 * (i + 0.5) / n) + rng.uniform(-2, 2)
            angle = -math.pi / 2 + rng.uniform(-0.2, 0.2)
            color = COLORS[pcolor]
            for shape in (wings, tail, plane):
                lay.polygon(_place(shape, cx, cy, length, angle), color)
    planes, are = _pl(n, "plane", "planes"), _pl(n, "is", "are")
    return c, [
        _sentence(f"{_num(n)} {pcolor} {planes} {are} parked near the terminal"),
        _sentence(f"an airport with a long runway and {_num(n)} {planes}"),
        _sentence(f"{_num(n)} {planes} {are} parked on the apron beside the runway"),
        _sentence(f"a long grey runway runs past a {tcolor} terminal"),
        _sentence(f"there {are} {_num(n)} {pcolor} {planes} at the airport"),
        _sentence(f"the {tcolor} terminal building faces {_num(n)} parked {planes}"),
        _sentence(f"an airport runway with white markings next to {_num(n)} {planes}"),
    ]


def _harbor(c: _Canvas) -> tuple[_Canvas, list[str]]:
    rng, s = c.rng, c.size
    c.fill((150, 148, 140))
    wname = _pick(rng, ["blue", "dark blue", "green"])
    water = {"blue": (44, 86, 146), "dark blue": (26, 48, 92), "green": (48, 98, 92)}[wname]
    shore = s * rng.uniform(0.55, 0.68)
    with c.layer("water", jitter=3) as lay:
        lay.rect(-1, -1, s + 1, shore, water)
    with c.layer(None) as lay:
        for x in np.arange(s * 0.05, s * 0.9, s * 0.3):
            lay.rect(x, shore + s * 0.1, x + s * rng.uniform(0.15, 0.25), s * 0.95, (175, 160, 140))
    n_piers = int(rng.integers(1, 4))
    pier_x = [s * (0.15 + 0.7 * (i + 0.5) / n_piers) for i in range(n_piers)]
    pier_top = shore - s * rng.uniform(0.3, 0.45)
    pw = s * 0.025
    with c.layer(_pl(n_piers, "pier", "piers")) as lay:
        for x in pier_x:
            lay.rect(x - pw, pier_top, x + pw, shore + 2, (196, 196, 190))
    docked = bool(rng.random() < 0.6)
    length = s * rng.uniform(0.11, 0.14)
    hw = length * 0.15
    if docked:
        spots = [
            (x + side * (pw + hw + 1), pier_top + length * (0.6 + 1.1 * k), math.pi / 2)
            for x in pier_x
            for side in (-1, 1)
            for k in range(2)
        ]
    else:
        spots = [
            (
                s * (0.1 + 0.2 * i) + (pw * 3 if i % 2 else 0),
                shore * (0.2 + 0.3 * (i % 2)),
                rng.uniform(0, math.pi),
            )
            for i in range(5)
        ]
    order = rng.permutation(len(spots))
    n = int(rng.integers(1, min(6, len(spots)) + 1))
    scolor = _pick(rng, ["white", "red", "orange", "grey"])
    hull = [(0.5, 0), (0.3, -0.15), (-0.5, -0.15), (-0.5, 0.15), (0.3, 0.15)]
    cabin = _box(0.12, 0.08)
    with c.layer(_pl(n, "ship", "ships")) as lay:
        for i in order[:n]:
            x, y, angle = spots[i]
            lay.polygon(_place(hull, x, y, length, angle), COLORS[scolor])
            lay.polygon(_place(cabin, x, y, length, angle), _shade(COLORS[scolor], 0.8))
    ships, piers, are = _pl(n, "ship", "ships"), _pl(n_piers, "pier", "piers"), _pl(n, "is", "are")
    where = f"moored along the {piers}" if docked else f"sailing on the {wname} water"
    return c, [
        _sentence(f"{_num(n)} {scolor} {ships} {are} {where}"),
        _sentence(f"a harbor with {_num(n_piers)} {piers} reaching into the {wname} water"),
        _sentence(f"{_num(n_piers)} {piers} {_pl(n_piers, 'stretches', 'stretch')} into the harbor"),
        _sentence(f"there {are} {_num(n)} {ships} in the harbor"),
        _sentence(f"the {wname} water of the harbor holds {_num(n)} {scolor} {ships}"),
        _sentence(f"{scolor} {ships} {are} {'docked beside' if docked else 'sailing away from'} the {piers}"),
        _sentence(f"a port with {_num(n)} {ships} and {_num(n_piers)} {piers}"),
    ]


def _farmland(c: _Canvas) -> tuple[_Canvas, list[str]]:
    rng, s = c.rng, c.size
    c.fill((122, 96, 66))
    scheme = _pick(rng, ["green", "yellow", "green and yellow", "brown and green"])
    palette = {
        "green": [(72, 132, 56), (96, 150, 64), (58, 112, 48)],
        "yellow": [(212, 188, 84), (196, 170, 70), (224, 204, 110)],
        "green and yellow": [(80, 140, 60), (210, 186, 82)],
        "brown and green": [(140, 104, 68), (82, 138, 60)],
    }[scheme]
    rows, cols = int(rng.integers(2, 4)), int(rng.integers(2, 5))
    road = bool(rng.random() < 0.5)
    road_row = int(rng.integers(1, rows)) if road else -1
    gap, margin = s * 0.02, s * 0.03
    cell_w, cell_h = (s - 2 * margin) / cols, (s - 2 * margin) / rows
    with c.layer("fields", jitter=10) as lay:
        for r in range(rows):
            for k in range(cols):
                x0, y0 = margin + k * cell_w + gap / 2, margin + r * cell_h + gap / 2
                x1, y1 = x0 + cell_w - gap, y0 + cell_h - gap
                base = palette[(r * cols + k + int(rng.integers(2))) % len(palette)]
                lay.rect(x0, y0, x1, y1, base)
                step = s * rng.uniform(0.02, 0.035)
                vertical = rng.random() < 0.5
                for t in np.arange(step, (x1 - x0 if vertical else y1 - y0), step):
                    if vertical:
                        lay.rect(x0 + t, y0, x0 + t + 1, y1, _shade(base, 0.82))
                    else:
                        lay.rect(x0, y0 + t, x1, y0 + t + 1, _shade(base, 0.82))
    if road:
        with c.layer("road", jitter=3) as lay:
            y = margin + road_row * cell_h
            lay.rect(-1, y - s * 0.022, s + 1, y + s * 0.022, (150, 144, 132))
    n = rows * cols
    extra = (
        [
            _sentence(f"a straight road runs between the {scheme} fields"),
            _sentence(f"{_num(n)} fields lie on both sides of a road"),
        ]
        if road
        else [
            _sentence(f"the {scheme} fields are separated by narrow strips of bare soil"),
            _sentence(f"{_num(n)} fields are divided by thin brown lines"),
        ]
    )
    return c, [
        _sentence(f"{_num(n)} {scheme} fields are arranged in neat rows"),
        _sentence(f"farmland divided into {_num(n)} rectangular fields"),
        _sentence(f"many {scheme} fields with striped crops cover the land"),
        _sentence(f"the farmland is a patchwork of {scheme} fields"),
        _sentence(f"there are {_num(n)} {scheme} fields on the farmland"),
        *extra,
    ]


def _residential(c: _Canvas) -> tuple[_Canvas, list[str]]:
    rng, s = c.rng, c.size
    c.fill((104, 140, 80))
    cross = bool(rng.random() < 0.5)
    rw = s * 0.09
    road_y, road_x = s * rng.uniform(0.4, 0.6), s * rng.uniform(0.4, 0.6)
    roads = "roads" if cross else "road"
    with c.layer(roads, jitter=3) as lay:
        lay.rect(-1, road_y - rw / 2, s + 1, road_y + rw / 2, (96, 96, 98))
        if cross:
            lay.rect(road_x - rw / 2, -1, road_x + rw / 2, s + 1, (96, 96, 98))
    rcolor = _pick(rng, ["red", "grey", "brown", "blue", "orange"])
    target = int(rng.integers(3, 11))
    size = s * rng.uniform(0.11, 0.14)
    spots = []
    for x in np.arange(size * 0.8, s - size * 0.8, size * 1.5):
        if cross and abs(x - road_x) < rw / 2 + size * 0.8:
            continue
        for side in (-1, 1):
            spots.append((x, road_y + side * (rw / 2 + size * 0.75)))
    order = rng.permutation(len(spots))[:target]
    n = len(order)
    with c.layer("houses") as lay:
        for i in order:
            x, y = spots[i]
            hw, hh = size / 2 * rng.uniform(0.8, 1.0), size / 2 * rng.uniform(0.6, 0.9)
            roof = COLORS[rcolor]
            lay.rect(x - hw, y - hh, x + hw, y, roof)
            lay.rect(x - hw, y, x + hw, y + hh, _shade(roof, 0.78))
    trees = bool(rng.random() < 0.7)
    if trees:
        with c.layer("trees", jitter=10) as lay:
            for _ in range(int(rng.integers(6, 14))):
                y = road_y + _pick(rng, [-1, 1]) * rng.uniform(rw / 2 + size * 1.6, s * 0.5)
                lay.circle(rng.uniform(0, s), y, s * rng.uniform(0.025, 0.04), (44, 92, 40))
    road_phrase = "two crossing roads" if cross else "a straight road"
    return c, [
        _sentence(f"{_num(n)} houses with {rcolor} roofs line the {roads}"),
        _sentence(f"a residential area with {_num(n)} {rcolor}-roofed houses"),
        _sentence(f"there are {_num(n)} houses beside {road_phrase}"),
        _sentence("green trees grow behind the houses" if trees else "the houses stand on green lawns"),
        _sentence(f"houses with {rcolor} roofs are built along {road_phrase}"),
        _sentence(f"a neighbourhood of {_num(n)} houses {'and some trees' if trees else 'on open grass'}"),
    ]


def _industrial(c: _Canvas) -> tuple[_Canvas, list[str]]:
    rng, s = c.rng, c.size
    c.fill(_pick(rng, [(166, 160, 150), (150, 140, 120)]))
    fcolor = _pick(rng, ["grey", "blue", "white"])
    fw, fh = s * rng.uniform(0.3, 0.4), s * rng.uniform(0.4, 0.7)
    fy = s * rng.uniform(0.05, 0.95 - 0.7)
    road = bool(rng.random() < 0.5)
    with c.layer("factory") as lay:
        lay.rect(s * 0.05, fy, s * 0.05 + fw, fy + fh, COLORS[fcolor])
        for y in np.arange(fy + s * 0.04, fy + fh - s * 0.02, s * 0.06):
            lay.rect(s * 0.08, y, s * 0.02 + fw, y + 2, _shade(COLORS[fcolor], 0.85))
    road_x = s * 0.05 + fw + s * 0.06
    if road:
        with c.layer("road", jitter=3) as lay:
            lay.rect(road_x - s * 0.03, -1, road_x + s * 0.03, s + 1, (92, 92, 94))
    tcolor = _pick(rng, ["white", "grey"])
    r = s * rng.uniform(0.055, 0.075)
    left = road_x + s * 0.04 + r
    spots = [(x, y) for y in np.arange(r * 1.3, s - r, r * 2.4) for x in np.arange(left, s - r, r * 2.4)]
    n = int(rng.integers(1, min(8, len(spots)) + 1))
    tanks = _pl(n, "storage tank", "storage tanks")
    with c.layer(None, jitter=2) as lay:
        for x, y in spots[:n]:
            lay.circle(x + r * 0.25, y + r * 0.25, r, (70, 70, 70))
    with c.layer(tanks, jitter=4) as lay:
        for x, y in spots[:n]:
            lay.circle(x, y, r, COLORS[tcolor])
            lay.circle(x, y, r * 0.7, _shade(COLORS[tcolor], 0.9))
    are = _pl(n, "is", "are")
    return c, [
        _sentence(f"{_num(n)} {tcolor} {tanks} next to a {fcolor} factory"),
        _sentence(f"an industrial area with {_num(n)} round {tanks}"),
        _sentence(f"a large {fcolor} factory stands beside {_num(n)} {tcolor} {tanks}"),
        _sentence(f"there {are} {_num(n)} {tanks} in the industrial area"),
        _sentence(
            f"a road separates the {fcolor} factory from the {tanks}"
            if road
            else f"{_num(n)} circular {tanks} and a {fcolor} factory building"
        ),
        _sentence(f"{tcolor} {tanks} {are} arranged near a large factory"),
    ]


def _river(c: _Canvas) -> tuple[_Canvas, list[str]]:
    rng, s = c.rng, c.size
    c.fill((100, 136, 74))
    rname = _pick(rng, ["blue", "green", "brown"])
    water = {"blue": (46, 86, 142), "green": (58, 100, 84), "brown": (126, 106, 72)}[rname]
    y0, amp, phase = s * rng.uniform(0.4, 0.6), s * rng.uniform(0.03, 0.12), rng.uniform(0, 2 * math.pi)
    width = s * rng.uniform(0.14, 0.24)
    xs = np.linspace(-4, s + 4, 40)
    center = y0 + amp * np.sin(2 * math.pi * xs / s + phase)
    upper = [(float(x), float(y - width / 2)) for x, y in zip(xs, center, strict=True)]
    lower = [(float(x), float(y + width / 2)) for x, y in zip(xs, center, strict=True)]
    with c.layer("river", jitter=3) as lay:
        lay.polygon(upper + lower[::-1], water)
    trees = bool(rng.random() < 0.7)
    nb = int(rng.integers(1, 3))
    bridge_x = [s * (0.2 + 0.6 * (i + rng.uniform(0.3, 0.7)) / nb) for i in range(nb)]
    if trees:
        with c.layer("trees", jitter=10) as lay:
            for _ in range(int(rng.integers(8, 20))):
                x = rng.uniform(0, s)
                if min(abs(x - bx) for bx in bridge_x) < s * 0.08:
                    continue
                side = _pick(rng, [-1, 1])
                y = y0 + amp * math.sin(2 * math.pi * x / s + phase) + side * (width / 2 + s * 0.05)
                lay.circle(x, y, s * rng.uniform(0.025, 0.04), (40, 86, 38))
    bcolor = _pick(rng, ["grey", "white", "red"])
    with c.layer(None, jitter=3) as lay:
        for x in bridge_x:
            lay.rect(x - s * 0.018, -1, x + s * 0.018, s + 1, (150, 140, 120))
    bridges = _pl(nb, "bridge", "bridges")
    with c.layer(bridges, jitter=4) as lay:
        for x in bridge_x:
            y = y0 + amp * math.sin(2 * math.pi * x / s + phase)
            lay.rect(
                x - s * 0.025,
                y - width / 2 - amp - s * 0.04,
                x + s * 0.025,
                y + width / 2 + amp + s * 0.04,
                COLORS[bcolor],
            )
    a_bridge = f"a {bcolor} bridge crosses" if nb == 1 else f"two {bcolor} bridges cross"
    return c, [
        _sentence(f"{a_bridge} the {rname} river"),
        _sentence(f"{_num(nb)} {bridges} {_pl(nb, 'spans', 'span')} the river"),
        _sentence(
            f"green trees line the banks of the {rname} river"
            if trees
            else f"the {rname} river flows through green grassland"
        ),
        _sentence(f"a winding {rname} river is crossed by {_num(nb)} {bridges}"),
        _sentence(f"a {rname} river with {_num(nb)} {bcolor} {bridges} over it"),
        _sentence(
            f"trees grow along the river near the {bridges}"
            if trees
            else f"the river bends under the {bridges}"
        ),
    ]


def _forest(c: _Canvas) -> tuple[_Canvas, list[str]]:
    rng, s = c.rng, c.size
    c.fill((58, 72, 44))
    scheme = _pick(rng, ["dark green", "green", "yellow and orange"])
    palette = {
        "dark green": [(30, 66, 32), (38, 76, 36)],
        "green": [(64, 120, 50), (80, 138, 58)],
        "yellow and orange": [(206, 170, 56), (206, 118, 40)],
    }[scheme]
    with c.layer("trees", jitter=10) as lay:
        for _ in range(int(rng.integers(140, 200))):
            x, y, r = rng.uniform(-5, s + 5), rng.uniform(-5, s + 5), s * rng.uniform(0.03, 0.055)
            color = palette[int(rng.integers(len(palette)))]
            lay.circle(x, y, r, color)
            lay.circle(x - r * 0.25, y - r * 0.25, r * 0.5, _shade(color, 1.15))
    path = bool(rng.random() < 0.5)
    pond = bool(rng.random() < 0.4)
    if path:
        xs = np.linspace(-5, s + 5, 20)
        ys = s * rng.uniform(0.3, 0.7) + s * 0.1 * np.sin(xs / s * 2 * math.pi + rng.uniform(0, 6))
        with c.layer("path", jitter=4) as lay:
            lay.line([(float(x), float(y)) for x, y in zip(xs, ys, strict=True)], s * 0.03, (150, 124, 88))
    if pond:
        with c.layer("pond", jitter=4) as lay:
            x, y = s * rng.uniform(0.25, 0.75), s * _pick(rng, [0.2, 0.8])
            lay.ellipse(x, y, s * 0.12, s * 0.07, (40, 78, 120))
    extra = []
    if path:
        extra.append(_sentence(f"a dirt path winds through the {scheme} trees"))
    if pond:
        extra.append(_sentence(f"a small pond lies among the {scheme} trees"))
    return c, [
        _sentence(f"a dense forest of {scheme} trees"),
        _sentence(f"many {scheme} trees cover the whole area"),
        _sentence(f"the forest is full of trees with {scheme} crowns"),
        _sentence(f"thick {scheme} trees grow close together"),
        _sentence(f"a forest where {scheme} trees form a continuous canopy"),
        *extra,
    ]


def _parking(c: _Canvas) -> tuple[_Canvas, list[str]]:
    rng, s = c.rng, c.size
    c.fill((110, 140, 84))
    rows = int(rng.integers(1, 5))
    row_h = s * 0.17
    lot_h = rows * row_h + s * 0.04
    ly0 = s * rng.uniform(0.05, 0.95) * (1 - lot_h / s)
    lx0, lx1 = s * 0.05, s * rng.uniform(0.8, 0.95)
    stall = s * 0.07
    with c.layer("parking lot", jitter=3) as lay:
        lay.rect(lx0, ly0, lx1, ly0 + lot_h, (72, 74, 78))
        for r in range(rows):
            top = ly0 + s * 0.02 + r * row_h
            for x in np.arange(lx0 + s * 0.02, lx1 - s * 0.02, stall):
                lay.rect(x, top, x + 1, top + row_h * 0.65, COLORS["white"])
    full = bool(rng.random() < 0.5)
    ccolor = _pick(rng, ["white", "red", "blue", "black", "grey"])
    cars = []
    for r in range(rows):
        top = ly0 + s * 0.02 + r * row_h
        for x in np.arange(lx0 + s * 0.02, lx1 - s * 0.02 - stall, stall):
            if rng.random() < (0.9 if full else 0.45):
                color = ccolor if rng.random() < 0.7 else _pick(rng, list(COLORS))
                cars.append((x + stall / 2, top + row_h * 0.33, color))
    if len(cars) < 2:
        cars = [(lx0 + s * 0.02 + stall * (k + 0.5), ly0 + s * 0.02 + row_h * 0.33, ccolor) for k in range(2)]
    n = len(cars)
    with c.layer(_pl(n, "car", "cars")) as lay:
        for x, y, color in cars:
            lay.rect(x - s * 0.021, y - s * 0.045, x + s * 0.021, y + s * 0.045, COLORS[color])
            lay.rect(x - s * 0.016, y - s * 0.022, x + s * 0.016, y - s * 0.008, (30, 32, 36))
    building = bool(rng.random() < 0.5) and ly0 + lot_h < s * 0.72
    bcolor = _pick(rng, ["white", "grey", "brown"])
    if building:
        with c.layer("building") as lay:
            lay.rect(s * 0.15, ly0 + lot_h + s * 0.05, s * 0.75, s * 0.97, COLORS[bcolor])
    row_word = _pl(rows, "row", "rows")
    return c, [
        _sentence(f"{_num(rows)} {row_word} of cars in a parking lot"),
        _sentence(f"a parking lot with {_num(n)} cars, most of them {ccolor}"),
        _sentence(f"cars are parked in {_num(rows)} neat {row_word} in the parking lot"),
        _sentence(f"the parking lot is {'almost full' if full else 'half empty'}"),
        _sentence(
            f"a parking lot next to a {bcolor} building"
            if building
            else f"there are {_num(n)} cars in the large parking lot"
        ),
        _sentence(f"many {ccolor} cars stand in a {'full' if full else 'half empty'} parking lot"),
    ]


_SCENES: dict[str, Callable[[_Canvas], tuple[_Canvas, list[str]]]] = {
    "airport": _airport,
    "harbor": _harbor,
    "farmland": _farmland,
    "residential": _residential,
    "industrial": _industrial,
    "river": _river,
    "forest": _forest,
    "parking": _parking,
}


# ---------------------------------------------------------------------------------------------- files


def _write_png(path: Path, array: np.ndarray) -> None:
    # zlib level 1; Huffman-only coding for RGB is about a third faster on noisy images, same size.
    buffer = io.BytesIO()
    strategy = _Z_HUFFMAN_ONLY if array.ndim == 3 else -1
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1, compress_type=strategy)
    atomic_write(path, buffer.getvalue())


def _write_json(path: Path, data: object) -> None:
    atomic_write(path, json.dumps(data, indent=1) + "\n")
