from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_adapters
from kills import killed_after_shards

from mpsclip.archive.job import EmbedSettings, embed_archive
from mpsclip.archive.sources import iter_items
from mpsclip.archive.store_reader import load_store
from mpsclip.cli import main
from mpsclip.commands.embed import summary_line
from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP

SMALL = EmbedSettings(batch_size=2, shard_size=2, workers=0, device="cpu")


@pytest.fixture(scope="module")
def store(synth: Path, ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "full"
    embed_archive(synth / "images", out, ckpt, settings=SMALL, progress=False)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def test_sources_folder_and_list(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("z.PNG", "a.jpg", "b/c.tif", "notes.txt", ".hidden/x.png"):
        (tmp_path / name).write_bytes(b"")
    assert [i.id for i in iter_items(tmp_path)] == ["a.jpg", "b/c.tif", "z.PNG"]
    listing = tmp_path / "list.txt"
    listing.write_text("# images\nz.PNG\n\nb/c.tif\n")
    items = list(iter_items(listing))
    assert [i.id for i in items] == ["b/c.tif", "z.PNG"] and items[0].path == tmp_path / "b/c.tif"
    listing.write_text("x.gif\n")
    with pytest.raises(MPSCLIPError, match="line 1"):
        list(iter_items(listing))
    with pytest.raises(MPSCLIPError, match="no such"):
        iter_items(tmp_path / "missing")


def test_embed_store_layout(store: Path) -> None:
    names = sorted(p.name for p in store.iterdir())
    assert names == [
        "failures.jsonl",
        "manifest.json",
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["precision"] == "fp16" and manifest["family"] == "mpsclip"
    assert manifest["counts"] == {"items": 6, "embedded": 6, "failed": 0, "shards": 3}
    data = load_store(store)
    retrieval, perspectives = data.columns["retrieval"], data.columns["perspectives"]
    assert retrieval.dtype == np.float16 and retrieval.shape == (6, manifest["dim"])
    assert perspectives.shape == (6, manifest["views"], manifest["dim"]) and not data.columns["valid"].any()
    assert data.ids == sorted(data.ids)


@pytest.mark.slow
def test_resume_is_byte_identical(synth: Path, ckpt: Path, store: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    with killed_after_shards(1):
        embed_archive(synth / "images", out, ckpt, settings=SMALL, progress=False)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.parquet"]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    second = embed_archive(synth / "images", out, ckpt, settings=SMALL, progress=False)
    assert second.complete and second.n_resumed_shards == 1 and second.n_embedded == 6 and second.n_new == 4
    assert "items/s over the 4 embedded in this run" in summary_line(second)  # not over the 6 the store holds
    assert _files(out) == _files(store)


def test_corrupt_image_is_listed(synth: Path, ckpt: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(synth / "images", images)
    victim = sorted(images.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:100])
    summary = embed_archive(images, tmp_path / "s", ckpt, settings=SMALL, progress=False)
    assert summary.n_failed == 1 and summary.n_embedded == 5
    failures = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == [victim.name] and failures[0]["error"]
    assert victim.name not in load_store(tmp_path / "s").ids


def test_other_model_is_refused(synth: Path, store: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    other = randomize_adapters(MPSCLIP("MPS-Tiny"), seed=1).save(tmp_path / "other")
    with pytest.raises(MPSCLIPError, match="checkpoint_sha256"):
        embed_archive(synth / "images", store, other, settings=SMALL, progress=False)
    with pytest.raises(MPSCLIPError, match="shard_size"):
        embed_archive(
            synth / "images",
            store,
            load_store(store).manifest["checkpoint"],
            settings=EmbedSettings(shard_size=3, device="cpu"),
            progress=False,
        )


def test_embed_cli(synth: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["embed", str(synth / "images"), "--out", str(tmp_path / "s"), "--checkpoint", str(ckpt)]
    assert main([*args, "--shard-size", "4", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "6 of 6 items embedded in 2 shards" in out and "items/s over the 6 embedded in this run" in out
    assert main([*args, "--shard-size", "4", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do: 6 items already embedded in 2 shards" in out and "items/s" not in out
    assert main([*args, "--sub-root", str(synth)]) == 2
    assert "--sub-root is only used" in capsys.readouterr().err


def test_shards_with_fp16_list_columns_read_the_same(store: Path, tmp_path: Path) -> None:
    """Stores written before fp16 rows became fixed-size binary values (fixed-size lists) still read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mpsclip.archive.store_reader import open_store, read_shard

    copy = tmp_path / "old"
    shutil.copytree(store, copy)
    info = open_store(copy)
    new = read_shard(info, 0, ["retrieval", "global", "perspectives", "valid"]).columns
    table = pq.read_table(copy / "shard-00000.parquet")
    for name in ("retrieval", "global", "perspectives"):
        assert pa.types.is_fixed_size_binary(table.schema.field(name).type)
        values = new[name].reshape(len(new[name]), -1)
        lists = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
        table = table.set_column(table.schema.get_field_index(name), name, lists)
    pq.write_table(table, copy / "shard-00000.parquet")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["shards"]  # such stores were made before the manifest recorded shard digests
    (copy / "manifest.json").write_text(json.dumps(manifest))
    old = read_shard(open_store(copy), 0, ["retrieval", "global", "perspectives", "valid"]).columns
    for name, values in new.items():
        np.testing.assert_array_equal(old[name], values)
