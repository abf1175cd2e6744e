"""Reading an ``mpsclip export`` folder for an engine: its tower files, batch range, precision and checkpoint.

A manifest names its files relative to its folder, and only files inside it: an absolute path, a ``..`` or a
symbolic link leading out of the folder is refused, naming the manifest key (:func:`contained_file`). What the
files hold is code all the same (AOTInductor packages are shared libraries, TensorRT engines run plugins):
load only exports you made or trust.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mpsclip.errors import MPSCLIPError

TOWER_SUFFIX = {"onnxruntime": ".onnx", "tensorrt": ".plan", "aoti": ".pt2"}
EXPORT_FORMAT = {"onnxruntime": "onnx", "tensorrt": "tensorrt", "aoti": "aoti"}


@dataclass(frozen=True)
class ExportedTowers:
    folder: Path
    files: dict[str, Path]
    """Tower name → artefact file, only the towers of the engine's kind."""
    precision: str
    batch_sizes: tuple[int, int] | None
    checkpoint_sha256: str | None
    device: str | None
    """The device an AOTInductor package was compiled for (None for other formats)."""


def read_export(folder: str | Path, kind: str, checkpoint_sha256: str | None = None) -> ExportedTowers:
    """The towers of ``folder`` for engine ``kind``; refuses a folder exported from another checkpoint."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise MPSCLIPError(f"--engine {folder}: no manifest.json; pass a folder written by mpsclip export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MPSCLIPError(f"{path}: not JSON ({err}); export the checkpoint again with mpsclip export") from err
    exported = manifest.get("checkpoint", {}).get("sha256")
    if checkpoint_sha256 is not None and exported != checkpoint_sha256:
        raise MPSCLIPError(
            f"--engine {folder}: exported from another checkpoint (sha256 {str(exported)[:12]}, "
            f"--checkpoint has {checkpoint_sha256[:12]}); export this checkpoint with mpsclip export"
        )
    suffix = TOWER_SUFFIX[kind]
    towers = manifest.get("towers", {})
    named = {t: contained_file(folder, e.get("file"), f"{path}: towers.{t}.file") for t, e in towers.items()}
    files = {t: file for t, file in named.items() if file.name.endswith(suffix)}
    if not files:
        raise MPSCLIPError(
            f"--engine {folder}: has no {suffix} tower for the {kind} engine; "
            f"export one with: mpsclip export CHECKPOINT --format {EXPORT_FORMAT[kind]}"
        )
    for file in files.values():
        if not file.is_file():
            raise MPSCLIPError(f"{file}: named in {path} but missing; export the checkpoint again")
    batch = manifest.get("batch")
    batch_sizes = (int(batch["min"]), int(batch["max"])) if batch and kind != "onnxruntime" else None
    return ExportedTowers(
        folder=folder,
        files=files,
        precision=str(manifest.get("precision", "fp32")),
        batch_sizes=batch_sizes,
        checkpoint_sha256=exported,
        device=manifest.get("device"),
    )


def contained_file(folder: Path, name: object, where: str) -> Path:
    """``folder / name`` for a relative ``name`` that stays inside ``folder``, symbolic links followed; else an
    error naming ``where`` (the manifest and key)."""
    if not isinstance(name, str) or not name:
        raise MPSCLIPError(f"{where}: {name!r} is not a file name; export the checkpoint again")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise MPSCLIPError(
            f"{where}: {name!r} points outside the export folder; a manifest names only files inside its folder, "
            "relative to it (export the checkpoint again)"
        )
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise MPSCLIPError(
            f"{where}: {name!r} is a symbolic link leading outside the export folder; a manifest names only files "
            "inside its folder (export the checkpoint again)"
        )
    return path
