"""Checkpoint files: find, hash, read and write them, and load a state dict strictly. Imports no model.

Readable formats, detected from the file itself (:func:`read_checkpoint`):
- ours: ``<stem>.safetensors`` + ``<stem>.json`` (config with the model ``family``; positional tables are not stored);
- the authors' MPS-CLIP ``checkpoint_best.pth``: ``{"model": state_dict, "config": ...}`` with the backbone and
  adapters under ``model.``, the MPR head under ``mpr_head.`` and the buffers ``temp`` and ``*.pos_enc.pe``;
- foreign state dicts: an open_clip state dict (optionally under ``state_dict`` with a ``module.`` prefix), a
  PriorCLIP release (``state_dict``), or an OpenAI JIT archive.
Pickles are read as data only (``torch.load(weights_only=True)``: tensors and plain values, numpy's numeric scalars
included, which the authors' training script stores). TorchScript archives
(OpenAI, GeoRSCLIP) run code when loaded, so they are read only when trusted (``trust_checkpoint=True`` or the CLI's
``--trust-checkpoint``, see :mod:`mpsclip.trust`); they are recognised from their zip entries without running them.
Which family builds a model from what was read is :mod:`mpsclip.factory`'s business. Nothing is ever loaded
partially in silence: every mismatch is an :class:`MPSCLIPError` naming the file and the first offending keys.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mpsclip import __version__
from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write
from mpsclip.trust import checkpoints_trusted

FORMAT = "mpsclip"
_SHOWN = 5  # offending keys listed in an error message
_RECOMPUTED_SUFFIX = ".pos_enc.pe"
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")

Kind = Literal["ours", "authors", "backbone"]
"""``ours``: our safetensors + JSON; ``authors``: MPS-CLIP's release layout, already in our key space;
``backbone``: a foreign state dict in open_clip's key space (open_clip, OpenAI JIT, PriorCLIP releases)."""


@dataclass
class Checkpoint:
    """What a checkpoint file holds: its state dict, and for our format the saved JSON (``meta``)."""

    path: Path
    kind: Kind
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] | None = None

    @property
    def family(self) -> str | None:
        """The saved model family (ours only; files saved before families were recorded are MPS-CLIP)."""
        return None if self.meta is None else str(self.meta.get("family", "mpsclip"))

    @property
    def config(self) -> dict[str, Any]:
        if self.meta is None or not isinstance(self.meta.get("config"), dict):
            raise MPSCLIPError(f"{config_path(self.path)}: has no 'config' object; save the model again")
        return self.meta["config"]

    def check_arch(self, saved: str, asked: str | None) -> None:
        """Refuse a request for another architecture than the one this file was saved for."""
        if asked is not None and asked != saved:
            raise MPSCLIPError(f"{self.path}: saved for arch {saved!r}, but {asked!r} was asked for")


