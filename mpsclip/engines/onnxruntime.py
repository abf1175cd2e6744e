"""An exported ONNX folder run by onnxruntime.

On the CPU the torch tensors are handed to onnxruntime as zero-copy numpy views and its outputs wrapped
back without copies; on a GPU (``CUDAExecutionProvider``, from ``onnxruntime-gpu``) inputs and outputs are
bound to CUDA tensors with I/O binding, so nothing crosses to the host."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mpsclip.engines.base import ExportedEngine, TowerFn

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}
_NUMPY = {torch.float32: np.float32, torch.int64: np.int64}


def availability(device: torch.device) -> str | None:
    """Why onnxruntime cannot run on ``device`` here, or None."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
    if device.type not in PROVIDERS:
        return f"onnxruntime engines run on cpu or cuda, not {device.type}"
    if PROVIDERS[device.type][0] not in onnxruntime.get_available_providers():
        return (
            f"this onnxruntime has no {PROVIDERS[device.type][0]} "
            f"(it has {', '.join(onnxruntime.get_available_providers())}); pip install onnxruntime-gpu"
        )
    return None


class _Session:
    def __init__(self, path: Path, device: torch.device) -> None:
        import onnxruntime as ort

        provider = PROVIDERS[device.type][0]
        options = [{"device_id": device.index or 0}] if device.type == "cuda" else [{}]
        self.session = ort.InferenceSession(str(path), providers=[provider], provider_options=options)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if self.device.type == "cpu":
            out = self.session.run([self.output_name], {self.input_name: x.numpy()})[0]
            return torch.from_numpy(out)
        return self._bound(x)

    def _bound(self, x: torch.Tensor) -> torch.Tensor:
        """Run with inputs and outputs bound to CUDA memory owned by torch (no host copies)."""
        shape = self.session.get_outputs()[0].shape
        out = torch.empty((x.shape[0], int(shape[-1])), dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(self.input_name, "cuda", index, _NUMPY[x.dtype], tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # onnxruntime runs on its own stream
        self.session.run_with_iobinding(binding)
        return out


class OrtEngine(ExportedEngine):
    kind = "onnxruntime"
    availability = staticmethod(availability)

    def load_tower(self, path: Path) -> TowerFn:
        return _Session(path, self.device)
