"""Multi-Perspective Representation (MPR) head: k projections of one embedding, each L2-normalised."""

from __future__ import annotations

import torch
from torch import nn


def l2_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x / (||x|| + eps)`` along the last axis (the authors' normalisation inside the MPR head)."""
    return x / (x.norm(dim=-1, keepdim=True) + eps)


class MPRHead(nn.Module):
    """``k`` heads ``Linear(d, d) → GELU → Linear(d, d)``; Xavier-uniform weights, zero biases."""

    def __init__(self, dim: int = 512, k: int = 4) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)) for _ in range(k))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, d] → perspectives [B, k, d]."""
        return torch.stack([l2_normalize(head(x)) for head in self.heads], dim=1)
