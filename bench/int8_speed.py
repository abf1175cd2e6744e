"""Why an int8 tower is as fast as it is on this CPU: quantization variants of one fp32 ONNX tower timed in
interleaved rounds, kernel time per operator type (onnxruntime's profiler), and the int8 GEMM kernels alone
against the fp32 one at the towers' shapes (issue 23).

Variants (the nodes :func:`mpsclip.export.quantize.node_classes` calls quantizable, gate and projection):

* ``qdq``: what ``mpsclip export --precision int8`` writes: static QDQ, int8 weights per channel, uint8
  activations, outputs quantized too (onnxruntime fuses them into QLinearMatMul / QGemm / QLinearConv);
* ``qdq-float-out``: the same without quantizing MatMul outputs (fused into MatMulIntegerToFloat);
* ``dynamic``: onnxruntime's dynamic quantization (activations quantized at run time, DynamicQuantizeMatMul).

Each is written to ``--work`` as ``{tower}-{variant}.onnx`` and reused from there when present. Writes
OUT/results.json and OUT/results.md.

example:
  python -m mpsclip.bench.int8_speed --onnx image=exports/onnx/image_encoder.onnx \\
      --onnx text=exports/onnx/text_encoder.onnx --work /tmp/int8-speed --out bench-int8-speed
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mpsclip.bench.report import cpu_model, load_average
from mpsclip.export.quantize import QUANTIZED_OPS, _Batches, node_classes

from mpsclip.io import atomic_write

SCHEMA = "mpsclip-bench-int8-speed/1"
VARIANTS = ("qdq", "qdq-float-out", "dynamic")
BATCH = 8
GEMM_SHAPES = {"image": ((400, 768, 768), (400, 768, 3072), (400, 3072, 768)),
               "text": ((616, 512, 512), (616, 512, 2048), (616, 2048, 512))}
"""[M, K] x [K, N] of the towers' linear layers at batch 8 (50 and 77 tokens)."""
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_flags() -> dict[str, bool]:
    flags = set()
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {flag: flag in flags for flag in CPU_FLAGS}


def tower_input(fp32: Path, rng: np.random.Generator) -> np.ndarray:
    """A batch of ``BATCH`` for the tower in ``fp32``: pixels, or 20-token captions padded to its context length."""
    import onnx

    graph_input = onnx.load(str(fp32), load_external_data=False).graph.input[0]
    shape = [BATCH, *(d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:])]
    if graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
        return rng.standard_normal(shape).astype(np.float32)
    tokens = np.zeros(shape, dtype=np.int64)
    tokens[:, :20] = rng.integers(1, 49000, (BATCH, 20))
    tokens[:, 20] = 49407
    return tokens


def make_variant(fp32: Path, out: Path, variant: str, calibration: np.ndarray) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    classes = node_classes(onnx.load(str(fp32)))
    nodes = classes["quantizable"] + classes["g2a_gate"] + classes["projection"]
    logging.getLogger().setLevel(logging.ERROR)
    if variant == "dynamic":
        quantize_dynamic(fp32, out, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_quantize=nodes, extra_options={"MatMulConstBOnly": True})
        return
    extra: dict[str, Any] = {"MatMulConstBOnly": True, "ActivationSymmetric": False, "WeightSymmetric": True}
    if variant == "qdq-float-out":
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    model = onnx.load(str(fp32))
    quantize_static(model, str(out), _Batches(model.graph.input[0].name, calibration), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax,
                    extra_options=extra)


def session(path: Path | bytes, profile: str | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile is not None:
        options.enable_profiling, options.profile_file_prefix = True, profile
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                providers=["CPUExecutionProvider"])


def interleaved(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, float]]:
    """p50 and min ms of each call, timed in rounds that call each once (the order rotating), after two calls."""
    for call in calls.values():
        call(), call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(1000 * (time.perf_counter() - start))
    return {n: {"p50_ms": round(statistics.median(t), 2), "min_ms": round(min(t), 2)} for n, t in times.items()}


def tower_timing(paths: dict[str, Path], x: np.ndarray, rounds: int, work: Path) -> dict[str, Any]:
    """Interleaved timing and kernel ms per operator type of each variant (profiled sessions, same rounds)."""
    sessions = {name: session(path, str(work / f"profile-{name}")) for name, path in paths.items()}
    calls = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for name, s in sessions.items()}
    timing = interleaved(calls, rounds)
    out = {}
    for name, s in sessions.items():
        events = json.loads(Path(s.end_profiling()).read_text())
        kernels: collections.Counter[str] = collections.Counter()
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                kernels[event["args"]["op_name"]] += event["dur"] / 1000 / (rounds + 2)
        out[name] = {**timing[name], "ratio_to_fp32_p50": round(timing["fp32"]["p50_ms"] / timing[name]["p50_ms"], 3),
                     "kernel_ms_per_op": {op: round(ms, 2) for op, ms in kernels.most_common()}}
    return out


