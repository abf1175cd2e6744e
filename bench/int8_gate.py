"""The int8 quality gate at its full size on one checkpoint: a store of ``--items`` distinct synthetic scenes
(:mod:`mpsclip.data.synth`) and ``--queries`` of their captions, searched by the fp32 eager towers and by int8
ONNX towers quantized as ``mpsclip export --precision int8`` does (issue 23).

The towers are exported and quantized here (calibrated on ``--calibration-items`` of the scenes that are not
held back), then :func:`mpsclip.export.gate.run_gate` measures the embedding level over all scenes and the
top-10 overlap on the store. Writes OUT/results.json and OUT/results.md.

example:
  python -m mpsclip.bench.int8_gate --checkpoint ckpts/ViT-B-32-quickgelu.safetensors --out bench-int8-gate
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from mpsclip.bench.report import load_average, machine
from mpsclip.export.calibration import load_calibration
from mpsclip.export.gate import GateSettings, run_gate
from mpsclip.export.onnx import write_onnx
from mpsclip.export.quantize import quantize_tower

from mpsclip.engines import load_engine
from mpsclip.factory import load_model
from mpsclip.io import atomic_write

SCHEMA = "mpsclip-bench-int8-gate/1"
FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}


def quantized_folder(model: Any, calibration: Any, items: int, folder: Path) -> dict[str, Any]:
    """Both towers of ``model`` as int8 QDQ ONNX in ``folder`` (with a manifest); the quantization records."""
    inputs = {"image": calibration.pixels.numpy(), "text": model.tokenize(calibration.captions).numpy()}
    records = {}
    for tower, name in FILES.items():
        fp32 = folder / f"fp32-{name}"
        write_onnx(model, tower, fp32)
        calibrated = calibration.split(tower)[0][:items]
        records[tower] = quantize_tower(fp32, folder / name, inputs[tower][calibrated])
        fp32.unlink()
    manifest = {"precision": "int8", "towers": {t: {"file": name} for t, name in FILES.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return records


def markdown(result: dict[str, Any]) -> str:
    gate, m = result["gate"], result["machine"]
    retrieval = gate["retrieval"]
    lines = [
        "# int8 quality gate, full size",
        "",
        f"Made by: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; load average {result['load_average']['start']} at the start, "
        f"{result['load_average']['end']} at the end; {result['seconds']} s in all.",
        "",
        f"Model `{result['checkpoint']}` ({result['arch']}). Store: {retrieval['store_items']} distinct synthetic "
        f"scenes; {retrieval['queries']} of their captions as queries; int8 towers calibrated on "
        f"{result['calibration_items']} scenes (not held back).",
        *(["", result["note"]] if result.get("note") else []),
        "",
        "| tower | min cosine to fp32 (not held back) | min cosine (held back) |",
        "|---|---:|---:|",
        *(f"| {t} | {f['calibration_min_cosine']:.4f} | {f['held_back_min_cosine']:.4f} |"
          for t, f in gate["embedding"].items()),
        "",
        f"Top-{retrieval['k']} overlap with fp32: **{retrieval['top_k_overlap']:.4f}** (worst query "
        f"{retrieval['worst_query_overlap']:.2f}); gate min overlap {gate['settings']['min_overlap']}: "
        f"**{'passed' if gate['passed'] else 'missed'}**" + (f" ({'; '.join(gate['failures'])})" if gate['failures']
                                                           else ""),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--items", type=int, default=2000, help="store items: distinct synthetic scenes (2000)")
    parser.add_argument("--queries", type=int, default=100, help="text queries (100)")
    parser.add_argument("--calibration-items", type=int, default=200, help="scenes to calibrate on (200)")
    parser.add_argument("--min-overlap", type=float, default=0.95, help="the gate's top-10 overlap floor (0.95)")
    parser.add_argument("--note", default=None, help="a line for results.md")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    start, load_start = time.perf_counter(), load_average()
    model = load_model(args.checkpoint).eval()
    calibration = load_calibration(None, model.image_size, args.items)
    with tempfile.TemporaryDirectory(prefix="mpsclip-int8-gate-") as tmp:
        records = quantized_folder(model, calibration, args.calibration_items, Path(tmp))
        engine = load_engine("onnxruntime", tmp, "cpu", precision="int8")
        gate = run_gate(model, engine, calibration, GateSettings(store_items=args.items, queries=args.queries,
                                                                 min_overlap=args.min_overlap))
    result = {"schema": SCHEMA, "command": "python -m mpsclip.bench.int8_gate " + " ".join(sys.argv[1:]),
              "note": args.note, "machine": machine(torch.device("cpu")),
              "load_average": {"start": load_start, "end": load_average()},
              "seconds": round(time.perf_counter() - start, 1), "checkpoint": str(args.checkpoint),
              "arch": str(model.config_dict()["arch"]), "calibration_items": args.calibration_items,
              "quantization": records, "gate": gate}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "results.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write(args.out / "results.md", markdown(result))
    print(markdown(result), end="")
    return 0 if gate["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
