"""The exported engines ``mpsclip bench`` builds on the fly: one ``mpsclip export`` folder per tower, in parallel.

Each job exports one tower of one checkpoint in one format and precision (no verification: the bench's own
parity gate checks every engine against torch eager). Exporting a tower is mostly single-threaded Python
(``torch.export`` and Inductor's code generation, the AOTInductor C++ build aside), so the jobs run in
``workers`` spawned processes, longest first (AOTInductor before ONNX, larger checkpoints first); with one
worker they run in this process.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

EXPORT_FORMAT = {"onnxruntime": "onnx", "tensorrt": "tensorrt", "aoti": "aoti"}
SLOWEST_FIRST = ("aoti", "tensorrt", "onnxruntime")
BENCH_CALIBRATION_ITEMS, BENCH_GATE_ITEMS = 64, 128
"""int8 exports made on the fly: a small calibration and gate store (a real export: mpsclip export, 2,000 items)."""


@dataclass(frozen=True)
class ExportJob:
    model: str
    checkpoint: Path
    kind: str
    precision: str
    tower: str
    max_batch: int
    device: str
    """``cpu`` or ``cuda``: what an AOTInductor package is compiled for."""
    folder: Path

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.model, self.kind, self.precision, self.tower)


def run_job(job: ExportJob) -> float:
    """Export one tower into ``job.folder``; the seconds it took."""
    from mpsclip.export import GateSettings, export

    start = time.perf_counter()
    int8 = job.precision == "int8"  # bench towers have random weights: the gate's figures are kept, not enforced
    export(
        job.checkpoint, EXPORT_FORMAT[job.kind], job.folder, precision=job.precision, towers=(job.tower,),
        min_batch=1, opt_batch=job.max_batch, max_batch=job.max_batch, verify=False,
        device=job.device if job.kind == "aoti" else None,
        calibration_items=BENCH_CALIBRATION_ITEMS,
        gate=GateSettings(store_items=BENCH_GATE_ITEMS, queries=50, min_overlap=0.0, min_cosine=0.9) if int8 else None,
    )
    return time.perf_counter() - start


def _report(job: ExportJob, seconds: float) -> None:
    print(f"bench: exported {job.model} {job.kind} {job.precision} {job.tower} tower in {seconds:.0f} s",
          file=sys.stderr, flush=True)


def build_all(jobs: list[ExportJob], workers: int) -> dict[tuple[str, str, str, str], float]:
    """Run every job (``workers`` at a time); seconds per job key. The first failure is raised."""
    jobs = sorted(jobs, key=lambda j: (SLOWEST_FIRST.index(j.kind), -j.checkpoint.stat().st_size))
    if workers <= 1 or len(jobs) <= 1:
        seconds = {}
        for job in jobs:
            seconds[job.key] = run_job(job)
            _report(job, seconds[job.key])
        return seconds
    seconds = {}
    context = multiprocessing.get_context("spawn")  # a forked torch process may hang in its thread pools
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context)
    try:
        futures = {pool.submit(run_job, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            seconds[job.key] = future.result()
            _report(job, seconds[job.key])
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure: the jobs not started yet are dropped
    return seconds
