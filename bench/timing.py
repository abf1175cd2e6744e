"""Timing of ``mpsclip bench`` cells: interleaved rounds, percentiles, and the estimate printed before timing.

A *cell* is one engine (or the plain baseline) × tower × batch size × precision; a *group* is every cell of
one model, tower, batch size and precision. Each cell's first call and one more (the *probe*) are timed when
it is prepared; the group's cells are then timed together in rounds, one call of each cell per round (the
order rotating), so that a load that drifts on a shared machine weighs on an engine and on its baseline
alike. ``--repeats`` rounds are timed, or with ``--duration`` as many as fit the group's share of it (at
least :data:`MIN_ROUNDS`). The estimate follows the same rules from the probes, so it is what the timing
will take as long as the machine's load stays as it was during the probes; :func:`estimate_message` says how it
relates to ``--duration`` (which counts timed rounds only: warm-up calls come on top, a group's last round ends
past its share, a slow group still gets MIN_ROUNDS rounds and a fast one stops at ``--repeats``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

PLAIN = "plain"
MIN_ROUNDS = 3
"""Timed rounds of a group even when its share of ``--duration`` is spent (p50/p90 need a few samples)."""


@dataclass(frozen=True)
class TimingSettings:
    repeats: int = 10
    """Timed rounds per group (with ``duration``: the most)."""
    warmup: int = 2
    """Untimed calls per cell after its first (the probe is one of them)."""
    duration: float | None = None
    """Seconds for all timed rounds, shared among groups in proportion to their cells; or None."""


@dataclass
class Cell:
    model: str
    name: str
    """``plain`` or an engine kind."""
    precision: str
    tower: str
    batch: int
    call: Callable[[torch.Tensor], object]
    inputs: list[torch.Tensor]
    """Rotating inputs: no cache sees the same input twice in a row."""
    first_call_ms: float = math.nan
    probe_ms: float = math.nan

    @property
    def group(self) -> tuple[str, str, int, str]:
        return (self.model, self.tower, self.batch, self.precision)


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


def probe(cell: Cell, timer: Timer) -> None:
    """Time the cell's first call (compilation, session start-up, a new shape) and a second one (the probe)."""
    cell.first_call_ms = timer(lambda: cell.call(cell.inputs[0]))
    cell.probe_ms = timer(lambda: cell.call(cell.inputs[1 % len(cell.inputs)]))


def groups_of(cells: Iterable[Cell]) -> dict[tuple[str, str, int, str], list[Cell]]:
    """Cells by group in first-seen order, the plain baseline first within each group."""
    out: dict[tuple[str, str, int, str], list[Cell]] = {}
    for cell in cells:
        out.setdefault(cell.group, []).append(cell)
    return {key: sorted(group, key=lambda c: c.name != PLAIN) for key, group in out.items()}


def shares(groups: dict[Any, list[Cell]], duration: float | None) -> dict[Any, float | None]:
    total = sum(len(g) for g in groups.values())
    return {key: None if duration is None else duration * len(g) / max(1, total) for key, g in groups.items()}


def expected_rounds(round_s: float, share: float | None, repeats: int) -> int:
    """The rounds :func:`time_group` runs when each takes ``round_s``: it stops after the first that ends
    past ``share`` (once :data:`MIN_ROUNDS` are done), or at ``repeats``."""
    if share is None:
        return repeats
    past = math.floor(share / round_s) + 1 if round_s > 0 else repeats
    return min(repeats, max(MIN_ROUNDS, past))


@dataclass(frozen=True)
class Estimate:
    """What :func:`run_grid` is expected to take, in parts: warm-up calls and timed rounds (seconds), and how
    many groups (of ``groups``) stop at ``--repeats`` before their share of ``--duration`` is spent (``capped``)
    or run their MIN_ROUNDS past it (``floored``)."""

    warmup_s: float
    rounds_s: float
    groups: int
    capped: int = 0
    floored: int = 0

    @property
    def total_s(self) -> float:
        return self.warmup_s + self.rounds_s


