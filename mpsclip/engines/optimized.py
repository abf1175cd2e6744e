"""``model.optimize(precision)`` (:mod:`mpsclip.kernels.runtime`, fused adapters, compiled towers, CUDA
graphs) as an engine. On the CPU the fast runtime runs plain PyTorch in fp32, and the engine says so."""

from __future__ import annotations

import torch

from mpsclip.engines.base import TOWERS, check_input, no_autocast
from mpsclip.errors import MPSCLIPError
from mpsclip.family import RetrievalModel

PRECISIONS = ("fp16", "bf16")


class OptimizedEngine:
    kind = "optimized"

    def __init__(self, model: RetrievalModel, device: torch.device, precision: str = "fp16") -> None:
        if device.type == "cuda" and precision not in PRECISIONS:
            raise MPSCLIPError(
                f"the optimized engine runs {' or '.join(PRECISIONS)} on a GPU, not {precision}; "
                "pass precision='fp16' (or use the 'torch' engine for fp32)"
            )
        self.device = device
        self.runtime = model.eval().to(device).optimize(precision=precision if device.type == "cuda" else "fp16")  # type: ignore[attr-defined]
        self.dtype = getattr(self.runtime, "dtype", torch.float32) if device.type == "cuda" else torch.float32
        self.precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")
        self.name = f"optimized ({self.precision}, {device})"
        self.batch_sizes: tuple[int, int] | None = None
        self.towers = TOWERS

    def _run(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        x = check_input(self, tower, x)
        with no_autocast(self.device):  # the runtime's own precision rules, never an outer autocast
            if tower == "image":
                x = x.to(self.dtype)
            return getattr(self.runtime, f"encode_{tower}")(x).float()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run("image", pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run("text", tokens)
