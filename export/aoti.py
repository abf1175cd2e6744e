"""AOTInductor packages (``torch.export`` + ``aoti_compile_and_package``), one ``.pt2`` per tower; CUDA only."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from mpsclip.export.onnx import mha_fast_path_disabled, tower_module
from mpsclip.export.towers import example_input

from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise MPSCLIPError("AOTInductor export compiles for an NVIDIA CUDA GPU, and none is visible to PyTorch here")


def compile_tower(model: MPSCLIP, tower: str, path: Path, *, precision: str, min_batch: int, max_batch: int) -> None:
    """Export ``tower`` with a dynamic batch axis and compile it into the package ``path``."""
    require_cuda()
    module = copy.deepcopy(tower_module(model, tower, precision)).cuda()  # the caller's model stays where it is
    batch = torch.export.Dim("batch", min=min_batch, max=max_batch)
    inputs = example_input(model, tower, batch=max(2, min_batch)).cuda()
    with torch.no_grad(), mha_fast_path_disabled():
        program = torch.export.export(module, (inputs,), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


class AotiEncoder:
    """``encoder(batch) -> embeddings`` for one ``.pt2`` package."""

    def __init__(self, path: str | Path) -> None:
        require_cuda()
        self.runner = torch._inductor.aoti_load_package(str(path))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.runner(torch.from_numpy(batch).cuda()).float().cpu().numpy()
