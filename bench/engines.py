"""The engine × tower × batch size × precision grid of ``mpsclip bench`` (issue 14).

For each checkpoint: the torch eager fp32 model is the parity reference; every engine asked for is loaded
(exported engines from ``--engine-dir KIND=DIR`` or exported on the fly into a temporary folder), its
embeddings are compared with the reference (minimum cosine over a fixed batch) *before* anything is timed,
and an engine below the gate fails the run. Then each cell is timed: the first call alone (compilation,
capture, session start-up), ``warmup`` calls, then ``repeats`` calls (or as many as fit the cell's share of
``--duration``) on rotating inputs, with CUDA events on a GPU and ``perf_counter_ns`` on a CPU. The plain
baseline is ``open_clip.create_model(arch)`` (random weights, same device and precision) timed in the same
run; each row's ``ratio_to_plain`` is the baseline's p50 over the row's p50 (above 1: faster than plain).
An engine that cannot run here is a row of ``skipped`` with the reason.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mpsclip.checkpoints import file_sha256
from mpsclip.engines import EXPORTED, Engine, engine_availability, load_engine
from mpsclip.engines.base import precision_dtype
from mpsclip.errors import MPSCLIPError
from mpsclip.family import RetrievalModel

EXPORT_FORMAT = {"onnxruntime": "onnx", "tensorrt": "tensorrt", "aoti": "aoti"}
PARITY_MIN_COSINE = {"fp32": 0.999, "fp16": 0.99, "bf16": 0.98}
"""The gate: an engine whose embeddings fall below this cosine against torch eager fp32 fails the run."""
PARITY_BATCH = 2
ROTATING_INPUTS = 3
PLAIN = "plain"
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
    warmup: int = 2
    duration: float | None = None
    """Seconds for the whole grid's timed calls (the repeats of each cell are cut to fit), or None."""
    engine_dirs: dict[str, str] = field(default_factory=dict)
    seed: int = 0


@dataclass
class EngineRecord:
    model: str
    engine: str
    precision: str
    status: str
    """``ok``, ``skipped`` (with ``reason``) or ``failed parity``."""
    reason: str | None = None
    build_s: float | None = None
    source: str | None = None
    parity_min_cosine: dict[str, float] = field(default_factory=dict)


@dataclass
class Row:
    model: str
    engine: str
    tower: str
    batch: int
    precision: str
    first_call_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    items_per_s: float
    samples: int
    ratio_to_plain: float | None = None


@dataclass
class Cell:
    name: str
    """``plain`` or an engine kind."""
    precision: str
    tower: str
    batch: int
    call: Callable[[torch.Tensor], object]
    inputs: Callable[[int], list[torch.Tensor]]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Timer:
    """Milliseconds of one call: CUDA events on a GPU, ``perf_counter_ns`` on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        begin = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - begin) / 1e6


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


def time_cell(cell: Cell, timer: Timer, repeats: int, warmup: int, seconds: float | None) -> tuple[float, list[float]]:
    """The first call's milliseconds and the timed samples (at least 2; fewer than ``repeats`` past ``seconds``)."""
    inputs = cell.inputs(cell.batch)
    first = timer(lambda: cell.call(inputs[0]))
    for i in range(warmup):
        cell.call(inputs[(i + 1) % len(inputs)])
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(repeats):
        x = inputs[i % len(inputs)]
        samples.append(timer(lambda x=x: cell.call(x)))
        if seconds is not None and len(samples) >= 2 and time.perf_counter() - started > seconds:
            break
    return first, samples


def plain_model(arch: str, device: torch.device) -> torch.nn.Module:
    """Plain open_clip of ``arch`` with random weights: the baseline every row is measured against."""
    import open_clip

    import mpsclip.backbone  # noqa: F401  (registers the shipped arch configs with open_clip)

    return open_clip.create_model(arch).eval().to(device)


def plain_call(model: torch.nn.Module, tower: str, device: torch.device, precision: str) -> Callable:
    encode = getattr(model, f"encode_{tower}")
    dtype = precision_dtype(precision)

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=precision != "fp32"):
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
    return None


@contextlib.contextmanager
def exported_source(kind: str, checkpoint: Path, settings: GridSettings, precision: str, device: torch.device,
                    ) -> Iterator[tuple[Path, float | None]]:
    """The export folder for ``kind``: ``--engine-dir`` when given, else one exported now into a temp folder."""
    if kind in settings.engine_dirs:
        yield Path(settings.engine_dirs[kind]), None
        return
    from mpsclip.export import export

    with tempfile.TemporaryDirectory(prefix=f"mpsclip-bench-{kind}-") as tmp:
        start = time.perf_counter()
        folder = export(
            checkpoint, EXPORT_FORMAT[kind], Path(tmp) / kind, precision=precision, towers=settings.towers,
            min_batch=1, opt_batch=max(settings.batch_sizes), max_batch=max(settings.batch_sizes), verify=False,
            device=device.type if kind == "aoti" else None,
        )
        yield folder, time.perf_counter() - start


