"""Export MPS-CLIP's towers for serving: ONNX, TensorRT, AOTInductor or a Triton model repository.

``export(checkpoint, fmt, out)`` writes everything into a temporary folder beside ``out``, verifies parity
with PyTorch, writes ``manifest.json`` and only then renames the folder to ``out``: a failure leaves nothing.
Verification loads the staged folder through :func:`mpsclip.engines.load_engine`, as embedding and serving
do, and compares each tower with the fp32 eager engine. ``precision="int8"`` quantizes the ONNX towers
(:mod:`mpsclip.export.quantize`), calibrated on ``calibration`` (:mod:`mpsclip.export.calibration`), and
passes them through the quality gate (:mod:`mpsclip.export.gate`) instead: an export that misses it is
refused with the figures, and nothing is written. AOTInductor packages are first run in a fresh
interpreter that has torch but cannot import mpsclip or open_clip (so that a crash while loading is reported,
not suffered), then loaded in this process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mpsclip.export import aoti, tensorrt, triton_repo
from mpsclip.export.calibration import DEFAULT_ITEMS, load_calibration
from mpsclip.export.gate import GateSettings, run_gate
from mpsclip.export.manifest import build_manifest, write_manifest
from mpsclip.export.onnx import DTYPES, write_onnx
from mpsclip.export.quantize import PLANS, quantize_tower
from mpsclip.export.towers import TOWERS
from mpsclip.export.verify import not_run, seeded_inputs, verification_batches, verify_engine, verify_outputs

from mpsclip.engines import engine_availability, load_engine
from mpsclip.errors import MPSCLIPError
from mpsclip.factory import load_model
from mpsclip.model import MPSCLIP

__all__ = ["FORMATS", "GateSettings", "export"]

FORMATS = ("onnx", "tensorrt", "aoti", "triton-repo")
QUANTIZED = ("int8",)
"""Precisions made by quantizing the float32 ONNX graph (``--format onnx``), behind the quality gate."""


def export(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    precision: str = "fp32",
    towers: tuple[str, ...] = TOWERS,
    min_batch: int = 1,
    opt_batch: int = 256,
    max_batch: int = 1024,
    verify: bool = True,
    arch: str | None = None,
    backend: str = "onnxruntime",
    device: str | None = None,
    calibration: str | Path | None = None,
    calibration_items: int = DEFAULT_ITEMS,
    gate: GateSettings | None = None,
) -> Path:
    """Export ``towers`` of the checkpoint to the folder ``out`` (which must not exist, or be empty).

    ``device`` ("cpu" or "cuda") is what AOTInductor compiles for: CUDA when a GPU is visible, else the CPU.
    ``calibration`` (a folder or file, see :mod:`mpsclip.export.calibration`), ``calibration_items`` and ``gate``
    are for ``precision="int8"`` only; the gate always runs for it (``verify`` is its seeded parity check)."""
    checkpoint, out = Path(checkpoint), Path(out)
    _check_arguments(fmt, out, precision, towers, (min_batch, opt_batch, max_batch), backend)
    if fmt == "tensorrt" or (fmt == "triton-repo" and backend == "tensorrt"):
        tensorrt.require_tensorrt()
    if fmt == "aoti":
        device = device or aoti.default_device()
        aoti.require_device(device)
    elif device is not None:
        raise MPSCLIPError(f"--device {device}: only --format aoti compiles for a device; drop --device")
    if precision not in QUANTIZED and (calibration is not None or gate is not None):
        raise MPSCLIPError(f"--calibration and the gate settings are for --precision int8, not {precision}")
    model = load_model(checkpoint, arch=arch).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stage = Path(tmp) / out.name
        stage.mkdir()
        batches = (min_batch, opt_batch, max_batch)
        if precision in QUANTIZED:
            files = {t: f"{t}_encoder.onnx" for t in towers}
        else:
            files = {t: _write_tower(model, t, stage, fmt, precision, batches, backend, device) for t in towers}
        if fmt == "triton-repo":
            triton_repo.write_docs(stage, model, backend)
            if "text" in towers:
                triton_repo.write_text_ensemble(stage, model, max_batch=max_batch)
        manifest = build_manifest(
            checkpoint=checkpoint,
            model=model,
            fmt=fmt,
            precision=precision,
            files=files,
            batch={"min": min_batch, "opt": opt_batch, "max": max_batch},
            verification={t: not_run("--no-verify" if not verify else "pending") for t in towers},
            device=device,
        )
        write_manifest(stage, manifest)
        if precision in QUANTIZED:
            spec = Path(calibration) if calibration is not None else None
            gate = gate or GateSettings()
            manifest["quantization"] = _quantize(model, stage, manifest, spec, calibration_items, gate)
            manifest["verification"] = {t: _gate_verification(manifest["quantization"]["gate"], t) for t in towers}
            write_manifest(stage, manifest)
        elif verify:
            manifest["verification"] = _verify(model, stage, fmt, backend, device, precision, batches)
            write_manifest(stage, manifest)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(stage, out)
    return out


def _check_arguments(
    fmt: str, out: Path, precision: str, towers: tuple[str, ...], batches: tuple[int, int, int], backend: str
) -> None:
    if fmt not in FORMATS:
        raise MPSCLIPError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if precision not in (*DTYPES, *QUANTIZED):
        raise MPSCLIPError(f"unknown precision {precision!r}; choose one of {', '.join((*DTYPES, *QUANTIZED))}")
    if precision in QUANTIZED and fmt != "onnx":
        raise MPSCLIPError(
            f"--precision {precision} is made for --format onnx (static QDQ quantization); TensorRT builds its int8 "
            "engines from that QDQ graph, unverified until a GPU run: see the README's 'Quantized engines'"
        )
    if precision == "bf16" and (fmt == "onnx" or (fmt == "triton-repo" and backend == "onnxruntime")):
        raise MPSCLIPError("ONNX cannot hold bf16 convolutions; use --precision fp16, or --format tensorrt/aoti")
    if not towers or any(t not in TOWERS for t in towers) or len(set(towers)) != len(towers):
        raise MPSCLIPError(f"towers {list(towers)}: give one or both of {', '.join(TOWERS)}, e.g. --towers image,text")
    if not 1 <= batches[0] <= batches[1] <= batches[2]:
        raise MPSCLIPError(f"batch sizes min/opt/max {list(batches)}: need 1 <= min <= opt <= max")
    if backend not in triton_repo.BACKENDS:
        raise MPSCLIPError(f"unknown backend {backend!r}; choose one of {', '.join(triton_repo.BACKENDS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MPSCLIPError(f"{out}: already exists and is not an empty folder; remove it or choose another --out")


def _write_tower(
    model: MPSCLIP,
    tower: str,
    stage: Path,
    fmt: str,
    precision: str,
    batches: tuple[int, int, int],
    backend: str,
    device: str | None,
) -> str:
    """Write the artefact of ``tower`` under ``stage``; returns its path relative to ``stage``."""
    name = f"{tower}_encoder"
    if fmt == "onnx":
        write_onnx(model, tower, stage / f"{name}.onnx", precision)
        return f"{name}.onnx"
    if fmt == "aoti":
        aoti.compile_tower(
            model,
            tower,
            stage / f"{name}.pt2",
            precision=precision,
            device=str(device),
            min_batch=batches[0],
            max_batch=batches[2],
        )
        return f"{name}.pt2"
    if fmt == "tensorrt":
        _build_plan(model, tower, stage / f"{name}.plan", precision, batches)
        return f"{name}.plan"
    triton_repo.write_config(stage, model, tower, backend, opt_batch=batches[1], max_batch=batches[2])
    relative = f"{name}/1/{triton_repo.BACKENDS[backend]}"
    (stage / relative).parent.mkdir(parents=True)
    if backend == "tensorrt":
        _build_plan(model, tower, stage / relative, precision, batches)
    else:
        write_onnx(model, tower, stage / relative, precision)
    return relative


def _quantize(
    model: MPSCLIP, stage: Path, manifest: dict, spec: Path | None, items: int, gate: GateSettings
) -> dict[str, object]:
    """Quantize the staged towers, trying :data:`PLANS` in order until one passes the gate; raise when none does.

    Each plan's towers are loaded through the onnxruntime engine, as embedding and serving load them."""
    calibration = load_calibration(spec, model.image_size, items, gate.seed)
    inputs = {"image": calibration.pixels.numpy(), "text": model.tokenize(calibration.captions).numpy()}
    attempts: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = {t: Path(tmp) / f"{t}.onnx" for t in manifest["towers"]}
        for tower, path in fp32.items():
            write_onnx(model, tower, path, "fp32")
        for keep in PLANS:
            towers = {
                t: quantize_tower(path, stage / manifest["towers"][t]["file"], inputs[t][calibration.split(t)[0]], keep)
                for t, path in fp32.items()
            }
            figures = run_gate(model, load_engine("onnxruntime", stage, "cpu"), calibration, gate)
            attempts.append({"kept_fp32": list(keep), "gate": figures})
            if figures["passed"]:
                return {"calibration": calibration.record(), "towers": towers, "gate": figures,
                        "attempts": attempts[:-1], "gpu": "TensorRT int8 / onnxruntime CUDA: not yet run (no GPU)"}
    worst = "; ".join(f"keeping {', '.join(a['kept_fp32']) or 'nothing more'} fp32: " + "; ".join(a["gate"]["failures"])
                      for a in attempts)
    raise MPSCLIPError(
        f"int8 quality gate missed, nothing was written ({worst}). Calibrate on your own data (--calibration), "
        "or export fp32/fp16"
    )


