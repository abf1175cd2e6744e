"""Model factory: the family registry, ``create_model`` and ``load_model`` (the open_clip way).

A family registers a :class:`Family`: how to build a fresh model, whether a read checkpoint is one of its own
(:meth:`Family.claims`), and how to build a model from it. ``load_model`` reads the file once
(:func:`mpsclip.checkpoints.read_checkpoint`) and hands it to the family that claims it: ours by the saved
``family``, foreign files by their keys.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpsclip.checkpoints import Checkpoint, read_checkpoint
from mpsclip.errors import MPSCLIPError
from mpsclip.family import RetrievalModel


@dataclass(frozen=True)
class Family:
    """One model family's entry in the registry."""

    name: str
    create: Callable[..., RetrievalModel]
    """``create(arch, pretrained=None, **options)``: a fresh model."""
    claims: Callable[[Checkpoint], bool]
    build: Callable[..., RetrievalModel]
    """``build(checkpoint, arch=None, **options)``: a model filled strictly from a checkpoint it claims."""
    fallback: bool = False
    """Claims any foreign backbone (MPS-CLIP on an open_clip state dict): asked after the specific families."""


_REGISTRY: dict[str, Family] = {}
_BUILTIN = {"mpsclip": "mpsclip.model", "priorclip": "mpsclip.priorclip"}
"""Families shipped with the package: module that registers each (imported on first use)."""


def register_family(family: Family) -> None:
    """Make ``family`` known to :func:`create_model` and :func:`load_model` (replaces one of the same name)."""
    _REGISTRY[family.name] = family


def families() -> list[Family]:
    """Every registered family, fallback families last."""
    for module in _BUILTIN.values():
        importlib.import_module(module)
    return sorted(_REGISTRY.values(), key=lambda family: family.fallback)


def get_family(name: str) -> Family:
    for family in families():
        if family.name == name:
            return family
    known = ", ".join(f.name for f in families())
    raise MPSCLIPError(f"model family {name!r} is unknown; known families: {known}")


def create_model(arch: str, family: str = "mpsclip", pretrained: str | None = None, **options: Any) -> RetrievalModel:
    """A fresh model of ``family`` on ``arch`` (``pretrained`` as in ``open_clip.create_model``)."""
    return get_family(family).create(arch, pretrained=pretrained, **options)


def load_model(
    path: str | Path,
    arch: str | None = None,
    map_location: str = "cpu",
    trust_checkpoint: bool = False,
    **options: Any,
) -> RetrievalModel:
    """Build whichever family a checkpoint holds (ours, the authors' MPS-CLIP, PriorCLIP releases, open_clip/OpenAI
    backbones); ``arch`` is needed for foreign files whose architecture is not recorded. ``trust_checkpoint``:
    also load TorchScript archives (OpenAI, GeoRSCLIP), which run code of their own when loaded."""
    checkpoint = read_checkpoint(path, map_location, trust_checkpoint)
    return build_from(checkpoint, arch, **options)


def build_from(checkpoint: Checkpoint, arch: str | None = None, **options: Any) -> RetrievalModel:
    """The model of the family that claims ``checkpoint``."""
    if checkpoint.family is not None:
        return get_family(checkpoint.family).build(checkpoint, arch, **options)
    for family in families():
        if family.claims(checkpoint):
            return family.build(checkpoint, arch, **options)
    raise MPSCLIPError(f"{checkpoint.path}: no model family recognises this checkpoint's keys")