def gemm_timing(shape: tuple[int, int, int], rounds: int) -> dict[str, Any]:
    """fp32 MatMul against QLinearMatMul and MatMulInteger (u8 activations, s8 weights) on one [M,K]x[K,N]."""
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = shape
    rng = np.random.default_rng(0)

    def model(nodes: list, inits: list, dtype: int) -> bytes:
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        return proto.SerializeToString()

    weight = numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), "w")
    quantized = [numpy_helper.from_array(rng.integers(-100, 100, (k, n)).astype(np.int8), "wq"),
                 numpy_helper.from_array(np.array(0, np.uint8), "xz"),
                 numpy_helper.from_array(np.array(0, np.int8), "wz"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "s")]
    qlinear = [helper.make_node("QLinearMatMul", ["x", "s", "xz", "wq", "s", "wz", "s", "xz"], ["q"]),
               helper.make_node("DequantizeLinear", ["q", "s", "xz"], ["y"])]
    x32, x8 = rng.standard_normal((m, k)).astype(np.float32), rng.integers(0, 255, (m, k)).astype(np.uint8)
    forms = {
        "fp32 MatMul": (model([helper.make_node("MatMul", ["x", "w"], ["y"])], [weight], TensorProto.FLOAT), x32),
        "QLinearMatMul u8s8": (model(qlinear, quantized, TensorProto.UINT8), x8),
        "MatMulInteger u8s8": (model([helper.make_node("MatMulInteger", ["x", "wq", "xz", "wz"], ["i"]),
                                      helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)],
                                     quantized, TensorProto.UINT8), x8),
    }
    sessions = {name: (session(proto), x) for name, (proto, x) in forms.items()}
    timing = interleaved({name: (lambda s=s, x=x: s.run(None, {"x": x})) for name, (s, x) in sessions.items()},
                         rounds)
    base = timing["fp32 MatMul"]
    return {"shape_mkn": list(shape), **{name: {**t, "speedup_min": round(base["min_ms"] / t["min_ms"], 3),
                                                "speedup_p50": round(base["p50_ms"] / t["p50_ms"], 3),
                                                "gmac_per_s_best": round(m * k * n / t["min_ms"] / 1e6, 1)}
                                         for name, t in timing.items()}}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# int8 towers on this CPU: variants, kernel time per operator, GEMM kernels alone", "",
             f"Made by: `{result['command']}`", "",
             f"CPU: {result['cpu']} ({os.cpu_count()} cores), flags: " + ", ".join(
                 f"{f} {'yes' if v else 'no'}" for f, v in result["cpu_flags"].items()) + "; onnxruntime "
             f"{result['onnxruntime']}, 2 intra-op threads, ORT_ENABLE_ALL; load average {result['load_average']}. "
             "Shared machine: compare ratios within a table, not milliseconds.", ""]
    for tower, variants in result["towers"].items():
        lines += [f"## {tower} tower, batch {BATCH}", "",
                  "| variant | p50 ms | min ms | x fp32 (p50) | GEMM kernel ms | other kernel ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, v in variants.items():
            ops = v["kernel_ms_per_op"]
            gemm = sum(ms for op, ms in ops.items() if op in GEMM_OPS)
            lines.append(f"| {name} | {v['p50_ms']:.1f} | {v['min_ms']:.1f} | {v['ratio_to_fp32_p50']:.2f}x | "
                         f"{gemm:.1f} | {sum(ops.values()) - gemm:.1f} |")
        lines.append("")
    lines += ["## GEMM kernels alone ([M,K] x [K,N], 2 threads)", "",
              "| shape | form | min ms | p50 ms | speedup (min) | speedup (p50) | GMAC/s (best) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for g in result["gemm"]:
        for name, t in ((n, t) for n, t in g.items() if n != "shape_mkn"):
            lines.append(f"| {'x'.join(map(str, g['shape_mkn']))} | {name} | {t['min_ms']:.2f} | {t['p50_ms']:.2f} | "
                         f"{t['speedup_min']:.2f}x | {t['speedup_p50']:.2f}x | {t['gmac_per_s_best']:.1f} |")
    return "\n".join(lines) + "\n"


GEMM_OPS = ("MatMul", "FusedMatMul", "Gemm", "Conv", "FusedConv", "QLinearMatMul", "QGemm", "QLinearConv",
            "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger")
"""Operator types counted as matrix products (attention's activation products included)."""


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", action="append", required=True, metavar="TOWER=FILE",
                        help="an fp32 ONNX tower (image=... and/or text=...)")
    parser.add_argument("--calibration", type=int, default=32,
                        help="random calibration inputs for the variants (32; they are timed, not gated)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per tower (8)")
    parser.add_argument("--gemm-rounds", type=int, default=30, help="interleaved rounds per GEMM shape (30)")
    parser.add_argument("--work", type=Path, required=True, help="where the variants are written (and reused)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    towers, gemm = {}, []
    for spec in args.onnx:
        tower, _, file = spec.partition("=")
        fp32 = Path(file)
        paths = {"fp32": fp32}
        for variant in VARIANTS:
            paths[variant] = args.work / f"{tower}-{variant}.onnx"
            if not paths[variant].is_file():
                print(f"int8_speed: quantizing {tower} as {variant} ...", file=sys.stderr, flush=True)
                rng = np.random.default_rng(1)
                make_variant(fp32, paths[variant], variant,
                             np.concatenate([tower_input(fp32, rng) for _ in range(args.calibration // BATCH)]))
        print(f"int8_speed: timing the {tower} tower ...", file=sys.stderr, flush=True)
        towers[tower] = tower_timing(paths, tower_input(fp32, np.random.default_rng(0)), args.rounds, args.work)
        gemm += [gemm_timing(shape, args.gemm_rounds) for shape in GEMM_SHAPES[tower]]
    result = {"schema": SCHEMA, "command": "python -m mpsclip.bench.int8_speed " + " ".join(sys.argv[1:]),
              "cpu": cpu_model(), "cpu_flags": cpu_flags(), "onnxruntime": onnxruntime.__version__,
              "load_average": {"start": load_start, "end": load_average()}, "towers": towers, "gemm": gemm}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "results.json", json.dumps(result, indent=2) + "\n")
    atomic_write(args.out / "results.md", markdown(result))
    print(markdown(result), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
