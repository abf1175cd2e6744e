"""An exported AOTInductor folder (``.pt2`` packages) loaded with ``torch._inductor.aoti_load_package``.

A package runs only on the device kind it was compiled for (``manifest.json``'s ``device``); its inputs and
outputs are torch tensors on that device. Loading a CUDA package crashed torch 2.11.0+cu130 once
(bench/results/NOTES.md): ``mpsclip.export.aoti.run_in_fresh_process`` checks a package in a subprocess first."""

from __future__ import annotations

import contextlib

import torch

from mpsclip.engines.base import check_input, no_autocast, precision_dtype
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


class AotiEngine:
    kind = "aoti"

    def __init__(self, export: ExportedTowers, device: torch.device) -> None:
        reason = availability(device)
        if reason is not None:
            raise MPSCLIPError(f"aoti engine on {device}: {reason}")
        compiled_for = export.device or "cpu"
        if compiled_for != device.type:
            raise MPSCLIPError(
                f"{export.folder}: AOTInductor package compiled for {compiled_for}, asked to run on {device}; "
                f"use --device {compiled_for} or export again with --device {device.type}"
            )
        self.device = device
        self.precision = export.precision
        self.dtype = precision_dtype(export.precision)
        self.batch_sizes = export.batch_sizes
        self.towers = frozenset(export.files)
        self.name = f"aoti {export.folder.name} ({self.precision}, {device})"
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self.runners = {t: torch._inductor.aoti_load_package(str(p)) for t, p in export.files.items()}

    def _run(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), no_autocast(self.device):
            return self.runners[tower](x).float()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run("image", check_input(self, "image", pixels).float())

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run("text", check_input(self, "text", tokens).long())
