"""Which engine runs the image tower while embedding an archive (``--runtime``).

* ``torch``: the model itself; on a CUDA device the fast runtime (:func:`mpsclip.kernels.optimize`: fused
  adapters, compiled towers, CUDA graphs, fp16), on the CPU the eager model in fp32;
* ``onnxruntime`` / ``tensorrt``: the ``image_encoder`` of a folder written by ``mpsclip-export`` (``--engine``),
  refused unless its ``manifest.json`` names the same checkpoint (sha256) and the matching format.

Sub-image averaging, the MPR head and zero-shot keywords always run in PyTorch on the embedding device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpsclip.errors import MPSCLIPError
from mpsclip.model import ImageEncoder

RUNTIMES = ("torch", "onnxruntime", "tensorrt")
_ENGINE_SUFFIX = {"onnxruntime": ".onnx", "tensorrt": ".plan"}


def engine_file(engine: Path, runtime: str, checkpoint_sha256: str) -> Path:
    """The image tower of the export folder ``engine``, checked against the checkpoint and ``runtime``."""
    manifest_path = engine / "manifest.json"
    if not manifest_path.is_file():
        raise MPSCLIPError(f"--engine {engine}: no manifest.json; pass a folder written by mpsclip-export")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    exported = manifest.get("checkpoint", {}).get("sha256")
    if exported != checkpoint_sha256:
        raise MPSCLIPError(
            f"--engine {engine}: exported from another checkpoint (sha256 {str(exported)[:12]}, "
            f"--checkpoint has {checkpoint_sha256[:12]}); export this checkpoint with mpsclip-export"
        )
    tower = manifest.get("towers", {}).get("image")
    suffix = _ENGINE_SUFFIX[runtime]
    if tower is None or not str(tower.get("file", "")).endswith(suffix):
        raise MPSCLIPError(
            f"--engine {engine}: has no {suffix} image tower for --runtime {runtime}; "
            f"export one with: mpsclip-export CHECKPOINT --format {'onnx' if runtime == 'onnxruntime' else runtime}"
        )
    return engine / tower["file"]


def _numpy_engine(encoder: Any, device: torch.device) -> ImageEncoder:
    """Wrap an exported-engine encoder (numpy float32 in and out) as an :data:`ImageEncoder`."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        out = encoder(np.ascontiguousarray(images.float().cpu().numpy()))
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(device)

    return encode


def image_encoder(
    model: Any, runtime: str, device: torch.device, engine: Path | None, checkpoint_sha256: str
) -> ImageEncoder:
    """The image tower for ``runtime`` (see the module docstring)."""
    if runtime not in RUNTIMES:
        raise MPSCLIPError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        if engine is not None:
            raise MPSCLIPError("--engine is only used with --runtime onnxruntime or tensorrt; drop it")
        if device.type == "cuda" and hasattr(model, "optimize"):
            return model.optimize(precision="fp16").encode_image
        return model.encode_image
    if engine is None:
        raise MPSCLIPError(f"--runtime {runtime} needs --engine DIR, a folder written by mpsclip-export")
    path = engine_file(engine, runtime, checkpoint_sha256)
    if runtime == "onnxruntime":
        from mpsclip.export.ort import OrtEncoder

        return _numpy_engine(OrtEncoder(path), device)
    if device.type != "cuda":
        raise MPSCLIPError("--runtime tensorrt needs a CUDA GPU (--device cuda)")
    from mpsclip.export.tensorrt import TrtEncoder

    return _numpy_engine(TrtEncoder(path), device)
