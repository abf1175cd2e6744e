from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import torch
from extras import require
from kills import killed_after_shards

from mpsclip.archive import job as job_mod
from mpsclip.archive import ray_executor
from mpsclip.archive.embedder import Embedder
from mpsclip.archive.job import EmbedSettings, embed_archive
from mpsclip.archive.ray_executor import embed_archive_ray
from mpsclip.cli import main
from mpsclip.data.synth import generate
from mpsclip.errors import MPSCLIPError
from tests.conftest import TINY
from tests.test_hostile_checkpoints import ClipParameters

ray = require("ray")
require("ray.data")

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]  # Ray's own

SMALL = EmbedSettings(batch_size=2, shard_size=2, workers=0, device="cpu")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance for the module: 2 CPUs, no dashboard, no usage stats, loopback only."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic images, one of them truncated (so that failures travel through Ray too)."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, n_train=0, n_test=6, seed=0, image_size=64, workers=1)
    victim = sorted((out / "images").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:100])
    return out / "images"


def _single_process(images: Path, store: Path, ckpt: Path) -> None:
    """``embed_archive`` on one CPU thread, as each Ray actor (1 CPU) runs: the same float sums, the same bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embed_archive(images, store, ckpt, settings=SMALL, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(images: Path, ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "reference"
    _single_process(images, out, ckpt)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def test_killed_ray_run_resumes(
    local_ray: None,
    images: Path,
    ckpt: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Single process writes shard 0; Ray resumes, writes shard 1 and is killed; single process finishes."""
    store = tmp_path / "s"
    with killed_after_shards(1):
        _single_process(images, store, ckpt)
    record = job_mod.record_shard

    def record_then_die(job: object, shard: int, *args: object) -> None:
        record(job, shard, *args)
        if shard == 1:
            raise KeyboardInterrupt

    def no_model_on_the_driver(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Ray driver loaded a model")

    with monkeypatch.context() as patch:
        patch.setattr(job_mod, "record_shard", record_then_die)
        patch.setattr(Embedder, "load", no_model_on_the_driver)  # the actors' processes keep the real one
        with pytest.raises(KeyboardInterrupt):
            embed_archive_ray(images, store, ckpt, settings=SMALL, num_actors=1, progress=False)
    assert sorted(p.name for p in store.glob("shard-*")) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not json.loads((store / "manifest.json").read_text())["complete"]
    _single_process(images, store, ckpt)
    assert _files(store) == _files(reference)


def test_embed_cli_ray_is_byte_identical(
    local_ray: None, images: Path, ckpt: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two actors, shards recorded in order: the same files as the single-process run, failures included."""
    args = ["embed", str(images), "--checkpoint", str(ckpt), "--shard-size", "2", "--batch-size", "2", "--quiet"]
    args += ["--workers", "0", "--device", "cpu", "--ray", "--ray-actors", "2"]
    assert main([*args, "--out", str(tmp_path / "s")]) == 0
    assert "5 of 6 items embedded in 3 shards" in capsys.readouterr().out
    assert _files(tmp_path / "s") == _files(reference)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"] == {"items": 6, "embedded": 5, "failed": 1, "shards": 3}


def test_trust_checkpoint_reaches_the_ray_actors(
    local_ray: None, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TorchScript backbone is loaded in the actors' processes only when the command was given --trust-checkpoint."""
    torch.manual_seed(5)
    path = tmp_path / "ViT-tiny.pt"
    clip = open_clip.create_model(TINY).eval()
    torch.jit.trace(ClipParameters(clip), torch.randn(1, 3, 224, 224), check_trace=False).save(str(path))
    args = ["embed", str(images), "--checkpoint", str(path), "--arch", TINY, "--shard-size", "3", "--batch-size", "3",
            "--quiet", "--workers", "0", "--device", "cpu", "--ray", "--ray-actors", "1"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "TorchScript" in capsys.readouterr().err
    assert main([*args, "--trust-checkpoint", "--out", str(tmp_path / "s")]) == 0
    assert "5 of 6 items embedded" in capsys.readouterr().out


def test_embed_cli_ray_errors(images: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["embed", str(images), "--checkpoint", str(ckpt), "--out", str(tmp_path / "s"), "--quiet"]
    assert main([*args, "--ray-actors", "2"]) == 2
    assert "only used with --ray" in capsys.readouterr().err
    assert main([*args, "--ray", "--ray-actors", "0"]) == 2
    assert "--ray-actors must be 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_missing_ray_is_explained(images: Path, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MPSCLIPError, match=r"pip install 'mpsclip\[ray\]'"):
        embed_archive_ray(images, tmp_path / "s", ckpt, settings=SMALL, progress=False)
    assert not (tmp_path / "s").exists()


def test_done_store_does_not_start_ray(
    images: Path, ckpt: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "s"
    store.mkdir()
    for name, data in _files(reference).items():
        (store / name).write_bytes(data)

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started for a finished store")

    monkeypatch.setattr(ray_executor, "_connect", no_ray)
    monkeypatch.setattr(Embedder, "load", no_ray)
    summary = embed_archive_ray(images, store, ckpt, settings=SMALL, progress=False)
    assert summary.complete and summary.n_resumed_shards == 3 and _files(store) == _files(reference)


def test_unreachable_ray_address_fails_fast(images: Path, ckpt: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port where nothing listens
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.perf_counter()
    with pytest.raises(MPSCLIPError, match=f"--ray-address {address}: nothing answers there"):
        ray_executor._connect(ray, address)
    assert time.perf_counter() - started < 15
