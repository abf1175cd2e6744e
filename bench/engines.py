"""The engine × tower × batch size × precision grid of ``mpsclip bench`` (issue 14).

For each checkpoint: the torch eager fp32 model is the parity reference; every engine asked for is loaded
(exported engines from ``--engine-dir KIND=DIR``, or exported on the fly by :mod:`mpsclip.bench.builds`, one
folder per tower), its embeddings are compared with the reference (minimum cosine over a fixed batch)
*before* anything is timed, and an engine below the gate fails the run. Each cell's first call and probe
are timed as soon as its engine passes (:func:`mpsclip.bench.timing.probe`). The plain baseline is
``open_clip.create_model(arch)`` (random weights, same device and precision); each row's ``ratio_to_plain``
is the baseline's p50 over the row's p50 (above 1: faster than plain). An engine that cannot run here is a
record of ``skipped`` with the reason.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mpsclip.bench.builds import ExportJob
from mpsclip.bench.timing import PLAIN, Cell, Timer, TimingSettings, probe

from mpsclip.engines import EXPORTED, Engine, engine_availability, load_engine
from mpsclip.engines.base import precision_dtype
from mpsclip.errors import MPSCLIPError
from mpsclip.family import RetrievalModel

PARITY_MIN_COSINE = {"fp32": 0.999, "fp16": 0.99, "bf16": 0.98, "int8": 0.95}
"""The gate: an engine whose embeddings fall below this cosine against torch eager fp32 fails the run."""
PARITY_BATCH = 2
ROTATING_INPUTS = 3
WORDS = "storage tanks next to a harbour with boats many green trees around the white buildings road river bridge"


@dataclass(frozen=True)
class GridSettings:
    engines: tuple[str, ...]
    towers: tuple[str, ...] = ("image", "text")
    batch_sizes: tuple[int, ...] = (1, 8)
    precisions: tuple[str, ...] = ("fp32",)
    device: str = "auto"
    baseline: str | None = PLAIN
    repeats: int = 10
    """Timed rounds per group of cells (with ``duration``: the most)."""
    warmup: int = 2
    duration: float | None = None
    """Seconds for the whole grid's timed rounds (each group gets its share), or None."""
    engine_dirs: dict[str, str] = field(default_factory=dict)
    """Export folders by ``KIND`` (any precision) or ``KIND:PRECISION`` (that precision only: an fp32 and an int8
    folder of one engine side by side)."""
    seed: int = 0
    build_workers: int | None = None
    """Processes exporting on the fly (None: one per CPU core, at most one per export)."""

    def engine_dir(self, kind: str, precision: str) -> str | None:
        """The export folder given for ``kind`` at ``precision``, or None (then it is exported on the fly)."""
        return self.engine_dirs.get(f"{kind}:{precision}", self.engine_dirs.get(kind))

    @property
    def timing(self) -> TimingSettings:
        return TimingSettings(self.repeats, self.warmup, self.duration)

    def workers(self, jobs: int) -> int:
        return max(1, min(jobs, self.build_workers or os.cpu_count() or 1))


@dataclass
class EngineRecord:
    model: str
    engine: str
    precision: str
    status: str
    """``ok``, ``skipped`` (with ``reason``) or ``failed parity``."""
    reason: str | None = None
    export_s: float | None = None
    """Seconds exporting on the fly, summed over towers (they may have run in parallel); None otherwise."""
    load_s: float | None = None
    source: str | None = None
    parity_min_cosine: dict[str, float] = field(default_factory=dict)


