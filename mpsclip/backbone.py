"""The frozen CLIP backbone both model families build on: open_clip models and our architecture configs.

Importing this module registers ``mpsclip/configs/arch/*.json`` (the tiny test architectures) with open_clip.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
from torch import nn

ARCH_CONFIG_DIR = Path(__file__).parent / "configs" / "arch"
open_clip.add_model_config(ARCH_CONFIG_DIR)


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "No pretrained weights loaded" for every random-init model; with ``pretrained=None`` that
    is what was asked for (checkpoint loaders fill the weights right after), so the warning only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def create_backbone(arch: str, pretrained: str | None = None, cache_dir: str | None = None) -> nn.Module:
    """``open_clip.create_model``, without its random-init warning when no pretrained weights were asked for."""
    if pretrained is not None:
        return open_clip.create_model(arch, pretrained=pretrained, cache_dir=cache_dir)
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(arch, pretrained=None, cache_dir=cache_dir)
    finally:
        logging.getLogger().removeFilter(quiet)