def parity(engine: Engine, reference: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Minimum cosine per tower between ``engine`` and the reference embeddings of the same inputs."""
    out = {}
    for tower, x in inputs.items():
        got = engine_call(engine, tower)(x).float().cpu()
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


@dataclass
class ModelGrid:
    """One checkpoint's engines (loaded and parity-checked) and the cells to time."""

    name: str
    records: list[EngineRecord]
    cells: list[Cell]
    stack: contextlib.ExitStack
    probe_ms: dict[tuple[str, str, str], float]
    """Per (engine, precision, tower): one parity call's ms at batch PARITY_BATCH, for the time estimate."""


def prepare(name: str, checkpoint: Path, model: RetrievalModel, settings: GridSettings, device: torch.device
            ) -> ModelGrid:
    """Load every engine of ``settings`` for one checkpoint and check parity (raises on a failed gate)."""
    stack = contextlib.ExitStack()
    records: list[EngineRecord] = []
    cells: list[Cell] = []
    probe: dict[tuple[str, str, str], float] = {}
    model = model.eval().to(device)  # type: ignore[attr-defined]
    reference_engine = load_engine("torch", model, device)
    parity_inputs = {t: model_inputs(model, t, PARITY_BATCH, device, settings.seed + 99)[0] for t in settings.towers}
    reference = {t: engine_call(reference_engine, t)(x).float().cpu() for t, x in parity_inputs.items()}
    sha = file_sha256(checkpoint)

    def inputs_for(tower: str) -> Callable[[int], list[torch.Tensor]]:
        return lambda batch: model_inputs(model, tower, batch, device, settings.seed)

    try:
        if settings.baseline == PLAIN:
            arch = str(model.config_dict()["arch"])
            plain = plain_model(arch, device)
            for precision in settings.precisions:
                for tower in settings.towers:
                    call = plain_call(plain, tower, device, precision)
                    begin = time.perf_counter()
                    call(parity_inputs[tower])
                    probe[(PLAIN, precision, tower)] = (time.perf_counter() - begin) * 1e3
                    cells += [Cell(PLAIN, precision, tower, b, call, inputs_for(tower)) for b in settings.batch_sizes]
        for kind in settings.engines:
            for precision in settings.precisions:
                record = EngineRecord(name, kind, precision, "ok")
                records.append(record)
                reason = skip_reason(kind, precision, device)
                if reason is not None:
                    record.status, record.reason = "skipped", reason
                    continue
                start = time.perf_counter()
                if kind in EXPORTED:
                    folder, build = stack.enter_context(exported_source(kind, checkpoint, settings, precision, device))
                    record.source = str(folder) if kind in settings.engine_dirs else "exported on the fly"
                    engine = load_engine(kind, folder, device, precision=precision, checkpoint_sha256=sha)
                    record.build_s = round((build or 0.0) + time.perf_counter() - start, 3)
                else:
                    engine = load_engine(kind, model, device, precision=precision)
                    record.build_s = round(time.perf_counter() - start, 3)
                towers = [t for t in settings.towers if t in engine.towers]
                record.parity_min_cosine = parity(engine, reference, {t: parity_inputs[t] for t in towers})
                check_parity(record)
                for tower in towers:
                    call = engine_call(engine, tower)
                    begin = time.perf_counter()
                    call(parity_inputs[tower])
                    probe[(kind, precision, tower)] = (time.perf_counter() - begin) * 1e3
                    for batch in settings.batch_sizes:
                        low, high = engine.batch_sizes or (1, batch)
                        if low <= batch <= high:
                            cells.append(Cell(kind, precision, tower, batch, call, inputs_for(tower)))
    except BaseException:
        stack.close()
        raise
    return ModelGrid(name, records, cells, stack, probe)


def estimate_seconds(grids: list[ModelGrid], settings: GridSettings) -> float:
    """Expected seconds of the timed part: each cell's calls at its probe's per-item time (linear in batch)."""
    total = 0.0
    for grid in grids:
        for cell in grid.cells:
            per_call = grid.probe_ms[(cell.name, cell.precision, cell.tower)] / PARITY_BATCH * max(cell.batch, 1)
            total += (1 + settings.warmup + settings.repeats) * per_call / 1e3
    return total if settings.duration is None else min(total, settings.duration + 0.2 * total)


def run_grid(grids: list[ModelGrid], settings: GridSettings, device: torch.device, progress: bool = True
             ) -> list[Row]:
    """Time every cell; rows carry their ratio to the plain baseline of the same model, tower, batch, precision.

    Cells run grouped by (tower, batch, precision), the baseline first, so that each ratio compares timings
    taken close together on a machine whose load drifts."""
    timer = Timer(device)
    order = {name: i for i, name in enumerate(dict.fromkeys(c.name for g in grids for c in g.cells))}
    cells = [(grid.name, cell) for grid in grids for cell in grid.cells]
    cells.sort(key=lambda mc: (mc[0], mc[1].tower, mc[1].batch, mc[1].precision, order[mc[1].name]))
    share = None if settings.duration is None else settings.duration / max(1, len(cells))
    rows: list[Row] = []
    bar = tqdm(cells, desc="bench", unit="cell", disable=not progress)
    for model_name, cell in bar:
        bar.set_postfix_str(f"{model_name} {cell.name} {cell.tower} b{cell.batch} {cell.precision}")
        first, samples = time_cell(cell, timer, settings.repeats, settings.warmup, share)
        p50 = percentile(samples, 50)
        rows.append(
            Row(
                model_name, cell.name, cell.tower, cell.batch, cell.precision, round(first, 3), round(p50, 3),
                round(percentile(samples, 90), 3), round(percentile(samples, 99), 3),
                round(cell.batch / (p50 / 1e3), 1), len(samples),
            )
        )
    bar.close()
    plain = {(r.model, r.tower, r.batch, r.precision): r.p50_ms for r in rows if r.engine == PLAIN}
    for row in rows:
        base = plain.get((row.model, row.tower, row.batch, row.precision))
        row.ratio_to_plain = None if base is None else round(base / row.p50_ms, 3)
    return rows


def records_json(records: list[EngineRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
