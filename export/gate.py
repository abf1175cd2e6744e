"""The quality gate of a quantized export, run on the staged engine before anything is written (issue 23).

Embedding level, per tower: the minimum cosine between the quantized engine and the fp32 eager engine over the
calibration items and, apart, the held-back ones (never used to calibrate).

Retrieval level: a store of ``store_items`` images (the calibration images, then seeded crops, flips and
quarter turns of them) is searched with ``queries`` captions by both engines; the mean overlap of their
top-``k`` lists (recall@k of the quantized search against the fp32 one) must be at least ``min_overlap``. A
tower that was not quantized runs fp32 on both sides. Given an evaluation file, R@1/5/10 in both directions
must not fall more than ``max_recall_drop`` points below fp32's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mpsclip.export.calibration import CalibrationSet

from mpsclip.data.annotations import load_eval
from mpsclip.data.datasets import read_image
from mpsclip.data.transforms import eval_transform
from mpsclip.engines import Engine, load_engine
from mpsclip.family import RetrievalModel
from mpsclip.metrics import retrieval_metrics

RECALLS = ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10")


@dataclass(frozen=True)
class GateSettings:
    store_items: int = 2000
    queries: int = 100
    k: int = 10
    min_overlap: float = 0.95
    min_cosine: float = 0.95
    """Floor of the embedding-level minimum cosine, per tower (a broken layer shows here first)."""
    max_recall_drop: float = 1.0
    """Points of R@1/5/10 the quantized towers may lose on ``eval_file``."""
    eval_file: Path | None = None
    batch: int = 32
    seed: int = 0


Encode = Callable[[torch.Tensor], torch.Tensor]


def run_gate(
    model: RetrievalModel, engine: Engine, calibration: CalibrationSet, settings: GateSettings
) -> dict[str, Any]:
    """Figures of ``engine`` against the fp32 eager engine; ``passed`` and, when not, ``failures`` say the verdict."""
    reference = load_engine("torch", model, "cpu")
    pairs = {}
    for tower in ("image", "text"):
        fp32 = _encoder(reference, tower, settings.batch)
        pairs[tower] = (fp32, _encoder(engine, tower, settings.batch) if tower in engine.towers else fp32)
    inputs = {"image": calibration.pixels, "text": model.tokenize(calibration.captions)}
    embedded = {tower: _both(pairs[tower], inputs[tower]) for tower in inputs}
    failures: list[str] = []
    embedding = {}
    for tower in sorted(engine.towers):
        figures = _embedding_level(embedded[tower], calibration.split(tower))
        embedding[tower] = figures
        worst = min(figures.values())
        if not worst >= settings.min_cosine:
            failures.append(f"{tower} tower: min cosine to fp32 {worst:.4f} < {settings.min_cosine}")
    retrieval = _retrieval_level(pairs, embedded, calibration.pixels, settings)
    if not retrieval["top_k_overlap"] >= settings.min_overlap:
        failures.append(
            f"top-{settings.k} overlap with fp32 over {retrieval['queries']} queries on {retrieval['store_items']} "
            f"items {retrieval['top_k_overlap']:.4f} < {settings.min_overlap}"
        )
    figures: dict[str, Any] = {"settings": _settings_record(settings), "embedding": embedding, "retrieval": retrieval}
    if settings.eval_file is not None:
        figures["eval"] = _eval_level(pairs, model, settings)
        failures += [
            f"{name} on {settings.eval_file}: {figures['eval']['quantized'][name]:.2f} vs fp32 "
            f"{figures['eval']['fp32'][name]:.2f} (more than {settings.max_recall_drop} points lower)"
            for name, drop in figures["eval"]["drop"].items() if drop > settings.max_recall_drop
        ]
    return {"passed": not failures, "failures": failures, **figures}


def _settings_record(settings: GateSettings) -> dict[str, Any]:
    record = asdict(settings)
    record["eval_file"] = str(settings.eval_file) if settings.eval_file is not None else None
    return record


def _encoder(engine: Engine, tower: str, batch: int) -> Encode:
    encode = getattr(engine, f"encode_{tower}")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([encode(part).float().cpu() for part in x.split(batch)])

    return run


def _embedding_level(embedded: tuple[torch.Tensor, torch.Tensor], split: tuple[list[int], list[int]]
                     ) -> dict[str, float]:
    cosine = F.cosine_similarity(*embedded, dim=-1)
    calibrated, held_back = split
    return {"calibration_min_cosine": round(float(cosine[calibrated].min()), 6),
            "held_back_min_cosine": round(float(cosine[held_back].min()), 6) if held_back else 1.0}


def _store_batches(pixels: torch.Tensor, items: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """The gate's store past ``pixels`` (items ``len(pixels)`` to ``items``): seeded crops, flips and quarter turns
    of them, ``batch`` at a time."""
    gen = torch.Generator().manual_seed(seed)
    size = pixels.shape[-1]
    for start in range(len(pixels), items, batch):
        rows = []
        for index in range(start, min(start + batch, items)):
            image = pixels[index % len(pixels)]
            side = int(size * (0.4 + 0.6 * float(torch.rand((), generator=gen))))
            top, left = (int(torch.randint(0, size - side + 1, (), generator=gen)) for _ in range(2))
            crop = image[:, top : top + side, left : left + side][None]
            image = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
            image = torch.rot90(image, int(torch.randint(0, 4, (), generator=gen)), dims=(1, 2))
            if bool(torch.rand((), generator=gen) < 0.5):
                image = image.flip(-1)
            rows.append(image)
        yield torch.stack(rows)


def _both(pair: tuple[Encode, Encode], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' embeddings of ``x``, computed once when the tower was not quantized (both sides fp32)."""
    first = pair[0](x)
    return first, (first if pair[1] is pair[0] else pair[1](x))


