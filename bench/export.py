"""Export a random-weight MPS-CLIP as AOTInductor packages and ONNX, check each artefact, time it.

    python -m mpsclip.bench.export --out bench/results                        # a GPU machine: cuda, fp32 + fp16
    python -m mpsclip.bench.export --device cpu --arch MPS-Tiny --batches 1,4 --out /tmp/bench   # a quick check

Each export runs as an ``mpsclip-export`` subprocess (which verifies AOTInductor packages in a fresh,
torch-only interpreter before loading them itself) and each timing runs in a fresh process too, so a crash,
such as the SIGSEGV in ``aoti_load_package`` seen with torch 2.11.0+cu130, is recorded with its signal and
stderr tail instead of ending the run. Writes ``<out>/<device>-export.json`` and ``<out>/<device>-export.md``.
Timings: median of ``--repeats`` calls after ``--warmup`` calls, CUDA events on a GPU, wall clock on a CPU;
AOTInductor gets device-resident inputs, ONNX Runtime host tensors in and out (the CPU ``onnxruntime`` engine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mpsclip.bench.checkpoints import randomized_model
from mpsclip.export.aoti import describe_exit
from mpsclip.export.manifest import MANIFEST

from mpsclip.choices import DEVICES
from mpsclip.devices import resolve_device
from mpsclip.engines.manifest import contained_file
from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write

STDERR_TAIL = 1500
OK_EXIT = describe_exit(0)


@dataclass(frozen=True)
class Settings:
    device: str
    batches: list[int]
    warmup: int
    repeats: int
    timeout_s: float


def run_logged(command: list[str], timeout_s: float) -> dict:
    """Run ``command``; its seconds, exit status (or signal) and stderr tail, never raising on failure."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": timeout_s, "exit": f"timed out after {timeout_s:.0f} s", "stderr_tail": ""}
    return {
        "ok": done.returncode == 0,
        "seconds": round(time.perf_counter() - start, 1),
        "exit": describe_exit(done.returncode),
        "stdout": done.stdout,
        "stderr_tail": done.stderr[-STDERR_TAIL:],
    }


def export_one(checkpoint: Path, out: Path, fmt: str, precision: str, settings: Settings) -> dict:
    """``mpsclip-export`` one format and precision; the record holds the manifest's verification on success."""
    largest = str(max(settings.batches))
    command = [sys.executable, "-m", "mpsclip.export", str(checkpoint), "--format", fmt, "--precision", precision,
               "--out", str(out), "--min-batch", "1", "--opt-batch", largest, "--max-batch", largest]
    if fmt == "aoti":
        command += ["--device", settings.device]
    record = {"format": fmt, "precision": precision, **run_logged(command, settings.timeout_s)}
    record.pop("stdout")
    if record["ok"]:
        record["verification"] = json.loads((out / MANIFEST).read_text())["verification"]
    return record


def time_artefacts(folder: Path, settings: Settings) -> list[dict]:
    """Time every tower of an exported folder, each in a fresh process."""
    rows = []
    for tower in json.loads((folder / MANIFEST).read_text())["towers"]:
        command = [sys.executable, "-m", "mpsclip.bench.export", "--time-folder", str(folder), "--tower", tower,
                   "--device", settings.device, "--batches", ",".join(map(str, settings.batches)),
                   "--warmup", str(settings.warmup), "--repeats", str(settings.repeats)]
        record = run_logged(command, settings.timeout_s)
        ok = record["ok"]
        timings = json.loads(record["stdout"].strip().splitlines()[-1]) if ok else []
        rows.append({"tower": tower, "exit": record["exit"], "stderr_tail": "" if ok else record["stderr_tail"],
                     "timings": timings})
    return rows


