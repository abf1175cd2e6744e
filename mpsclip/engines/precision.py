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
QUANTIZED = ("int8",)
"""Precisions only exported towers have (``mpsclip export --precision int8``), never a model engine."""


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
    return EmbeddingPrecision(precision, dtype, autocast=device.type == "cuda" and dtype != torch.float32)


def check_model_precision(kind: str, precision: str) -> None:
    """Refuse a quantized precision for a model engine (``torch``, ``optimized``): it needs an export."""
    if precision in QUANTIZED:
        raise MPSCLIPError(
            f"the {kind} engine runs the model as it is; {precision} towers come from "
            f"'mpsclip export --format onnx --precision {precision}', run with --engine onnxruntime --engine-dir DIR"
        )


def precision_note(store: str | None, query: str) -> str | None:
    """The line said when a query is encoded at another precision than the store's items (allowed: one space)."""
    store = store or "fp32"
    if store == query:
        return None
    return (
        f"note: this store was embedded at {store}, queries are encoded at {query}: the same embedding space, "
        "so results stand, but scores can differ slightly from a same-precision query"
    )
