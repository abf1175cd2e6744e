"""An exported AOTInductor folder (``.pt2`` packages) loaded with ``torch._inductor.aoti_load_package``.

A package runs only on the device kind it was compiled for (``manifest.json``'s ``device``); its inputs and
outputs are torch tensors on that device. Loading a CUDA package crashed torch 2.11.0+cu130 once
(bench/results/NOTES.md): ``mpsclip.export.aoti.run_in_fresh_process`` checks a package in a subprocess first."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mpsclip.engines.base import ExportedEngine, TowerFn, no_autocast
from mpsclip.engines.manifest import ExportedTowers
from mpsclip.errors import MPSCLIPError


def availability(device: torch.device) -> str | None:
    """Why AOTInductor packages cannot run on ``device`` here, or None."""
    if device.type not in ("cpu", "cuda"):
        return f"AOTInductor packages run on cpu or cuda, not {device.type}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    if not hasattr(torch._inductor, "aoti_load_package"):
        return f"torch {torch.__version__} has no torch._inductor.aoti_load_package"
    return None


class AotiEngine(ExportedEngine):
    kind = "aoti"
    availability = staticmethod(availability)

    def check_export(self, export: ExportedTowers, device: torch.device) -> None:
        compiled_for = export.device or "cpu"
        if compiled_for != device.type:
            raise MPSCLIPError(
                f"{export.folder}: AOTInductor package compiled for {compiled_for}, asked to run on {device}; "
                f"use --device {compiled_for} or export again with --device {device.type}"
            )

    def load_tower(self, path: Path) -> TowerFn:
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            runner = torch._inductor.aoti_load_package(str(path))

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), no_autocast(self.device):
                return runner(x).float()

        return run
