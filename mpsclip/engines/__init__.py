"""THE seam for everything that turns pixels or tokens into embeddings (issue 12).

``load_engine(kind, source, device)`` returns an :class:`Engine` for one of :data:`mpsclip.choices.ENGINES`:

* ``torch``: the eager model (``source`` a RetrievalModel), fp32 or autocast to ``precision``;
* ``optimized``: ``model.optimize(precision)``, the fast runtime of :mod:`mpsclip.kernels.runtime`;
* ``onnxruntime`` / ``tensorrt`` / ``aoti``: an ``mpsclip export`` folder (``source``), whose manifest.json
  gives the files, precision and batch range, and is refused if ``checkpoint_sha256`` names another checkpoint.

``engine_availability(kind, device)`` says why a kind cannot run here (None if it can), without loading
anything; ``runtime_engine(...)`` is the choice ``mpsclip embed --engine`` makes; ``embedding_precision``
(:mod:`mpsclip.engines.precision`) the one precision of a path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mpsclip.choices import ENGINES, RUNTIMES
from mpsclip.devices import resolve_device
from mpsclip.engines import aoti, onnxruntime, tensorrt
from mpsclip.engines.base import Engine
from mpsclip.engines.eager import EagerEngine
from mpsclip.engines.manifest import read_export
from mpsclip.engines.optimized import OptimizedEngine
from mpsclip.engines.precision import (
    DEFAULT_PRECISION,
    EmbeddingPrecision,
    check_model_precision,
    embedding_precision,
)
from mpsclip.errors import MPSCLIPError
from mpsclip.family import RetrievalModel

__all__ = [
    "ENGINES",
    "EXPORTED",
    "Engine",
    "EmbeddingPrecision",
    "embedding_precision",
    "engine_availability",
    "load_engine",
    "runtime_engine",
]

MODEL_KINDS = ("torch", "optimized")
EXPORTED = ("onnxruntime", "tensorrt", "aoti")
_AVAILABILITY = {"onnxruntime": onnxruntime.availability, "tensorrt": tensorrt.availability, "aoti": aoti.availability}
_EXPORTED_ENGINES = {"onnxruntime": onnxruntime.OrtEngine, "tensorrt": tensorrt.TrtEngine, "aoti": aoti.AotiEngine}


def _check_kind(kind: str) -> None:
    if kind not in ENGINES:
        raise MPSCLIPError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINES)}")


def engine_availability(kind: str, device: str | torch.device = "auto") -> str | None:
    """Why engine ``kind`` cannot run on ``device`` in this environment, or None when it can."""
    _check_kind(kind)
    try:
        resolved = resolve_device(device)
    except MPSCLIPError as err:
        return str(err)
    if kind == "optimized" and resolved.type == "cuda":
        from mpsclip.kernels.g2a import triton

        return None if triton is not None else "Triton is not installed (the fused adapters need it)"
    if kind in MODEL_KINDS:
        return None
    return _AVAILABILITY[kind](resolved)


def load_engine(
    kind: str,
    source: RetrievalModel | str | Path,
    device: str | torch.device = "auto",
    *,
    precision: str | None = None,
    checkpoint_sha256: str | None = None,
) -> Engine:
    """The engine ``kind`` on ``device`` (see the module docstring for ``source``).

    ``precision`` is the model engines' compute precision (None: fp32 for torch, fp16 for optimized; the
    optimized engine takes fp16 or bf16 on a GPU and runs fp32 on the CPU); exported engines run their
    manifest's precision (None) and refuse another one asked for."""
    _check_kind(kind)
    resolved = resolve_device(device)
    if kind in MODEL_KINDS:
        if isinstance(source, (str, Path)):
            raise MPSCLIPError(f"the {kind} engine runs a loaded model, got the path {source}; pass load_model(...)")
        precision = precision or DEFAULT_PRECISION[kind]
        check_model_precision(kind, precision)
        if kind == "torch":
            return EagerEngine(source, resolved, precision)
        return OptimizedEngine(source, resolved, precision)
    if not isinstance(source, (str, Path)):
        raise MPSCLIPError(f"the {kind} engine runs an `mpsclip export` folder; pass its path, not a model")
    reason = engine_availability(kind, resolved)
    if reason is not None:
        raise MPSCLIPError(f"the {kind} engine cannot run on {resolved} here: {reason}")
    export = read_export(source, kind, checkpoint_sha256)
    if precision not in (None, export.precision):
        raise MPSCLIPError(
            f"{source}: exported in {export.precision}, asked for {precision}; "
            f"export again with --precision {precision} or drop the precision"
        )
    return _EXPORTED_ENGINES[kind](export, resolved)


def runtime_engine(
    runtime: str,
    model: RetrievalModel,
    device: torch.device,
    export_dir: Path | None,
    checkpoint_sha256: str,
    precision: str | None = None,
) -> Engine:
    """The image engine of ``mpsclip embed --engine`` (``--engine-dir`` gives ``export_dir``, ``--precision``
    ``precision``: None is the engine's own).

    ``torch`` is the optimized engine in fp16 on a GPU and the eager model in fp32 on the CPU (or the eager
    model in ``precision``); the others load the export folder, which must come from the same checkpoint and,
    when ``precision`` is given, have been exported in it."""
    if runtime not in RUNTIMES:
        raise MPSCLIPError(f"--engine must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        if export_dir is not None:
            raise MPSCLIPError("--engine-dir is only used with --engine onnxruntime or tensorrt; drop it")
        kind = "optimized" if device.type == "cuda" and precision in (None, "fp16", "bf16") else "torch"
        return load_engine(kind, model, device, precision=precision)
    if export_dir is None:
        raise MPSCLIPError(f"--engine {runtime} needs --engine-dir DIR, a folder written by mpsclip export")
    return load_engine(runtime, export_dir, device, precision=precision, checkpoint_sha256=checkpoint_sha256)