def estimate(cells: list[Cell], settings: TimingSettings) -> Estimate:
    """The :class:`Estimate` for probed ``cells``: each group's calls at its cells' probe times."""
    groups = groups_of(cells)
    warmup_s = rounds_s = 0.0
    capped = floored = 0
    for key, share in shares(groups, settings.duration).items():
        round_s = sum(c.probe_ms for c in groups[key]) / 1e3
        rounds = expected_rounds(round_s, share, settings.repeats)
        warmup_s += max(0, settings.warmup - 1) * round_s
        rounds_s += rounds * round_s
        if share is not None:
            capped += rounds == settings.repeats and rounds * round_s < share
            floored += rounds == MIN_ROUNDS and (rounds - 1) * round_s > share
    return Estimate(warmup_s, rounds_s, len(groups), capped, floored)


def estimate_seconds(cells: list[Cell], settings: TimingSettings) -> float:
    """Seconds :func:`run_grid` is expected to take for probed ``cells``: warm-up calls and timed rounds at
    each cell's probe time."""
    return estimate(cells, settings).total_s


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def estimate_message(found: Estimate, settings: TimingSettings) -> str:
    """The estimate as 'mpsclip bench' prints it before timing: with ``--duration``, its timed rounds next to
    ``--duration`` and why they differ from it, if they do."""
    head = f"timing will take about {_seconds(found.total_s)}"
    warmup = f"{_seconds(found.warmup_s)} of warm-up calls"
    if settings.duration is None:
        return f"{head} ({settings.repeats} timed rounds per group, {warmup})"
    parts = [f"{_seconds(found.rounds_s)} of timed rounds for --duration {settings.duration:g} s", warmup]
    if found.capped:
        parts.append(
            f"{found.capped} of {found.groups} groups stop at --repeats {settings.repeats} rounds before their share"
        )
    if found.floored:
        parts.append(f"{found.floored} of {found.groups} groups run their {MIN_ROUNDS} rounds past their share")
    return f"{head}: " + ", ".join(parts)


def time_group(group: list[Cell], timer: Timer, settings: TimingSettings, share: float | None) -> list[list[float]]:
    """Warm-up calls, then timed rounds (one call per cell, the order rotating); the samples of each cell."""
    n_inputs = len(group[0].inputs)
    for i in range(max(0, settings.warmup - 1)):
        for cell in group:
            cell.call(cell.inputs[(i + 2) % n_inputs])
    samples: list[list[float]] = [[] for _ in group]
    started = time.perf_counter()
    for r in range(settings.repeats):
        for j in range(len(group)):
            index = (j + r) % len(group)
            x = group[index].inputs[r % n_inputs]
            samples[index].append(timer(lambda c=group[index], x=x: c.call(x)))
        if share is not None and r + 1 >= MIN_ROUNDS and time.perf_counter() - started > share:
            break
    return samples


def summary(cell: Cell, samples: list[float]) -> Row:
    p50 = percentile(samples, 50)
    return Row(
        cell.model, cell.name, cell.tower, cell.batch, cell.precision, round(cell.first_call_ms, 3), round(p50, 3),
        round(percentile(samples, 90), 3), round(percentile(samples, 99), 3), round(cell.batch / (p50 / 1e3), 1),
        len(samples),
    )


def run_grid(cells: list[Cell], settings: TimingSettings, device: torch.device, progress: bool = True) -> list[Row]:
    """Time every group of probed ``cells``; each row carries its ratio to the plain cell of its group."""
    timer = Timer(device)
    groups = groups_of(cells)
    rows: list[Row] = []
    bar = tqdm(total=len(cells), desc="bench", unit="cell", disable=not progress)
    for key, share in shares(groups, settings.duration).items():
        group = groups[key]
        bar.set_postfix_str(f"{key[0]} {key[1]} b{key[2]} {key[3]}")
        for cell, samples in zip(group, time_group(group, timer, settings, share), strict=True):
            rows.append(summary(cell, samples))
        bar.update(len(group))
    bar.close()
    plain = {(r.model, r.tower, r.batch, r.precision): r.p50_ms for r in rows if r.engine == PLAIN}
    for row in rows:
        base = plain.get((row.model, row.tower, row.batch, row.precision))
        row.ratio_to_plain = None if base is None else float(f"{base / row.p50_ms:.4g}")
    return rows
