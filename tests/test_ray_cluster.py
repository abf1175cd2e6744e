"""`mpsclip embed --ray` on a real multi-node Ray cluster: hosts in network namespaces (mpsclip.bench.raycluster).

The driver runs on the head host, as on a real cluster, and the embedding actors on worker hosts of one CPU each.
What a single-node test cannot show is checked here: shards embedded on several hosts giving the same store as one
process, a worker host lost mid-run, the driver lost mid-run, a host that cannot read the source, and the
driver's memory as the number of shards grows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from extras import expect, require
from mpsclip.bench.raycluster import RayCluster, netns_unavailable, ray_cluster

from mpsclip.archive.job import EmbedSettings, embed_archive
from mpsclip.data.synth import generate

require("ray")
require("ray.data")
expect(netns_unavailable() is None, f"multi-node Ray tests: {netns_unavailable()}")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SHARD = 2
RUN_TIMEOUT_S = 300
TWO_ACTORS = ("--ray-actors", "2")
"""Drivers after a host was killed ask for two actors, not "as many as fit": until Ray's health checks mark the
killed host dead its CPU still counts, and a pool sized on it waits (ACTOR_START_TIMEOUT_S) for an actor that
cannot start."""
PEAK_RSS = (
    "import resource, sys\n"
    "from mpsclip.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)
"""The driver: ``mpsclip`` reporting its own peak resident memory when it ends."""


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twenty synthetic images, one truncated (its failure must travel through the cluster too)."""
    out = tmp_path_factory.mktemp("cluster-synth")
    generate(out, n_train=0, n_test=20, seed=1, image_size=64, workers=1)
    victim = sorted((out / "images").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:100])
    return out / "images"


@pytest.fixture(scope="module")
def reference(images: Path, ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store one process makes on one CPU thread, as each actor of a one-CPU host runs."""
    out = tmp_path_factory.mktemp("cluster-stores") / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = EmbedSettings(batch_size=2, shard_size=SHARD, workers=0, device="cpu")
        embed_archive(images, out, ckpt, settings=settings, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """A head host (driver and control plane, no CPUs) and two worker hosts of one CPU each."""
    with ray_cluster(workers=2) as made:
        yield made


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def _driver(cluster: RayCluster, images: Path, store: Path, ckpt: Path, log: Path, *extra: str) -> list[str]:
    args = ["embed", str(images), "--out", str(store), "--checkpoint", str(ckpt), "--shard-size", str(SHARD)]
    args += ["--batch-size", "2", "--workers", "0", "--device", "cpu", "--quiet"]
    args += ["--ray", "--ray-address", cluster.address, "--ray-log", str(log), *extra]
    return cluster.exec_prefix() + [sys.executable, "-c", PEAK_RSS, *args]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _records(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _wait_for_records(log: Path, count: int, driver: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(_records(log)) < count:
        assert driver.poll() is None, f"the driver ended early: {driver.communicate()}"
        assert time.monotonic() < deadline, "no shard was recorded in time"
        time.sleep(0.2)


def test_shards_on_several_hosts_make_the_single_process_store(
    cluster: RayCluster, images: Path, ckpt: Path, reference: Path, tmp_path: Path
) -> None:
    log = tmp_path / "shards.jsonl"
    done = _run(_driver(cluster, images, tmp_path / "s", ckpt, log))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "19 of 20 items embedded in 10 shards" in done.stdout
    assert "shards per Ray node:" in done.stdout
    records = _records(log)
    assert sorted(r["shard"] for r in records) == list(range(10))
    nodes = {r["node"] for r in records}
    assert len(nodes) == 2 and nodes <= {w.address for w in cluster.workers}, records
    assert _files(tmp_path / "s") == _files(reference)


def test_lost_worker_host_the_job_finishes_on_the_others(
    cluster: RayCluster, images: Path, ckpt: Path, reference: Path, tmp_path: Path
) -> None:
    """Two actors on three hosts; the raylet and workers of a host holding an actor are SIGKILLed after the
    first shards: its actor restarts on the spare host, its shards are redone, each shard is recorded once and the
    store is the single-process one."""
    spare = cluster.add_node("w8")
    log = tmp_path / "shards.jsonl"
    command = _driver(cluster, images, tmp_path / "s", ckpt, log, *TWO_ACTORS)
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_records(log, 2, driver)
        victim = next(w for w in cluster.workers if w.address == _records(log)[0]["node"])  # it holds an actor
        cluster.kill_node(victim)
        out, err = driver.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-3000:]
    records = _records(log)
    assert sorted(r["shard"] for r in records) == list(range(10))  # each shard recorded once
    assert {r["node"] for r in records} - {victim.address}  # the other hosts took the rest
    assert spare.address in {w.address for w in cluster.workers}
    assert _files(tmp_path / "s") == _files(reference)


def test_lost_driver_resumes_from_finished_shards(
    cluster: RayCluster, images: Path, ckpt: Path, reference: Path, tmp_path: Path
) -> None:
    log, store = tmp_path / "shards.jsonl", tmp_path / "s"
    driver = subprocess.Popen(_driver(cluster, images, store, ckpt, log, *TWO_ACTORS), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_records(log, 4, driver)  # a shard is logged as it arrives, then written
        driver.kill()
        driver.communicate(timeout=60)
    finally:
        driver.kill()
    finished = len(list(store.glob("shard-*.parquet")))
    assert 3 <= finished < 10
    done = _run(_driver(cluster, images, store, ckpt, log, *TWO_ACTORS))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"new items embedded after {finished} existing shards" in done.stdout
    assert _files(store) == _files(reference)


def test_driver_memory_stays_flat_as_shards_grow(
    cluster: RayCluster, ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Peak RSS of the driver for 10 and 100 shards of one item each: the results stream, they do not pile up."""
    source = tmp_path_factory.mktemp("many")
    generate(source, n_train=0, n_test=100, seed=2, image_size=32, workers=1)
    peaks = {}
    for shards in (10, 100):
        folder = source / f"first{shards}"
        folder.mkdir()
        for image in sorted((source / "images").iterdir())[:shards]:
            os.link(image, folder / image.name)
        out = tmp_path_factory.mktemp(f"store{shards}")
        command = _driver(cluster, folder, out / "s", ckpt, out / "log.jsonl", *TWO_ACTORS)
        command[command.index("--shard-size") + 1] = "1"
        done = _run(command)
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[shards] = int(done.stderr.split("peak_rss_kib")[-1].split()[0])
    assert peaks[100] <= peaks[10] + 64 * 1024, peaks  # KiB: under 64 MiB more for ten times the shards


def test_host_that_cannot_read_the_source_is_named(images: Path, ckpt: Path, tmp_path: Path) -> None:
    with ray_cluster(workers=1, mask={0: images}) as blind:
        done = _run(_driver(blind, images, tmp_path / "s", ckpt, tmp_path / "log.jsonl"))
        worker = blind.workers[0].address
    assert done.returncode == 2, done.stderr[-3000:]  # mpsclip's exit status for an MPSCLIPError
    message = [line for line in done.stderr.splitlines() if line.startswith("mpsclip embed: error:")]
    assert len(message) == 1, done.stderr[-3000:]  # the driver's own words (Ray forwards the actor's log above)
    assert f"Ray node {worker} cannot read the source folder {images} (no " in message[0]
    assert "remove the node from the cluster" in message[0]
