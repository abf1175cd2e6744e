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
_OPEN_CLIP_DIR = str(Path(open_clip.__file__).parent)


class _QuietOpenClip(logging.Filter):
    """Drops open_clip's own records below ERROR (it logs through the root logger). With ``pretrained=None`` the
    weights come from a checkpoint loaded right after, or random init was asked for: its "No pretrained weights
    loaded ... initialized randomly" warning and its step-by-step INFO lines would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(_OPEN_CLIP_DIR)


def create_backbone(arch: str, pretrained: str | None = None, cache_dir: str | None = None) -> nn.Module:
    """``open_clip.create_model``; quiet when no pretrained weights were asked for (see :class:`_QuietOpenClip`)."""
    if pretrained is not None:
        return open_clip.create_model(arch, pretrained=pretrained, cache_dir=cache_dir)
    quiet = _QuietOpenClip()
    logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(arch, pretrained=None, cache_dir=cache_dir)
    finally:
        logging.getLogger().removeFilter(quiet)
