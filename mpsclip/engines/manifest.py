"""Reading an ``mpsclip export`` folder for an engine: its tower files, batch range, precision and checkpoint."""

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
    files = {t: folder / e["file"] for t, e in towers.items() if str(e.get("file", "")).endswith(suffix)}
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
