"""Minimal reproduction: onnxruntime's CPU provider crashes creating a session for a valid float16 graph.

    python -m mpsclip.bench.ort_fp16_repro

The graph is two nodes, ``y = MatMul(Transpose(x, perm=[1, 0, 2]), W)`` with a constant ``W``, checked by
``onnx.checker`` (full check). With onnxruntime 1.32.0 (CPU, x86-64) the session dies with SIGSEGV at
``ORT_ENABLE_ALL`` (the default) in float16 only, unless the transpose keeps the batch axis (perm [0, 2, 1]),
or MatmulTransposeFusion or NchwcTransformer is disabled. ``nn.MultiheadAttention``'s sequence-first
projections export this pattern, so every fp16 CLIP tower hit it; ``mpsclip.export.onnx.transpose_after_matmul``
rewrites it away. Each case runs in a child process; the table shows how each one ended.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from mpsclip.export.aoti import describe_exit
from onnx import helper, numpy_helper

SESSION = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, sys.argv[2])
disabled = [name for name in sys.argv[3].split(",") if name]
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
x = session.get_inputs()[0]
shape = [2 if isinstance(d, str) else d for d in x.shape]
print(session.run(None, {x.name: np.ones(shape, np.float16 if "16" in x.type else np.float32)})[0].shape)
"""

CASES = (  # name, dtype, perm, optimisation level, disabled optimizers
    ("fp16, perm [1,0,2]", np.float16, (1, 0, 2), "ORT_ENABLE_ALL", ""),
    ("fp32, perm [1,0,2]", np.float32, (1, 0, 2), "ORT_ENABLE_ALL", ""),
    ("fp16, perm [0,2,1] (batch stays)", np.float16, (0, 2, 1), "ORT_ENABLE_ALL", ""),
    ("fp16, ORT_ENABLE_LAYOUT", np.float16, (1, 0, 2), "ORT_ENABLE_LAYOUT", ""),
    ("fp16, no MatmulTransposeFusion", np.float16, (1, 0, 2), "ORT_ENABLE_ALL", "MatmulTransposeFusion"),
    ("fp16, no NchwcTransformer", np.float16, (1, 0, 2), "ORT_ENABLE_ALL", "NchwcTransformer"),
)


def transpose_matmul(dtype: type, perm: tuple[int, int, int], width: int = 64, out: int = 192) -> onnx.ModelProto:
    """``MatMul(Transpose(x, perm), W)``; ``x`` is shaped so that the transposed tensor is [batch, 32, width]."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    transposed = ["batch", 32, width]
    shape: list[int | str] = [0, 0, 0]
    for axis, source in enumerate(perm):
        shape[source] = transposed[axis]
    weight = (0.02 * np.random.default_rng(0).standard_normal((width, out))).astype(dtype)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=list(perm)), helper.make_node("MatMul", ["t", "w"], ["y"])],
        "transpose_matmul",
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, ["batch", 32, out])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}\n")
    print("| case | session + run |\n|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype, perm, level, disabled in CASES:
            path = Path(tmp) / "case.onnx"
            onnx.save(transpose_matmul(dtype, perm), path)
            done = subprocess.run([sys.executable, "-c", SESSION, str(path), level, disabled], capture_output=True)
            print(f"| {name} | {'ok' if done.returncode == 0 else describe_exit(done.returncode)} |")


if __name__ == "__main__":
    main()
