"""One precision per embedding path (issue 16): which dtype the image tower runs in, and whether the
PyTorch code around it (MPR head, sub-image averaging, zero-shot cutting) runs under ``torch.autocast``.

The rule: the engine's precision rules the whole path. An engine never runs inside an autocast of another
dtype (engines switch any surrounding autocast off for their own call), and the surrounding code runs under
autocast of the engine's dtype exactly when that dtype is not fp32 and the device is a GPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpsclip.engines.base import PRECISION_DTYPES
from mpsclip.errors import MPSCLIPError

DEFAULT_PRECISION = {"torch": "fp32", "optimized": "fp16"}
"""Precision of the model engines when none is asked for (exported engines take their manifest's)."""


@dataclass(frozen=True)
class EmbeddingPrecision:
    precision: str
    dtype: torch.dtype
    autocast: bool
    """Whether the code around the engine runs under ``torch.autocast(device.type, dtype)``."""

    def context(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.autocast)


def embedding_precision(kind: str, device: torch.device | str, requested: str | None = None) -> EmbeddingPrecision:
    """The precision of an embedding path through engine ``kind`` on ``device``.

    ``requested`` is the engine's precision (``Engine.precision`` once loaded; None: the default above).
    The optimized runtime has no reduced precision on the CPU, so it runs fp32 there."""
    device = torch.device(device)
    precision = requested or DEFAULT_PRECISION.get(kind, "fp32")
    if precision not in PRECISION_DTYPES:
        raise MPSCLIPError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_DTYPES)}")
    if kind == "optimized" and device.type != "cuda":
        precision = "fp32"
    dtype = PRECISION_DTYPES[precision]
    return EmbeddingPrecision(precision, dtype, autocast=device.type == "cuda" and precision != "fp32")