def median_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls (CUDA events on a GPU, wall clock on a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def random_batch(spec: dict, batch: int) -> np.ndarray:
    """A random input of the manifest's shape and dtype (token ids below 49406, the start/end markers)."""
    shape = [batch, *spec["shape"][1:]]
    gen = np.random.default_rng(0)
    if spec["dtype"] == "int64":
        return gen.integers(1, 49406, size=shape, dtype=np.int64)
    return gen.standard_normal(shape, dtype=np.float32)


def time_tower(folder: Path, tower: str, device: str, batches: list[int], warmup: int, repeats: int) -> list[dict]:
    """Load one tower's artefact (this process was started for it) and time it at each batch size."""
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = manifest["towers"][tower]
    path = contained_file(folder, entry.get("file"), f"{folder / MANIFEST}: towers.{tower}.file")
    if path.suffix == ".pt2":
        runner = torch._inductor.aoti_load_package(str(path))

        def call_at(x: np.ndarray) -> Callable[[], object]:
            tensor = torch.from_numpy(x).to(device)
            return lambda: runner(tensor)
    else:
        from mpsclip.engines import load_engine

        encoder = getattr(load_engine("onnxruntime", folder, "cpu"), f"encode_{tower}")

        def call_at(x: np.ndarray) -> Callable[[], object]:
            tensor = torch.from_numpy(x)
            return lambda: encoder(tensor)

    rows = []
    for batch in batches:
        with torch.no_grad():
            ms = median_ms(call_at(random_batch(entry["inputs"][0], batch)), device, warmup, repeats)
        rows.append({"batch": batch, "ms": round(ms, 3), "items_per_s": round(batch / ms * 1e3, 1)})
    return rows


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU-{platform.machine()}-{os.cpu_count()}cores"


def cuda_toolchain() -> dict:
    """The CUDA runtime torch was built with and the toolkit Inductor compiles CUDA packages against: a
    mismatch (e.g. a cu130 wheel and a CUDA 12 ``CUDA_HOME``) is a suspect for crashes while loading a package."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    release = ""
    if nvcc.is_file():
        done = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True)
        release = next((line.strip() for line in done.stdout.splitlines() if "release" in line), "")
    return {"torch_cuda": torch.version.cuda, "cuda_home": CUDA_HOME, "nvcc": release}


def markdown(meta: dict, exports: list[dict]) -> str:
    lines = [f"# Export bench: {meta['device']}", "",
             f"torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, arch {meta['arch']} (random weights), "
             f"device {meta['target']}; median of {meta['repeats']} calls after {meta['warmup']} warm-up calls.",
             f"torch built for CUDA {meta['torch_cuda']}; CUDA_HOME {meta['cuda_home']} "
             f"({meta['nvcc'] or 'no nvcc'}).", "",
             "| format | precision | export s | result | tower | min cosine (in-process / fresh) | "
             + " | ".join(f"b{b} ms (items/s)" for b in meta["batches"]) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(meta["batches"])]
    for record in exports:
        towers = record.get("timed", []) or [{"tower": "-", "timings": [], "exit": record["exit"]}]
        for row in towers:
            figures = record.get("verification", {}).get(row["tower"], {})
            cosine = _cosines(figures)
            cells = {t["batch"]: f"{t['ms']} ({t['items_per_s']:,})" for t in row["timings"]}
            result = "ok" if record["ok"] and row["exit"] in ("", OK_EXIT) else (row["exit"] or record["exit"])
            head = f"| {record['format']} | {record['precision']} | {record['seconds']} | {result} | {row['tower']} |"
            lines.append(f"{head} {cosine} | " + " | ".join(cells.get(b, "-") for b in meta["batches"]) + " |")
    failures = [r for r in exports if not r["ok"]]
    failures += [t for r in exports for t in r.get("timed", []) if t["stderr_tail"]]
    for failure in failures:
        lines += ["", f"{failure.get('format', failure.get('tower'))}: {failure['exit']}; stderr ends:", "```",
                  failure["stderr_tail"].strip(), "```"]
    return "\n".join(lines) + "\n"


def _cosines(figures: dict) -> str:
    if figures.get("status") != "verified":
        return figures.get("reason", "-")
    fresh = figures.get("fresh_process", {}).get("min_cosine")
    return f"{figures['min_cosine']:.6f}" + (f" / {fresh:.6f}" if fresh is not None else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results (e.g. bench/results)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when a GPU is visible")
    parser.add_argument("--arch", default="ViT-B-32-quickgelu")
    parser.add_argument("--formats", default="aoti,onnx")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--batches", default="1,64,512")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each subprocess")
    parser.add_argument("--time-folder", type=Path, help=argparse.SUPPRESS)  # worker mode: time one tower
    parser.add_argument("--tower", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    try:
        device = resolve_device(args.device).type
    except MPSCLIPError as err:
        raise SystemExit(str(err)) from err
    if args.time_folder is not None:
        rows = time_tower(args.time_folder, args.tower, device, batches, args.warmup, args.repeats)
        print(json.dumps(rows))
        return
    import onnxruntime

    meta = {"device": device_name(device), "target": device, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "arch": args.arch, "batches": batches,
            "warmup": args.warmup, "repeats": args.repeats, **cuda_toolchain()}
    settings = Settings(device, batches, args.warmup, args.repeats, args.timeout)
    exports = []
    with tempfile.TemporaryDirectory(prefix="mpsclip-export-bench.") as tmp:
        checkpoint = randomized_model(args.arch).save(Path(tmp) / "random")
        for fmt in args.formats.split(","):
            for precision in args.precisions.split(","):
                folder = Path(tmp) / f"{fmt}-{precision}"
                print(f"[{fmt} {precision}] exporting ...", flush=True)
                record = export_one(checkpoint, folder, fmt, precision, settings)
                if record["ok"]:
                    record["timed"] = time_artefacts(folder, settings)
                print(f"[{fmt} {precision}] {record['exit']} after {record['seconds']} s", flush=True)
                exports.append(record)
    stem = meta["device"].replace(" ", "-")
    atomic_write(args.out / f"{stem}-export.json", json.dumps({"meta": meta, "exports": exports}, indent=2) + "\n")
    text = markdown(meta, exports)
    atomic_write(args.out / f"{stem}-export.md", text)
    print(text)


if __name__ == "__main__":
    main()
