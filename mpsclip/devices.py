"""``--device`` resolution, shared by every command and engine."""

from __future__ import annotations

import torch

from mpsclip.errors import MPSCLIPError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when a GPU is visible, else CPU; ``cuda[:N]`` without a GPU is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MPSCLIPError(f"--device {device}: no CUDA GPU is visible; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise MPSCLIPError(f"--device {device!r}: not a device ({err}); use auto, cpu, cuda or cuda:N") from err