def _gate_verification(figures: dict, tower: str) -> dict[str, object]:
    return {"status": "verified", "by": "quality gate", **figures["embedding"][tower]}


def _build_plan(model: MPSCLIP, tower: str, plan: Path, precision: str, batches: tuple[int, int, int]) -> None:
    """TensorRT takes the float32 ONNX graph and lowers precision through its builder flags."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / f"{tower}.onnx"
        write_onnx(model, tower, onnx_path, "fp32")
        tensorrt.build_engine(
            onnx_path, plan, precision=precision, batches=batches, timing_cache=plan.parent / "timing.cache"
        )


def _verify(
    model: MPSCLIP,
    stage: Path,
    fmt: str,
    backend: str,
    device: str | None,
    precision: str,
    batches: tuple[int, int, int],
) -> dict[str, dict[str, object]]:
    """Figures per tower of the staged folder, loaded as the engine that will run it."""
    kind = {"onnx": "onnxruntime", "triton-repo": backend}.get(fmt, fmt)
    device = device or ("cuda" if kind == "tensorrt" or engine_availability(kind, "cuda") is None else "cpu")
    sizes = verification_batches(batches[0], batches[2])
    fresh = _fresh_process_figures(model, stage, precision, sizes) if kind == "aoti" else {}
    engine = load_engine(kind, stage, device)
    figures = {t: verify_engine(model, t, engine, precision, sizes) for t in sorted(engine.towers)}
    return {t: {**f, **({"fresh_process": fresh[t]} if t in fresh else {})} for t, f in figures.items()}


def _fresh_process_figures(
    model: MPSCLIP, stage: Path, precision: str, sizes: tuple[int, ...]
) -> dict[str, dict[str, object]]:
    """Each ``.pt2`` package run in a new interpreter with torch only (a crash is reported, not suffered)."""
    figures = {}
    for package in sorted(stage.glob("*_encoder.pt2")):
        tower = package.name.removesuffix("_encoder.pt2")
        inputs = seeded_inputs(model, tower, sizes)
        done = verify_outputs(model, tower, inputs, aoti.run_in_fresh_process(package, inputs), precision)
        figures[tower] = {"max_abs": done["max_abs"], "min_cosine": done["min_cosine"]}
    return figures
