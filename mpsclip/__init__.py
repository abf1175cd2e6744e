"""mpsclip: MPS-CLIP (Multi-Perspective Subimage CLIP) for remote-sensing text-image retrieval.

Public API: ``mpsclip.MPSCLIP``, ``mpsclip.PriorCLIP``, ``mpsclip.load_model`` / ``mpsclip.create_model`` (any
family) and ``mpsclip.metrics.retrieval_metrics``. Imported lazily so that the
command line starts fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
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


# mpsclip.kernels / .export / .serve / .bench live in top-level folders of the repository (pyproject's
# package-dir). An install maps them; a plain checkout on sys.path (PYTHONPATH=., python -m from the repo root)
# does not, so this finder maps them there. It is asked last, after any installed or editable-install finder.
CHECKOUT_PACKAGES = ("kernels", "export", "serve", "bench")


class CheckoutFinder:
    """Finds ``mpsclip.<name>`` for the names in ``CHECKOUT_PACKAGES`` in the folder ``<root>/<name>``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        package, _, name = fullname.partition(".")
        init = self.root / name / "__init__.py"
        if package != __name__ or name not in CHECKOUT_PACKAGES or not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def _checkout_root() -> Path | None:
    """The repository root when this package is imported from a source checkout, else None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "kernels" / "__init__.py").is_file() else None


if (_root := _checkout_root()) is not None and not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
    sys.meta_path.append(CheckoutFinder(_root))