def model_inputs(model: RetrievalModel, tower: str, batch: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    """``ROTATING_INPUTS`` different batches, so no cache sees the same input twice in a row."""
    gen = torch.Generator().manual_seed(seed + batch)
    if tower == "image":
        size = int(model.image_size)  # type: ignore[attr-defined]
        return [torch.randn(batch, 3, size, size, generator=gen).to(device) for _ in range(ROTATING_INPUTS)]
    words = WORDS.split()
    out = []
    for _ in range(ROTATING_INPUTS):
        lengths = torch.randint(3, 30, (batch,), generator=gen).tolist()
        picks = [torch.randint(0, len(words), (n,), generator=gen).tolist() for n in lengths]
        out.append(model.tokenize([" ".join(words[i] for i in p) for p in picks]).to(device))
    return out


def plain_model(arch: str, device: torch.device) -> torch.nn.Module:
    """Plain open_clip of ``arch`` with random weights: the baseline every row is measured against."""
    import open_clip

    import mpsclip.backbone  # noqa: F401  (registers the shipped arch configs with open_clip)

    return open_clip.create_model(arch).eval().to(device)


def plain_call(model: torch.nn.Module, tower: str, device: torch.device, precision: str) -> Callable:
    encode = getattr(model, f"encode_{tower}")
    dtype = precision_dtype(precision)  # int8 rows are set beside plain fp32 (float32 here)

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            return F.normalize(encode(x).float(), dim=-1)

    return call


def engine_call(engine: Engine, tower: str) -> Callable[[torch.Tensor], torch.Tensor]:
    encode = getattr(engine, f"encode_{tower}")

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return encode(x)

    return call


def skip_reason(kind: str, precision: str, device: torch.device) -> str | None:
    """Why ``kind`` at ``precision`` cannot be benchmarked on ``device``, or None."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"no CUDA GPU is visible here (asked for {device}); run on a GPU machine or pass --device cpu"
    reason = engine_availability(kind, device)
    if reason is not None:
        return reason
    if kind == "optimized" and device.type != "cuda" and precision != "fp32":
        return "the optimized engine runs fp32 on the CPU (its fused kernels need a GPU); bench it with fp32"
    if kind == "optimized" and device.type == "cuda" and precision == "fp32":
        return "the optimized engine runs fp16 or bf16 on a GPU; bench it with --precision fp16"
    if kind in ("onnxruntime", "aoti", "tensorrt") and precision == "bf16":
        return f"{kind} exports are fp32 or fp16"
    if precision == "int8" and kind != "onnxruntime":
        return "int8 towers are onnxruntime exports (mpsclip export --format onnx --precision int8)"
    return None


def parity(engines: dict[str, Engine], reference: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
           ) -> dict[str, float]:
    """Minimum cosine per tower between each tower's engine and the reference embeddings of the same inputs."""
    out = {}
    for tower, engine in engines.items():
        got = engine_call(engine, tower)(inputs[tower]).float().cpu()
        out[tower] = round(float(F.cosine_similarity(got, reference[tower], dim=-1).min()), 6)
    return out


def check_parity(record: EngineRecord) -> None:
    gate = PARITY_MIN_COSINE[record.precision]
    bad = {t: c for t, c in record.parity_min_cosine.items() if not c >= gate}
    if bad:
        record.status = "failed parity"
        worst = ", ".join(f"{t} tower min cosine {c:.4f}" for t, c in bad.items())
        raise MPSCLIPError(
            f"parity gate: the {record.engine} engine ({record.precision}) of {record.model} gives {worst} against "
            f"torch eager fp32 (gate {gate}); its timings would measure a wrong engine, so nothing was timed. "
            f"Re-export the checkpoint, or leave the engine out with --engines"
        )


def export_jobs(models: list[tuple[str, Path]], settings: GridSettings, device: torch.device, folder: Path
                ) -> list[ExportJob]:
    """One job per model × exported engine × precision × tower to build on the fly (not in ``--engine-dir``,
    not skipped here), each into its own folder under ``folder``."""
    jobs = []
    for name, checkpoint in models:
        for kind in (k for k in settings.engines if k in EXPORTED):
            for precision in settings.precisions:
                if skip_reason(kind, precision, device) is None and settings.engine_dir(kind, precision) is None:
                    jobs += [ExportJob(name, checkpoint, kind, precision, tower, max(settings.batch_sizes),
                                       device.type, folder / f"{len(jobs) + i:02d}-{kind}-{precision}-{tower}")
                             for i, tower in enumerate(settings.towers)]
    return jobs


@dataclass
class ModelGrid:
    """One checkpoint's engine records and its probed cells (every engine loaded and parity-checked)."""

    name: str
    records: list[EngineRecord]
    cells: list[Cell]


def _engines(kind: str, source: RetrievalModel | dict[str, Path], settings: GridSettings, precision: str,
             device: torch.device, sha: str) -> dict[str, Engine]:
    """The engine per tower: one model engine for both, an ``--engine-dir`` folder, or the per-tower exports."""
    if not isinstance(source, dict):
        engine = load_engine(kind, source, device, precision=precision)
        return {t: engine for t in settings.towers if t in engine.towers}
    folder = settings.engine_dir(kind, precision)
    if folder is not None:
        engine = load_engine(kind, folder, device, precision=precision, checkpoint_sha256=sha)
        return {t: engine for t in settings.towers if t in engine.towers}
    return {t: load_engine(kind, path, device, precision=precision, checkpoint_sha256=sha)
            for t, path in source.items()}


def prepare(name: str, model: RetrievalModel, sha: str, settings: GridSettings, device: torch.device,
            exports: dict[tuple[str, str, str, str], tuple[Path, float]]) -> ModelGrid:
    """Load every engine of ``settings`` for one model, check parity (raises on a failed gate), probe its cells.

    ``exports``: the folder and export seconds of each (model, kind, precision, tower) built on the fly."""
    records: list[EngineRecord] = []
    cells: list[Cell] = []
    timer = Timer(device)
    model = model.eval().to(device)  # type: ignore[attr-defined]
    reference_engine = load_engine("torch", model, device)
    parity_inputs = {t: model_inputs(model, t, PARITY_BATCH, device, settings.seed + 99)[0] for t in settings.towers}
    reference = {t: engine_call(reference_engine, t)(x).float().cpu() for t, x in parity_inputs.items()}
    inputs = {(t, b): model_inputs(model, t, b, device, settings.seed) for t in settings.towers
              for b in settings.batch_sizes}

    def add_cells(kind: str, precision: str, tower: str, call: Callable, batch_range: tuple[int, int] | None) -> None:
        for batch in settings.batch_sizes:
            low, high = batch_range or (1, batch)
            if low <= batch <= high:
                cells.append(Cell(name, kind, precision, tower, batch, call, inputs[(tower, batch)]))
                probe(cells[-1], timer)

    if settings.baseline == PLAIN:
        plain = plain_model(str(model.config_dict()["arch"]), device)
        for precision in settings.precisions:
            for tower in settings.towers:
                add_cells(PLAIN, precision, tower, plain_call(plain, tower, device, precision), None)
    for kind in settings.engines:
        for precision in settings.precisions:
            record = EngineRecord(name, kind, precision, "ok")
            records.append(record)
            reason = skip_reason(kind, precision, device)
            if reason is not None:
                record.status, record.reason = "skipped", reason
                continue
            built = {t: exports[(name, kind, precision, t)] for t in settings.towers
                     if (name, kind, precision, t) in exports}
            source: RetrievalModel | dict[str, Path] = model if kind not in EXPORTED else {
                t: folder for t, (folder, _) in built.items()}
            if built:
                record.export_s, record.source = round(sum(s for _, s in built.values()), 3), "exported on the fly"
            elif settings.engine_dir(kind, precision) is not None:
                record.source = settings.engine_dir(kind, precision)
            start = time.perf_counter()
            engines = _engines(kind, source, settings, precision, device, sha)
            record.load_s = round(time.perf_counter() - start, 3)
            record.parity_min_cosine = parity(engines, reference, parity_inputs)
            check_parity(record)
            for tower, engine in engines.items():
                add_cells(kind, precision, tower, engine_call(engine, tower), engine.batch_sizes)
    return ModelGrid(name, records, cells)


def records_json(records: list[EngineRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
