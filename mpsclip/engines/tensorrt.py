"""An exported TensorRT folder (``.plan`` engines, TensorRT 10 API) run on CUDA tensors.

Inputs and outputs are bound to torch CUDA memory and the engine is enqueued on torch's current stream,
so a batch never leaves the GPU and stream order makes the result safe to use without a host sync.
Never exercised in this project's CI (no GPU, no TensorRT); see ``python -m mpsclip.bench.gpu``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mpsclip.engines.base import ExportedEngine, TowerFn
from mpsclip.errors import MPSCLIPError


def availability(device: torch.device) -> str | None:
    """Why TensorRT cannot run on ``device`` here, or None."""
    if device.type != "cuda":
        return f"TensorRT engines run on a CUDA GPU, not {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install 'mpsclip[gpu]')"
    return None


class _Plan:
    def __init__(self, path: Path, device: torch.device) -> None:
        import tensorrt as trt

        with torch.cuda.device(device):
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine: Any = runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise MPSCLIPError(f"{path}: not a TensorRT engine for this TensorRT version and GPU; rebuild it here")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise MPSCLIPError("TensorRT failed to run the engine (see its log above)")
        return out


class TrtEngine(ExportedEngine):
    kind = "tensorrt"
    availability = staticmethod(availability)

    def load_tower(self, path: Path) -> TowerFn:
        return _Plan(path, self.device)
