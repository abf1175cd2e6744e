"""Evaluation: embed an evaluation set and score retrieval in three modes.

- ``fused``: the authors' retrieval embedding ``normalize(0.5 * (global + regions))``;
- ``global``: the global image embedding alone (no sub-images);
- ``max-response``: score = max over the global embedding and the valid MPR perspectives (an image without
  sub-images has none), as 'mpsclip search' scores a store (:mod:`mpsclip.scoring`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mpsclip.choices import MODES
from mpsclip.data.annotations import EvalImage
from mpsclip.data.collate import collate
from mpsclip.data.datasets import EvalImageDataset
from mpsclip.io import atomic_write
from mpsclip.metrics import chance_r_mean, retrieval_metrics
from mpsclip.model import MPSCLIP
from mpsclip.scoring import mode_views, perspective_validity, similarity

METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


@dataclass
class EvalEmbeddings:
    glob: torch.Tensor  # [I, D]
    retrieval: torch.Tensor  # [I, D]
    perspectives: torch.Tensor  # [I, K, D]
    valid: torch.Tensor  # [I, K] bool: the perspectives of images with sub-images (perspective_validity)
    text: torch.Tensor  # [T, D]
    txt2img: list[int]
    img2txt: list[list[int]]


@torch.no_grad()
def embed_eval_set(
    model: MPSCLIP,
    images: list[EvalImage],
    image_root: str | Path,
    sub_root: str | Path | None,
    batch_size: int = 64,
    num_workers: int = 0,
    max_sub_images: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    skip_bad_images: bool = False,
) -> EvalEmbeddings:
    model.eval()
    dataset = EvalImageDataset(
        images, image_root, sub_root, max_sub_images=max_sub_images, skip_bad_images=skip_bad_images
    )
    if progress and dataset.num_skipped:
        print(f"skipped {dataset.num_skipped} evaluation images that could not be read")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=partial(collate))
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")
    glob, retrieval, views, valid, kept = [], [], [], [], []
    with amp:
        for batch in tqdm(loader, desc="embedding images", unit="batch", disable=not progress, leave=False):
            batch = batch.to(device)
            out = model.embed_all(batch.images, batch.regions, batch.mask)
            glob.append(out["global"].float().cpu())
            retrieval.append(out["retrieval"].float().cpu())
            views.append(out["perspectives"].float().cpu())
            valid.append(perspective_validity(batch.mask, out["perspectives"].shape[1]).cpu())
            kept.extend(batch.image_ids.tolist())
        captions = [c for i in kept for c in images[i].captions]
        text = []
        for start in range(0, len(captions), batch_size):
            tokens = model.tokenize(captions[start : start + batch_size]).to(device)
            text.append(model.encode_text(tokens).float().cpu())
    txt2img, img2txt = [], []
    for row, i in enumerate(kept):
        first = len(txt2img)
        txt2img.extend([row] * len(images[i].captions))
        img2txt.append(list(range(first, len(txt2img))))
    return EvalEmbeddings(
        torch.cat(glob), torch.cat(retrieval), torch.cat(views), torch.cat(valid), torch.cat(text), txt2img, img2txt
    )


def mode_similarity(emb: EvalEmbeddings, mode: str) -> torch.Tensor:
    """[images, texts] scores for one scoring mode (:func:`mpsclip.scoring.similarity`)."""
    columns = {"retrieval": emb.retrieval, "global": emb.glob, "perspectives": emb.perspectives, "valid": emb.valid}
    views, valid = mode_views(columns, mode)
    return similarity(emb.text, views, valid).t()


def score_all_modes(emb: EvalEmbeddings) -> dict[str, dict[str, float]]:
    return {mode: retrieval_metrics(mode_similarity(emb, mode), emb.txt2img, emb.img2txt) for mode in MODES}


def markdown_table(results: dict[str, dict[str, float]], chance: float | None = None) -> str:
    header = "| mode | " + " | ".join(METRIC_KEYS) + " |\n|---|" + "---|" * len(METRIC_KEYS) + "\n"
    rows = "".join(
        f"| {mode} | " + " | ".join(f"{m[k]:.2f}" for k in METRIC_KEYS) + " |\n" for mode, m in results.items()
    )
    tail = f"\nChance level of r_mean: {chance:.2f}\n" if chance is not None else ""
    return header + rows + tail


def write_results(out: Path, results: dict[str, dict[str, float]], n_images: int, n_texts: int) -> tuple[Path, Path]:
    """``<out>.json`` and ``<out>.md`` (the suffixes appended: ``run/last.safetensors.eval`` gives
    ``run/last.safetensors.eval.json``), each written atomically; returns their paths."""
    chance = chance_r_mean(n_images, max(1, round(n_texts / max(1, n_images))))
    payload = {"images": n_images, "texts": n_texts, "chance_r_mean": chance, "modes": results}
    json_path, md_path = out.with_name(f"{out.name}.json"), out.with_name(f"{out.name}.md")
    atomic_write(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write(md_path, markdown_table(results, chance))
    return json_path, md_path
