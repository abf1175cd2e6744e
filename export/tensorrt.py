"""Building TensorRT engines from the float32 ONNX towers (TensorRT 10 Python API); needs an NVIDIA GPU.

Running them is :mod:`mpsclip.engines.tensorrt`."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from mpsclip.errors import MPSCLIPError

WORKSPACE_BYTES = 4 << 30


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or a clear error naming what is missing."""
    try:
        import tensorrt
    except ImportError as err:
        raise MPSCLIPError(
            "TensorRT export needs the `tensorrt` package: pip install 'mpsclip[gpu]' (on a machine with an NVIDIA GPU)"
        ) from err
    if not torch.cuda.is_available():
        raise MPSCLIPError("TensorRT export needs an NVIDIA CUDA GPU, and none is visible to PyTorch here")
    return tensorrt


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    precision: str,
    batches: tuple[int, int, int],
    timing_cache: Path,
) -> None:
    """Parse ``onnx_path`` and write a serialised engine with one profile (min, opt, max) over the batch axis."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MPSCLIPError(f"{onnx_path}: TensorRT cannot parse it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision in ("int8", "fp8"):  # explicit quantization: onnx_path is a QDQ graph (export.quantize); unverified
        config.set_flag(trt.BuilderFlag.INT8 if precision == "int8" else trt.BuilderFlag.FP8)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    tensor = network.get_input(0)
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, *[(b, *tuple(tensor.shape)[1:]) for b in batches])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MPSCLIPError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    plan_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))

