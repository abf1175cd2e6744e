"""Model factory: the family registry, ``create_model`` and ``load_model`` (the open_clip way).

A family is a :class:`~mpsclip.family.Family`: how to build a fresh model, whether a read checkpoint is one of its
own (``claims``), and how to build a model from it. The shipped families are registered explicitly below (this
module imports them; they never import it); :func:`register_family` adds others. ``load_model`` reads the file
once (:func:`mpsclip.checkpoints.read_checkpoint`) and hands it to the family that claims it: ours by the saved
``family``, foreign files by their keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpsclip import model, priorclip
from mpsclip.checkpoints import Checkpoint, read_checkpoint
from mpsclip.errors import MPSCLIPError
from mpsclip.family import Family, RetrievalModel

__all__ = ["Family", "build_from", "create_model", "families", "get_family", "load_model", "register_family"]

_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> None:
    """Make ``family`` known to :func:`create_model` and :func:`load_model` (replaces one of the same name)."""
    _REGISTRY[family.name] = family


register_family(model.FAMILY_ENTRY)
register_family(priorclip.FAMILY_ENTRY)


def families() -> list[Family]:
    """Every registered family, fallback families last."""
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
