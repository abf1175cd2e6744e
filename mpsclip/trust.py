"""Whether checkpoint files that run code when loaded may be loaded in this process. Imports no torch.

TorchScript archives (OpenAI's CLIP releases, GeoRSCLIP's ``RS5M_ViT-B-32_RET-2.pt``) are programs: loading one
runs code it carries (its classes' ``__setstate__``). mpsclip reads them only when asked: per call with
``load_model(path, trust_checkpoint=True)``, or for the whole of one CLI command with ``--trust-checkpoint``
(the CLI runs the command inside :func:`trusting_checkpoints`). Every other checkpoint format is read as data
(safetensors, or pickles through ``torch.load(weights_only=True)``) and needs no trust.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_trusted = False


def checkpoints_trusted() -> bool:
    """True inside :func:`trusting_checkpoints` (a CLI command run with ``--trust-checkpoint``)."""
    return _trusted


@contextmanager
def trusting_checkpoints(trust: bool = True) -> Iterator[None]:
    """Within the block, TorchScript checkpoints load as if ``trust_checkpoint=True`` were passed (when ``trust``)."""
    global _trusted
    before = _trusted
    _trusted = before or trust
    try:
        yield
    finally:
        _trusted = before
