"""Reading caption records, merging extracted nouns into them, and writing outputs and failure reports.

A record is a dict with a ``caption`` (a string, or a list of strings for per-image records) and optionally
``nouns``. Readers return ``list[Record]``; a new source (e.g. captions generated from images) only needs a new
reader that returns the same shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write

Record = dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """The result of extracting nouns from one caption: ``nouns`` on success, else ``error``."""

    nouns: list[str] | None = None
    error: str | None = None


@dataclass(frozen=True)
class Failure:
    index: int
    caption: str
    error: str


def read_records(path: Path) -> list[Record]:
    """Records from a JSON annotation file (``.json``) or a plain-text file with one caption per line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MPSCLIPError(f"cannot read input {path}: {err}; pass a UTF-8 .json or .txt caption file") from err
    if Path(path).suffix.lower() == ".json":
        return parse_json_records(text, str(path))
    return [{"caption": line.strip()} for line in text.splitlines() if line.strip()]


def parse_json_records(text: str, source: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MPSCLIPError(f"{source} is not valid JSON ({err}); fix the file or pass a plain-text file") from err
    if not isinstance(data, list):
        raise MPSCLIPError(f"{source}: expected a JSON list of records with a 'caption', got {type(data).__name__}")
    for index, record in enumerate(data):
        if not isinstance(record, dict) or "caption" not in record:
            raise MPSCLIPError(f"{source}: record {index} has no 'caption'; every record needs one")
        captions_of(record, where=f"{source}: record {index}")
    return data


def captions_of(record: Record, where: str = "record") -> list[str]:
    caption = record["caption"]
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, list) and all(isinstance(item, str) for item in caption):
        return list(caption)
    raise MPSCLIPError(f"{where}: 'caption' must be a string or a list of strings, got {caption!r:.80}")


def reference_nouns(records: list[Record], source: str) -> list[list[str]]:
    """The ``nouns`` already in the records, for scoring; every record must have them."""
    missing = [index for index, record in enumerate(records) if not isinstance(record.get("nouns"), list)]
    if missing:
        raise MPSCLIPError(
            f"{source}: {len(missing)} records (first: {missing[0]}) have no 'nouns' list to score against; "
            "score against a file with reference nouns"
        )
    return [[str(noun) for noun in record["nouns"]] for record in records]


def merge_outcomes(records: list[Record], outcomes: list[Outcome]) -> tuple[list[Record], list[Failure]]:
    """New records with ``nouns`` set from the outcomes of all their captions, in record then caption order.

    A record with any failed caption keeps its old ``nouns`` (or none) and each failure is reported.
    """
    expected = sum(len(captions_of(record)) for record in records)
    if expected != len(outcomes):
        raise ValueError(f"{len(outcomes)} outcomes for {expected} captions")
    merged: list[Record] = []
    failures: list[Failure] = []
    position = 0
    for index, record in enumerate(records):
        captions = captions_of(record)
        mine = outcomes[position : position + len(captions)]
        position += len(captions)
        errors = [Failure(index, caption, out.error) for caption, out in zip(captions, mine, strict=True) if out.error]
        failures.extend(errors)
        updated = dict(record)
        if not errors:
            updated["nouns"] = list(dict.fromkeys(noun for out in mine for noun in out.nouns or []))
        merged.append(updated)
    return merged, failures


def json_text(data: object) -> str:
    """Records and reports as written: UTF-8 JSON (non-ASCII kept), one-space indent, final newline."""
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


def failures_path(output: Path) -> Path:
    return Path(output).with_name(Path(output).name + ".failures.json")


def write_outputs(output: Path, records: list[Record], failures: list[Failure]) -> None:
    """Write the records; write ``<output>.failures.json`` when there are failures, else remove a stale one."""
    atomic_write(output, json_text(records))
    report = failures_path(output)
    if failures:
        atomic_write(report, json_text([vars(failure) for failure in failures]))
    else:
        report.unlink(missing_ok=True)
