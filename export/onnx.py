"""ONNX export of one tower: dynamic batch axis, L2-normalised float32 output, checked with ``onnx.checker``."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from mpsclip.export.towers import INPUT_NAMES, OUTPUT_NAME, CastBoundary, build_tower, example_input
from torch import nn

from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP

OPSET = 17
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def mha_fast_path_disabled() -> Iterator[None]:
    """nn.MultiheadAttention's fused eval kernel has no ONNX/export form; use the plain ops while exporting."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def tower_module(model: MPSCLIP, tower: str, precision: str) -> nn.Module:
    """The float32 tower, or a cast-at-the-boundary copy running in ``precision`` inside."""
    if precision == "fp32":
        return build_tower(model, tower)
    return CastBoundary(build_tower(copy.deepcopy(model), tower), DTYPES[precision]).eval()


def write_onnx(model: MPSCLIP, tower: str, path: Path, precision: str = "fp32") -> None:
    """Export ``tower`` of ``model`` to ``path`` and run the full ONNX checker on it."""
    import onnx

    module = tower_module(model, tower, precision)
    name = INPUT_NAMES[tower]
    with torch.no_grad(), mha_fast_path_disabled():
        torch.onnx.export(
            module,
            (example_input(model, tower, batch=2),),
            str(path),
            input_names=[name],
            output_names=[OUTPUT_NAME],
            dynamic_axes={name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise MPSCLIPError(f"{path}: the exported {tower} tower fails the ONNX checker ({err})") from err
