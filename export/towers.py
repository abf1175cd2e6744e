"""Exportable single-tower modules: each maps one input tensor to L2-normalised embeddings ``[B, D]``.

The G²A adapters run through forward hooks on open_clip's residual blocks, so tracing the tower follows them.
"""

from __future__ import annotations

import torch
from torch import nn

from mpsclip.model import MPSCLIP
from mpsclip.triton_config import INPUT_NAMES, OUTPUT_NAME  # noqa: F401  (the towers' tensor names, defined once)

TOWERS = ("image", "text")


class ImageTower(nn.Module):
    """``pixels`` [B, 3, H, W] float (CLIP-normalised) → global embedding [B, D], L2-normalised."""

    def __init__(self, model: MPSCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class TextTower(nn.Module):
    """``tokens`` [B, context_length] int64 (open_clip tokenizer; 77 for CLIP) → embedding [B, D], L2-normalised."""

    def __init__(self, model: MPSCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


class CastBoundary(nn.Module):
    """Runs a half/bfloat16 tower behind float32 inputs and outputs (integer inputs pass unchanged)."""

    def __init__(self, tower: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.tower = tower.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            x = x.to(self.dtype)
        return self.tower(x).float()


def build_tower(model: MPSCLIP, name: str) -> nn.Module:
    """The eval-mode float32 tower ``name`` ("image" or "text") of ``model``."""
    if name == "image":
        return ImageTower(model).eval()
    if name == "text":
        return TextTower(model).eval()
    raise ValueError(f"unknown tower {name!r}")


def example_input(model: MPSCLIP, name: str, batch: int, seed: int = 0) -> torch.Tensor:
    """Fixed random input for tower ``name``: normal pixels, or token rows with SOT, words and EOT."""
    gen = torch.Generator().manual_seed(seed)
    if name == "image":
        size = model.image_size
        return torch.randn(batch, 3, size, size, generator=gen)
    vocab, context = int(model.clip.vocab_size), context_length(model)
    tokens = torch.zeros(batch, context, dtype=torch.int64)
    for row in range(batch):
        length = int(torch.randint(1, context - 1, (1,), generator=gen))  # words; SOT and EOT fit
        tokens[row, 0] = vocab - 2
        tokens[row, 1 : length + 1] = torch.randint(1, vocab - 2, (length,), generator=gen)
        tokens[row, length + 1] = vocab - 1
    return tokens


def input_shape(model: MPSCLIP, name: str) -> list[int | str]:
    """Symbolic input shape, ``"batch"`` for the dynamic axis."""
    if name == "image":
        return ["batch", 3, model.image_size, model.image_size]
    return ["batch", context_length(model)]


def context_length(model: MPSCLIP) -> int:
    return int(model.clip.context_length)
