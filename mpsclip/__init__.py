"""mpsclip: MPS-CLIP (Multi-Perspective Subimage CLIP) for remote-sensing text-image retrieval.

Public API: ``mpsclip.MPSCLIP``, ``mpsclip.PriorCLIP``, ``mpsclip.load_model`` / ``mpsclip.create_model`` (any
family) and ``mpsclip.metrics.retrieval_metrics``. Imported lazily so that the
command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["MPSCLIP", "ModelConfig", "PriorCLIP", "create_model", "load_model", "metrics", "__version__"]

_LAZY = {
    "MPSCLIP": "mpsclip.model",
    "ModelConfig": "mpsclip.model",
    "PriorCLIP": "mpsclip.priorclip",
    "create_model": "mpsclip.factory",
    "load_model": "mpsclip.factory",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "metrics":
        return importlib.import_module("mpsclip.metrics")
    raise AttributeError(f"module 'mpsclip' has no attribute {name!r}")