def config_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_checkpoint(
    module: nn.Module,
    config: dict[str, Any],
    family: str,
    path: str | Path,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` (``family`` + ``config``) atomically; returns the weights
    path. Tensors whose key ends with ``.pos_enc.pe`` are fixed tables recomputed at load, so not stored.
    ``evaluation``: the settings ``mpsclip train`` evaluated the model with (``max_sub_images``), so that
    ``mpsclip evaluate`` reproduces its figures."""
    weights = Path(path)
    if weights.suffix != ".safetensors":
        weights = weights.with_name(weights.name + ".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {"format": FORMAT, "family": family, "version": __version__, "config": config}
    if evaluation is not None:
        meta["evaluation"] = evaluation
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT, "family": family}))
    atomic_write(config_path(weights), json.dumps(meta, indent=2) + "\n")
    return weights


def resolve_checkpoint(path: str | Path) -> Path:
    """The weights file of a checkpoint (our ``x.json`` means ``x.safetensors``), or an error if it is missing."""
    path = Path(path)
    if path.suffix == ".json" and path.with_suffix(".safetensors").exists():
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise MPSCLIPError(f"{path}: no such checkpoint file")
    return path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (identifies the checkpoint behind stores and exports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_saved_config(path: str | Path) -> dict[str, Any]:
    """The JSON saved beside our weights (``family``, ``config``) without reading the tensors."""
    weights = resolve_checkpoint(path)
    cfg_file = config_path(weights)
    if not cfg_file.exists():
        raise MPSCLIPError(f"{weights}: its config {cfg_file.name} is missing beside it; save with model.save()")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise MPSCLIPError(f"{cfg_file}: not an mpsclip config ({err})") from err
    if not isinstance(meta, dict):
        raise MPSCLIPError(f"{cfg_file}: not an mpsclip config (holds a {type(meta).__name__}, not an object)")
    return meta


def saved_evaluation(path: str | Path) -> dict[str, Any]:
    """The evaluation settings saved with our checkpoint by ``mpsclip train`` (empty for any other file)."""
    weights = resolve_checkpoint(path)
    if weights.suffix != ".safetensors" or not config_path(weights).exists():
        return {}
    evaluation = read_saved_config(weights).get("evaluation")
    return evaluation if isinstance(evaluation, dict) else {}


def read_checkpoint(path: str | Path, map_location: str = "cpu", trust_checkpoint: bool = False) -> Checkpoint:
    """Read any supported checkpoint file (see the module docstring). A TorchScript archive runs code when loaded:
    it is read only with ``trust_checkpoint`` (or inside :func:`mpsclip.trust.trusting_checkpoints`)."""
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors":
        meta = read_saved_config(path)
        try:
            state = load_file(str(path), device=map_location)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise MPSCLIPError(f"{path}: not a readable safetensors file ({err})") from err
        return Checkpoint(path, "ours", state, meta)
    if is_torchscript(path):
        return Checkpoint(path, "backbone", _read_torchscript(path, map_location, trust_checkpoint))
    state, kind = _read_torch_file(path, map_location)
    return Checkpoint(path, kind, state)


def _numpy_scalar_globals() -> list[Any]:
    """What unpickling a numpy numeric scalar (``np.float64(0.5)``: an epoch, a best score) calls: numpy's scalar
    constructor (under its numpy 1 and numpy 2 module names) and the numeric dtypes. Both only build numbers from
    bytes; object dtypes and arrays stay refused."""
    scalar = np.float64(0).__reduce__()[0]  # numpy.core.multiarray.scalar (numpy._core in numpy 2)
    numeric = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *numeric]


def load_plain(path: Path, what: str, remedy: str, map_location: str = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers (numpy's numeric scalars too), strings and
    containers of them, never other Python objects. Errors name the file's kind (``what``: "a checkpoint") and what
    to do (``remedy``)."""
    if is_torchscript(path):
        raise MPSCLIPError(f"{path}: a TorchScript archive, not {what}; {remedy}")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused is None:
            raise MPSCLIPError(f"{path}: not {what} mpsclip can read (not a readable PyTorch file: {err})") from err
        raise MPSCLIPError(
            f"{path}: not {what} mpsclip can read: besides tensors and plain values it holds the Python object "
            f"{refused.group(1)}, which mpsclip never unpickles (unpickling it could run code); {remedy}"
        ) from err
    except Exception as err:  # torch raises many types for foreign files (IndexError, RuntimeError, EOFError ...)
        raise MPSCLIPError(f"{path}: not {what} mpsclip can read (not a PyTorch file: {type(err).__name__})") from err


def _read_torchscript(path: Path, map_location: str, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    """The state dict (open_clip's key space) of a TorchScript archive, loaded only when trusted."""
    if not (trust_checkpoint or checkpoints_trusted()):
        raise MPSCLIPError(
            f"{path}: a TorchScript archive (like OpenAI's and GeoRSCLIP's CLIP releases); loading one runs code it "
            "carries, so mpsclip loads it only when asked. If you trust where it came from, pass --trust-checkpoint "
            "(API: trust_checkpoint=True); to need that only once, save it as a safetensors checkpoint: "
            f"mpsclip.load_model({str(path)!r}, arch=ARCH, trust_checkpoint=True).save('model')"
        )
    try:
        module = torch.jit.load(str(path), map_location=map_location)
    except Exception as err:  # torch raises many types for broken archives
        raise MPSCLIPError(f"{path}: a broken TorchScript archive ({type(err).__name__}: {err})") from err
    state = dict(module.state_dict())
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    return state


def _read_torch_file(path: Path, map_location: str) -> tuple[dict[str, torch.Tensor], Kind]:
    """Returns the state dict in our key space for 'authors', or open_clip's key space for 'backbone'."""
    obj = load_plain(path, "a checkpoint", "save the weights as a plain state dict of tensors", map_location)
    if not isinstance(obj, Mapping):
        raise MPSCLIPError(f"{path}: not a checkpoint (holds a {type(obj).__name__}, not a state dict)")
    if isinstance(obj.get("model"), Mapping):
        state = _strip_prefix(dict(obj["model"]), "module.")
        if any(k.startswith("model.") for k in state):
            return _authors_to_ours(state), "authors"
        obj = state
    elif isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    state = _strip_prefix(dict(obj), "module.")
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MPSCLIPError(f"{path}: not a checkpoint (no tensors under 'model', 'state_dict' or the top level)")
    if any(".g2adapter." in k for k in state):
        return {f"clip.{k}" if not k.startswith(("mpr_head.", "temp")) else k: v for k, v in state.items()}, "authors"
    return state, "backbone"


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's and GeoRSCLIP's CLIP releases): a zip holding
    ``<name>/constants.pkl`` or a ``<name>/code/`` folder. Reads the zip's directory only; runs nothing."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.split("/")[1:] == ["constants.pkl"] or name.split("/")[1:2] == ["code"] for name in names)


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _authors_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith(_RECOMPUTED_SUFFIX):
            continue  # fixed sinusoidal tables: recomputed, not loaded
        out["clip." + key[len("model.") :] if key.startswith("model.") else key] = value
    return out


def load_strict(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, require_adapters: bool, arch: str
) -> None:
    """Load ``state`` into ``model`` (built for ``arch``) or raise naming the first offending keys. Without
    ``require_adapters`` (a backbone-only file), adapter, MPR and ``temp`` entries keep their initial values."""
    expected = model.state_dict()
    optional = set() if require_adapters else {k for k in expected if not k.startswith("clip.") or ".g2adapter." in k}
    optional.add("clip.logit_bias")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise MPSCLIPError(
            f"{path}: {len(unexpected)} unexpected keys, e.g. {_first(unexpected)}; "
            "is this a checkpoint of another model family?"
        )
    missing = [k for k in expected if k not in state and k not in optional]
    adapter_missing = [k for k in missing if ".g2adapter." in k or k.startswith("mpr_head.")]
    if adapter_missing:
        raise MPSCLIPError(
            f"{path}: {len(adapter_missing)} adapter/MPR keys are missing, e.g. {_first(adapter_missing)}; "
            "the file is incomplete or from another MPS-CLIP variant"
        )
    if missing:
        raise MPSCLIPError(f"{path}: {len(missing)} keys are missing, e.g. {_first(missing)}")
    mismatched = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if mismatched:
        detail = ", ".join(
            f"{k} (file {list(state[k].shape)} vs model {list(expected[k].shape)})" for k in mismatched[:_SHOWN]
        )
        raise MPSCLIPError(
            f"{path}: does not fit architecture {arch!r}: {len(mismatched)} tensors differ in "
            f"shape, first: {detail}; pass the arch the checkpoint was trained with (--arch)"
        )
    model.load_state_dict(state, strict=False)


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (" ..." if len(keys) > _SHOWN else "")
