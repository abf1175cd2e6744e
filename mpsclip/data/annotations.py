"""Loaders for the authors' annotation files (RSITMD / RSICD style JSON).

Training files are a JSON list with one record per caption::

    {"caption": "...", "image": "train/bridge_942.tif", "image_id": 539,
     "label_name": "bridge", "label": 0, "nouns": ["river", "bridge"]}

Evaluation files are a JSON list with one record per image::

    {"image": "test/parking_229.tif", "caption": ["...", "..."], "nouns": ["road", "parking", "lot"]}

``label_name``, ``label`` and ``nouns`` are optional. Captions are normalised on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpsclip.data.captions import require_caption
from mpsclip.errors import MPSCLIPError


@dataclass(frozen=True)
class TrainRecord:
    caption: str
    image: str
    image_id: int
    label_name: str | None = None
    label: int | None = None
    nouns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class EvalImage:
    image: str
    captions: tuple[str, ...]
    nouns: tuple[str, ...] | None = None
    label_name: str | None = None
    label: int | None = None


def load_train(path: str | Path, max_words: int = 30) -> list[TrainRecord]:
    """Read a per-caption training file; captions are normalised with :func:`normalize_caption`."""
    path = Path(path)
    records = []
    for i, raw in enumerate(read_json_list(path)):
        where = f"record {i}"
        records.append(
            TrainRecord(
                caption=require_caption(_get(raw, "caption", str, path, where), path, where, max_words),
                image=_get(raw, "image", str, path, where),
                image_id=_get(raw, "image_id", int, path, where),
                label_name=_get(raw, "label_name", str, path, where, required=False),
                label=_get(raw, "label", int, path, where, required=False),
                nouns=_nouns(raw, path, where),
            )
        )
    return records


def load_eval(path: str | Path, max_words: int = 30) -> list[EvalImage]:
    """Read a per-image evaluation file; each record's ``caption`` is a non-empty list of strings."""
    path = Path(path)
    images = []
    for i, raw in enumerate(read_json_list(path)):
        where = f"record {i}"
        captions = _get(raw, "caption", list, path, where)
        if not captions:
            raise MPSCLIPError(f"{path}: {where}: 'caption' is an empty list; give at least one caption")
        normalised = []
        for j, text in enumerate(captions):
            if not isinstance(text, str):
                raise MPSCLIPError(
                    f"{path}: {where}: caption {j} is {type(text).__name__}, expected a string"
                )
            normalised.append(require_caption(text, path, f"{where} caption {j}", max_words))
        images.append(
            EvalImage(
                image=_get(raw, "image", str, path, where),
                captions=tuple(normalised),
                nouns=_nouns(raw, path, where),
                label_name=_get(raw, "label_name", str, path, where, required=False),
                label=_get(raw, "label", int, path, where, required=False),
            )
        )
    return images


def sub_image_paths(sub_root: str | Path, image: str, nouns: list[str] | tuple[str, ...]) -> list[Path]:
    """Existing ``<sub_root>/<image stem>/<noun>_blackbg.png`` files, one per distinct noun, in order."""
    folder = Path(sub_root) / Path(image).stem
    paths = (folder / f"{noun}_blackbg.png" for noun in dict.fromkeys(nouns))
    return [p for p in paths if p.is_file()]


def read_json_list(path: Path) -> list[Any]:
    """The top-level JSON list of an annotation file, or an error naming the file and what is wrong."""
    if not path.is_file():
        raise MPSCLIPError(f"{path}: annotation file not found; check the path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MPSCLIPError(
            f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}; fix the file"
        ) from err
    except UnicodeDecodeError as err:
        raise MPSCLIPError(f"{path}: not UTF-8 text ({err.reason}); save it as UTF-8 JSON") from err
    if not isinstance(data, list):
        raise MPSCLIPError(
            f"{path}: expected a JSON list of records at top level, found {type(data).__name__}"
        )
    return data


def _get(raw: Any, key: str, kind: type, path: Path, where: str, required: bool = True) -> Any:
    if not isinstance(raw, dict):
        raise MPSCLIPError(f"{path}: {where} is {type(raw).__name__}, expected a JSON object")
    if key not in raw:
        if required:
            raise MPSCLIPError(f"{path}: {where} is missing key {key!r}; add it to every record")
        return None
    value = raw[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MPSCLIPError(
            f"{path}: {where}: {key!r} is {type(value).__name__} {value!r}, expected {kind.__name__}"
        )
    return value


def _nouns(raw: Any, path: Path, where: str) -> tuple[str, ...] | None:
    nouns = _get(raw, "nouns", list, path, where, required=False)
    if nouns is None:
        return None
    if not all(isinstance(n, str) for n in nouns):
        raise MPSCLIPError(f"{path}: {where}: 'nouns' must be a list of strings")
    return tuple(nouns)
