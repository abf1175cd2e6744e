"""Static int8 quantization of an exported ONNX tower: QDQ nodes from ``onnxruntime.quantization``, calibrated
on real items (issue 23).

Weights are int8 per output channel, activations uint8 (the x86 u8s8 kernels), ranges from min/max over the
calibration batches. Only ``MatMul``/``Gemm``/``Conv`` with a constant weight are quantized; what loses
accuracy stays float32, in two groups:

* always: LayerNorm, softmax and attention's activation-by-activation products (``ALWAYS_FP32``);
* when the quality gate demands it (:data:`PLANS`, tried in order): the G²A adapters' gated ``up_proj`` and the
  final projection (``FRAGILE``).

:func:`quantize_tower` says which nodes of each class it kept float32, for the export's manifest. The same QDQ
graph is what TensorRT builds int8 engines from (explicit quantization) and what onnxruntime's CUDA provider
runs; neither has been run in this project yet (no GPU), see ``export.tensorrt``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpsclip.errors import MPSCLIPError

if TYPE_CHECKING:
    import onnx

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
ALWAYS_FP32 = ("layernorm", "softmax", "attention")
FRAGILE = ("g2a_gate", "projection")
PLANS: tuple[tuple[str, ...], ...] = ((), FRAGILE)
"""The fragile classes kept float32, per attempt: first everything quantized, then the gate and projection kept."""
PROJECTION_WEIGHTS = ("visual.proj", "text_projection")
CALIBRATION_BATCH = 8


def node_classes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node names per class: ``layernorm``, ``softmax``, ``attention`` (a MatMul of two activations), ``g2a_gate``
    (the G²A adapters' gated ``up_proj``), ``projection`` (the final projection) and ``quantizable`` (the rest of
    the MatMul/Gemm/Conv nodes with a constant weight)."""
    weights = {init.name for init in model.graph.initializer}
    classes: dict[str, list[str]] = {name: [] for name in (*ALWAYS_FP32, *FRAGILE, "quantizable")}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            classes["layernorm"].append(node.name)
        elif node.op_type == "Softmax":
            classes["softmax"].append(node.name)
        elif node.op_type in QUANTIZED_OPS:
            weight = node.input[1] if len(node.input) > 1 else ""
            if weight not in weights:
                classes["attention"].append(node.name)
            elif weight.endswith(PROJECTION_WEIGHTS):
                classes["projection"].append(node.name)
            elif "g2adapter" in node.name and "up_proj" in node.name:
                classes["g2a_gate"].append(node.name)
            else:
                classes["quantizable"].append(node.name)
    return classes


class _Batches:
    """onnxruntime's ``CalibrationDataReader``: the calibration inputs in batches of ``CALIBRATION_BATCH``."""

    def __init__(self, input_name: str, inputs: np.ndarray) -> None:
        self.input_name = input_name
        self.inputs = inputs
        self.batches: Iterator[np.ndarray] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        step = CALIBRATION_BATCH
        self.batches = iter([self.inputs[i : i + step] for i in range(0, len(self.inputs), step)])


def quantize_tower(
    fp32_path: Path,
    out_path: Path,
    inputs: np.ndarray,
    keep_fp32: Sequence[str] = (),
    overrides: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Write the int8 QDQ form of the float32 ONNX tower ``fp32_path`` to ``out_path``, calibrated on ``inputs``
    (pixels or tokens, ``[N, ...]``), keeping float32 the :data:`ALWAYS_FP32` classes and ``keep_fp32`` (some of
    :data:`FRAGILE`). ``overrides`` are onnxruntime ``TensorQuantOverrides`` (fixed scales; tests use them).

    Returns the manifest record: nodes quantized and the names kept float32, per class."""
    import onnx

    unknown = [name for name in keep_fp32 if name not in FRAGILE]
    if unknown:
        raise MPSCLIPError(f"keep_fp32 {unknown}: choose among {', '.join(FRAGILE)}")
    if len(inputs) == 0:
        raise MPSCLIPError(f"{fp32_path}: no calibration items; give --calibration DIR|FILE with a few hundred")
    model = onnx.load(str(fp32_path))
    classes = node_classes(model)
    kept = (*ALWAYS_FP32, *keep_fp32)
    quantize = classes["quantizable"] + [n for c in FRAGILE if c not in keep_fp32 for n in classes[c]]
    extra: dict[str, Any] = {"MatMulConstBOnly": True, "ActivationSymmetric": False, "WeightSymmetric": True}
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime's advice goes to the root logger, as warnings
    try:
        _quantize_static(model, out_path, inputs, quantize, extra)
    finally:
        root.setLevel(level)
    return {
        "method": "static QDQ (onnxruntime.quantization), MinMax calibration, int8 weights per channel, "
        "uint8 activations",
        "quantized_nodes": len(quantize),
        "kept_fp32": {c: classes[c] if c in FRAGILE else len(classes[c]) for c in kept},
    }


def _quantize_static(model: onnx.ModelProto, out_path: Path, inputs: np.ndarray, quantize: list[str],
                     extra: dict[str, Any]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        model,
        str(out_path),
        _Batches(model.graph.input[0].name, inputs),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=quantize,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options=extra,
    )

