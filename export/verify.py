"""Parity of an exported tower against the eager PyTorch engine on fixed, seeded inputs.

The artefact is loaded through :func:`mpsclip.engines.load_engine`, as embedding and serving load it, and
compared with the fp32 eager engine (``torch``) on the CPU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from mpsclip.export.onnx import mha_fast_path_disabled
from mpsclip.export.towers import example_input

from mpsclip.engines import Engine, load_engine
from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP

BATCHES = (1, 3)  # two sizes, so that a batch dimension baked in as a constant shows up
SEED = 1234


@dataclass(frozen=True)
class Tolerance:
    min_cosine: float
    max_abs: float | None  # None: not checked (reduced precision)


TOLERANCES = {
    "fp32": Tolerance(min_cosine=0.99999, max_abs=1e-4),
    "fp16": Tolerance(min_cosine=0.999, max_abs=None),
    "bf16": Tolerance(min_cosine=0.999, max_abs=None),
}


def compare(reference: np.ndarray, output: np.ndarray) -> tuple[float, float]:
    """Max absolute error and minimum row-wise cosine similarity of two ``[B, D]`` arrays."""
    if reference.shape != output.shape:
        raise MPSCLIPError(f"exported output has shape {list(output.shape)}, PyTorch gives {list(reference.shape)}")
    output = output.astype(np.float64)
    reference = reference.astype(np.float64)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(output, axis=1)
    cosine = (reference * output).sum(axis=1) / np.maximum(norms, 1e-12)
    return float(np.abs(reference - output).max()), float(cosine.min())


def verification_batches(min_batch: int, max_batch: int) -> tuple[int, ...]:
    """``BATCHES`` moved inside an artefact's ``[min_batch, max_batch]`` range."""
    return tuple(sorted({min(max(b, min_batch), max_batch) for b in BATCHES}))


def seeded_inputs(model: MPSCLIP, tower: str, batches: Sequence[int] = BATCHES) -> list[np.ndarray]:
    """The fixed verification inputs, one array per batch size."""
    return [example_input(model, tower, batch, seed=SEED + batch).numpy() for batch in batches]


def reference_outputs(model: MPSCLIP, tower: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """What the fp32 eager engine gives on the CPU (MultiheadAttention's fused fast path off, as exported)."""
    eager = load_engine("torch", model, "cpu")
    with mha_fast_path_disabled():
        return [getattr(eager, f"encode_{tower}")(torch.from_numpy(x)).numpy() for x in inputs]


def engine_outputs(engine: Engine, tower: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``engine``'s embeddings of ``inputs``, fed as tensors on its device."""
    encode = getattr(engine, f"encode_{tower}")
    return [encode(torch.from_numpy(x).to(engine.device)).cpu().numpy() for x in inputs]


def verify_outputs(
    model: MPSCLIP, tower: str, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], precision: str
) -> dict[str, object]:
    """Compare ``outputs`` (the artefact's, one per input) with the fp32 eager engine; raise if too far.

    Returns the figures for the manifest: ``max_abs``, ``min_cosine``, the batches and the tolerance."""
    max_abs, min_cosine = 0.0, 1.0
    for reference, output in zip(reference_outputs(model, tower, inputs), outputs, strict=True):
        err, cos = compare(reference, np.asarray(output))
        max_abs, min_cosine = max(max_abs, err), min(min_cosine, cos)
    tolerance = TOLERANCES[precision]
    figures = {
        "status": "verified",
        "max_abs": max_abs,
        "min_cosine": min_cosine,
        "batches": [len(batch) for batch in inputs],
        "tolerance": {"min_cosine": tolerance.min_cosine, "max_abs": tolerance.max_abs},
    }
    too_far = tolerance.max_abs is not None and not max_abs <= tolerance.max_abs
    if too_far or not min_cosine >= tolerance.min_cosine:
        raise MPSCLIPError(
            f"{tower} tower: exported {precision} output differs from PyTorch (max abs {max_abs:.3g}, "
            f"min cosine {min_cosine:.7f}; needed max abs <= {tolerance.max_abs}, cosine >= {tolerance.min_cosine}); "
            "nothing was written. Try --precision fp32 or another --format, and report the figures"
        )
    return figures


def verify_engine(
    model: MPSCLIP, tower: str, engine: Engine, precision: str, batches: Sequence[int] = BATCHES
) -> dict[str, object]:
    """Run ``engine`` and the fp32 eager engine on seeded inputs; raise if outside the tolerance."""
    inputs = seeded_inputs(model, tower, batches)
    return verify_outputs(model, tower, inputs, engine_outputs(engine, tower, inputs), precision)


def not_run(reason: str) -> dict[str, object]:
    """Manifest entry for a tower whose verification did not run (never reported as verified)."""
    return {"status": "not-run", "reason": reason}
