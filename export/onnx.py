"""ONNX export of one tower: dynamic batch axis, L2-normalised float32 output, checked with ``onnx.checker``."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from mpsclip.export.towers import INPUT_NAMES, OUTPUT_NAME, CastBoundary, build_tower, example_input
from torch import nn

from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP

if TYPE_CHECKING:
    import onnx

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
    """Export ``tower`` of ``model`` to ``path`` and run the full ONNX checker on it.

    Reduced-precision graphs get their ``Transpose -> MatMul(weight)`` pairs reordered (see
    ``transpose_after_matmul``) so that onnxruntime's CPU provider can load them."""
    import onnx

    module = tower_module(model, tower, precision)
    name = INPUT_NAMES[tower]
    with torch.no_grad(), mha_fast_path_disabled(), warnings.catch_warnings():
        # open_clip pools the text tower at its EOT token, x[arange(B), tokens.argmax(-1)]: the indices are never
        # negative, the one case torch's warning about exporting advanced indexing is about
        warnings.filterwarnings("ignore", "Exporting aten::index operator of advanced indexing", UserWarning)
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
    if precision != "fp32":
        graph = onnx.load(str(path))
        transpose_after_matmul(graph)
        onnx.save(graph, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise MPSCLIPError(f"{path}: the exported {tower} tower fails the ONNX checker ({err})") from err


def transpose_after_matmul(model: onnx.ModelProto) -> int:
    """Rewrite ``MatMul(Transpose(x), W)`` as ``Transpose(MatMul(x, W))`` for constant 2-D ``W``; returns the count.

    The two are equal when the transpose keeps the last axis in place. onnxruntime 1.32's CPU provider crashes
    (SIGSEGV while creating the session) on float16 graphs where a Transpose that moves the batch axis feeds
    a MatMul with a constant weight: its MatmulTransposeFusion and NchwcTransformer passes collide
    (reproduction: bench/ort_fp16_repro.py). nn.MultiheadAttention's sequence-first projections export
    exactly that pattern; after the rewrite nothing is left for the fusion to take.
    """
    from onnx import helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    nodes, rewritten = [], 0
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type == "MatMul" else None
        perm = _keeps_last_axis_perm(source) if source is not None else None
        weight = weights.get(node.input[1]) if perm is not None else None
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        product = f"{node.output[0]}_untransposed"
        nodes.append(helper.make_node("MatMul", [source.input[0], node.input[1]], [product], name=node.name))
        nodes.append(helper.make_node("Transpose", [product], list(node.output), name=f"{node.name}_T", perm=perm))
        rewritten += 1
    used = {name for node in nodes for name in node.input} | {output.name for output in graph.output}
    del graph.node[:]
    graph.node.extend(n for n in nodes if n.op_type != "Transpose" or any(o in used for o in n.output))
    return rewritten


def _keeps_last_axis_perm(node: onnx.NodeProto) -> list[int] | None:
    """The ``perm`` of a Transpose node that leaves the last axis where it is, else None."""
    if node.op_type != "Transpose":
        return None
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return perm if perm and perm[-1] == len(perm) - 1 else None