def _retrieval_level(pairs: dict[str, tuple[Encode, Encode]], embedded: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     pixels: torch.Tensor, settings: GateSettings) -> dict[str, Any]:
    """Top-k overlap on the store: the calibration images' embeddings (``embedded``, made once), then the
    augmented items of :func:`_store_batches`."""
    extra = [_both(pairs["image"], b) for b in _store_batches(pixels, settings.store_items, settings.batch,
                                                              settings.seed)]
    store = [torch.cat([side[: settings.store_items], *parts]) for side, parts in
             zip(embedded["image"], zip(*extra, strict=True) if extra else ((), ()), strict=True)]
    queries = [side[: settings.queries] for side in embedded["text"]]
    k = min(settings.k, settings.store_items)
    top = [(text @ images.T).topk(k, dim=1).indices for text, images in zip(queries, store, strict=True)]
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(*top, strict=True)]
    return {"store_items": settings.store_items, "queries": len(queries[0]), "k": k,
            "top_k_overlap": round(float(np.mean(overlap)), 6), "worst_query_overlap": round(float(min(overlap)), 6)}


def _eval_level(pairs: dict[str, tuple[Encode, Encode]], model: RetrievalModel, settings: GateSettings
                ) -> dict[str, Any]:
    path = Path(str(settings.eval_file))
    records = load_eval(path)
    transform = eval_transform(model.image_size)
    captions = [c for r in records for c in r.captions]
    txt2img = [i for i, r in enumerate(records) for _ in r.captions]
    img2txt = [[t for t, i in enumerate(txt2img) if i == image] for image in range(len(records))]
    tokens = model.tokenize(captions)
    scores = {}
    for side, index in (("fp32", 0), ("quantized", 1)):
        images = torch.cat([pairs["image"][index](torch.stack([transform(read_image(path.parent / r.image))
                                                              for r in records[i : i + settings.batch]]))
                            for i in range(0, len(records), settings.batch)])
        metrics = retrieval_metrics(images @ pairs["text"][index](tokens).T, txt2img, img2txt)
        scores[side] = {name: round(metrics[name], 3) for name in RECALLS}
    drop = {name: round(scores["fp32"][name] - scores["quantized"][name], 3) for name in RECALLS}
    return {"file": str(path), "images": len(records), "texts": len(captions), **scores, "drop": drop}
