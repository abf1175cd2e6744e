"""MPS-CLIP objective: contrastive (soft targets) + weighted triplet, each with a multi-perspective term.

All functions take features already gathered across processes (see :mod:`mpsclip.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 0.07
    lambda_contrastive: float = 0.2  # weight of the multi-perspective contrastive term
    lambda_triplet: float = 0.2  # weight of the multi-perspective triplet term
    margin: float = 0.2
    gamma: float = 2.0


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, temperature: float | torch.Tensor, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE on ``image · textᵀ / temperature``.

    With ``ids``, pairs sharing an image id are all positives (soft targets normalised per row).
    """
    logits = image @ text.t() / temperature
    if ids is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    positives = (ids.view(-1, 1) == ids.view(1, -1)).to(logits.dtype)
    targets = positives / positives.sum(dim=1, keepdim=True)
    i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
    return 0.5 * (i2t + t2i)


def max_view_scores(views: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Element-wise max over views of ``view · textᵀ``: views [B, K, D], text [T, D] → [B, T]."""
    return torch.einsum("bkd,td->kbt", views, text).amax(dim=0)


def multi_view_contrastive_loss(views: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (diagonal targets, both directions) on max-view logits times ``logit_scale`` (the model's
    already exponentiated scale, :attr:`mpsclip.model.MPSCLIP.logit_scale`)."""
    logits = logit_scale * max_view_scores(views, text)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def weighted_triplet_loss(scores: torch.Tensor, margin: float = 0.2, gamma: float = 2.0) -> torch.Tensor:
    """Hinge costs against the diagonal in both directions, each weighted ``(1 − e^{−c})^γ · c``, summed."""
    diagonal = scores.diag().view(-1, 1)
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_text = (margin + scores - diagonal).clamp(min=0).masked_fill(eye, 0)
    cost_image = (margin + scores - diagonal.t()).clamp(min=0).masked_fill(eye, 0)
    cost_text = (1 - torch.exp(-cost_text)).pow(gamma) * cost_text
    cost_image = (1 - torch.exp(-cost_image)).pow(gamma) * cost_image
    return 0.5 * (cost_text.sum() + cost_image.sum())


def mpsclip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    views: torch.Tensor | None,
    logit_scale: torch.Tensor,
    cfg: LossConfig,
    ids: torch.Tensor | None = None,
    temperature: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``total = contrastive + triplet``; base terms on the global image embedding, multi-perspective terms
    on the MPR ``views`` [B, K, D] (skipped when ``views`` is None, as when a batch has no sub-images)."""
    temperature = cfg.temperature if temperature is None else temperature
    contrastive = contrastive_loss(image, text, temperature, ids)
    triplet = weighted_triplet_loss(image @ text.t(), cfg.margin, cfg.gamma)
    if views is not None:
        contrastive = contrastive + cfg.lambda_contrastive * multi_view_contrastive_loss(views, text, logit_scale)
        triplet = triplet + cfg.lambda_triplet * weighted_triplet_loss(
            max_view_scores(views, text), cfg.margin, cfg.gamma
        )
    return {"contrastive": contrastive, "triplet": triplet, "total": contrastive + triplet}
