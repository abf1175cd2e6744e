"""The eager PyTorch model as an engine: ``model.encode_*`` under ``torch.inference_mode``.

fp32 runs the weights as they are; fp16/bf16 run the same model under ``torch.autocast`` of that dtype
(the weights stay fp32, so the model is shared with the caller, not copied). Outputs are float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpsclip.engines.base import TOWERS, check_input, precision_dtype
from mpsclip.family import RetrievalModel


class EagerEngine:
    kind = "torch"

    def __init__(self, model: RetrievalModel, device: torch.device, precision: str = "fp32") -> None:
        self.dtype = precision_dtype(precision)
        self.precision = precision
        self.device = device
        self.model = model.eval().to(device)  # type: ignore[attr-defined]
        self.name = f"torch eager ({precision}, {device})"
        self.batch_sizes: tuple[int, int] | None = None
        self.towers = TOWERS

    def _run(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        x = check_input(self, tower, x)
        with torch.inference_mode(), torch.autocast(self.device.type, self.dtype, enabled=self.precision != "fp32"):
            out = getattr(self.model, f"encode_{tower}")(x)
        return F.normalize(out.float(), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run("image", pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run("text", tokens)
