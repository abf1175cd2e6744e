"""Retrieval metrics in the usual RSITR protocol (R@1/5/10 both directions and their mean, in percent)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

KS = (1, 5, 10)


def _as_numpy(sim: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(sim, torch.Tensor):
        return sim.detach().float().cpu().numpy()
    return np.asarray(sim, dtype=np.float64)


def retrieval_metrics(
    sim: torch.Tensor | np.ndarray, txt2img: Sequence[int], img2txt: Sequence[Sequence[int]]
) -> dict[str, float]:
    """``sim`` [images, texts]; ``txt2img[t]`` is text t's image; ``img2txt[i]`` lists image i's texts.

    Image→text rank is the best rank among the image's captions; text→image rank is that of its one image.
    Returns ``txt_r1/5/10`` (image→text), ``img_r1/5/10`` (text→image) and ``r_mean``.
    """
    scores = _as_numpy(sim)
    n_images, n_texts = scores.shape
    if len(txt2img) != n_texts or len(img2txt) != n_images:
        raise ValueError(
            f"sim is {n_images}x{n_texts} but txt2img has {len(txt2img)} entries and img2txt {len(img2txt)}"
        )
    img_rank = np.empty(n_images)
    order = np.argsort(-scores, axis=1, kind="stable")
    for i in range(n_images):
        positions = np.nonzero(np.isin(order[i], list(img2txt[i])))[0]
        img_rank[i] = positions.min() if len(positions) else n_texts
    txt_rank = np.empty(n_texts)
    order_t = np.argsort(-scores.T, axis=1, kind="stable")
    for t in range(n_texts):
        txt_rank[t] = np.nonzero(order_t[t] == txt2img[t])[0][0]
    out = {f"txt_r{k}": 100.0 * float(np.mean(img_rank < k)) for k in KS}
    out.update({f"img_r{k}": 100.0 * float(np.mean(txt_rank < k)) for k in KS})
    out["r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in KS] + [out[f"img_r{k}"] for k in KS]))
    return out


def chance_r_mean(n_images: int, captions_per_image: int) -> float:
    """Expected ``r_mean`` of random scores, for reporting next to a trained model's."""
    n_texts = n_images * captions_per_image
    txt = [1 - np.prod([(n_texts - captions_per_image - j) / (n_texts - j) for j in range(k)]) for k in KS]
    img = [min(k, n_images) / n_images for k in KS]
    return float(100.0 * np.mean(txt + img))
