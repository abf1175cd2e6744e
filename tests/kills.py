"""Test seams that kill a run where a real kill would: an embedding job between two shards, a training run
between two optimizer steps. Each raises :class:`Killed` from inside the run and expects the block to end by it,
so what a test then finds on disk is what a killed process leaves behind."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


class Killed(Exception):
    """Where a test's run is killed."""


@contextmanager
def killed_after_shards(n: int) -> Iterator[None]:
    """The block's embedding job is killed right after it has recorded ``n`` shards (the job's shard writer,
    :func:`mpsclip.archive.job.record_shard`, raises after its ``n``-th shard)."""
    from mpsclip.archive import job

    record, recorded = job.record_shard, []

    def record_then_die(*args: Any) -> None:
        record(*args)
        recorded.append(args[1])
        if len(recorded) == n:
            raise Killed(f"killed after shard {args[1]}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(job, "record_shard", record_then_die)
        with pytest.raises(Killed):
            yield


@contextmanager
def killed_after_steps(n: int) -> Iterator[None]:
    """The block's training run is killed after ``n`` optimizer steps: its data loader (made by
    ``mpsclip.train._epoch_loader``) raises when asked for batch ``n + 1``, counted across epochs."""
    import mpsclip.train as train

    make_loader, steps = train._epoch_loader, [0]

    def loader(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for batch in make_loader(*args, **kwargs):
            if steps[0] == n:
                raise Killed(f"killed after step {n}")
            steps[0] += 1
            yield batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "_epoch_loader", loader)
        with pytest.raises(Killed):
            yield
