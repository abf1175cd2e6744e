"""AOTInductor packages (``torch.export`` + ``aoti_compile_and_package``), one ``.pt2`` per tower, CPU or CUDA.

A package holds compiled code for one device kind (a CPU package also for the compiling machine's instruction
set). ``run_in_fresh_process`` loads it in a new interpreter that cannot import mpsclip or open_clip, so that
a crash while loading (seen with CUDA packages of torch 2.11.0+cu130) is reported instead of killing the caller.
Running a package in-process is :mod:`mpsclip.engines.aoti`.
"""

from __future__ import annotations

import copy
import logging
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mpsclip.export.onnx import mha_fast_path_disabled, tower_module
from mpsclip.export.towers import example_input

from mpsclip.choices import DEVICES
from mpsclip.devices import resolve_device
from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP

STANDALONE = Path(__file__).with_name("aoti_standalone.py")
FRESH_PROCESS_TIMEOUT_S = 600


def default_device() -> str:
    """What ``--device auto`` compiles for: CUDA when a GPU is visible, else the CPU."""
    return resolve_device("auto").type


def require_device(device: str) -> None:
    """``device`` is a device kind AOTInductor compiles for (``cpu`` or ``cuda``, as :data:`mpsclip.choices.DEVICES`
    names them) and is visible here."""
    kinds = [d for d in DEVICES if d != "auto"]
    if device not in kinds:
        raise MPSCLIPError(f"unknown AOTInductor device {device!r}; choose one of {', '.join(kinds)}")
    resolve_device(device)  # cuda without a visible GPU: a clear error


def compile_tower(
    model: MPSCLIP, tower: str, path: Path, *, precision: str, device: str, min_batch: int, max_batch: int
) -> None:
    """Export ``tower`` with a dynamic batch axis and compile it for ``device`` into the package ``path``; says
    each stage on stderr (compiling takes a minute or more)."""
    require_device(device)
    if device == "cpu":
        _import_cpp_extension_quietly()
    module = copy.deepcopy(tower_module(model, tower, precision)).to(device)  # the caller's model stays put
    batch = torch.export.Dim("batch", min=min_batch, max=max_batch)
    inputs = example_input(model, tower, batch=min(max(2, min_batch), max_batch)).to(device)
    start = time.perf_counter()
    with torch.no_grad(), mha_fast_path_disabled():
        _stage(f"{tower} tower: capturing the graph (torch.export) ...")
        program = torch.export.export(module, (inputs,), dynamic_shapes=({0: batch},))
        _stage(f"{tower} tower: compiling for {device} with AOTInductor (a minute or more) ...")
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    _stage(f"{tower} tower: compiled in {time.perf_counter() - start:.0f} s")


def _stage(line: str) -> None:
    print(f"aoti: {line}", file=sys.stderr, flush=True)


class _NoCudaRuntimeWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _import_cpp_extension_quietly() -> None:
    """Inductor's CPU compiler imports ``torch.utils.cpp_extension``, which warns "No CUDA runtime is found" on
    any machine with a CUDA toolkit but no GPU: nothing to do with a CPU package, so import it without that line."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _NoCudaRuntimeWarning()
    logger.addFilter(quiet)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.removeFilter(quiet)


def run_in_fresh_process(
    path: Path, inputs: list[np.ndarray], timeout_s: float = FRESH_PROCESS_TIMEOUT_S
) -> list[np.ndarray]:
    """Run ``inputs`` through the package in a new interpreter with torch only; raise if it fails or crashes."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs_path, outputs_path = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(inputs_path, **{f"{i:03d}": batch for i, batch in enumerate(inputs)})
        command = [sys.executable, "-I", str(STANDALONE), str(path), str(inputs_path), str(outputs_path)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise MPSCLIPError(f"{path.name}: loading it in a fresh process took over {timeout_s:.0f} s") from err
        if done.returncode != 0:
            raise MPSCLIPError(
                f"{path.name}: the AOTInductor package failed in a fresh process ({describe_exit(done.returncode)}); "
                f"stderr ends: {done.stderr[-800:].strip()!r}. Nothing was written; try --device cpu or another "
                "--format, and see bench/results/NOTES.md"
            )
        with np.load(outputs_path) as outputs:
            return [outputs[key] for key in sorted(outputs.files)]


def describe_exit(returncode: int) -> str:
    """``exit status 1`` or ``killed by SIGSEGV`` for a subprocess return code."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"
