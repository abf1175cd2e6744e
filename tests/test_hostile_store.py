"""Stores nobody trusts: item paths outside the source, flipped and truncated shards, embeddings off the unit
sphere, and the temporary files a killed run leaves. Each is refused with an error naming the file or the item."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from mpsclip.serve.app import create_app
from mpsclip.serve.catalog import Catalog
from PIL import Image

from mpsclip.archive.items import item_from_meta
from mpsclip.archive.job import EmbedSettings, embed_archive
from mpsclip.archive.search import exact_topk, search_store
from mpsclip.archive.store import ShardRows, read_manifest, shard_path, write_manifest, write_shard
from mpsclip.archive.store_reader import open_store, verify_store
from mpsclip.cli import main
from mpsclip.errors import MPSCLIPError

DIM, VIEWS = 8, 2


@pytest.fixture()
def store(synth_store: Path, tmp_path: Path) -> Path:
    """A copy of the shared six-item store (three rows a shard, two shards)."""
    return Path(shutil.copytree(synth_store, tmp_path / "s"))


def _flip(path: Path, column: str = "retrieval", n: int = 16) -> None:
    """Invert ``n`` bytes in the middle of ``column``'s data in the first row group."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    at = start + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _forget_digests(store: Path) -> None:
    """Make the manifest one of a store written before shard digests were recorded."""
    manifest = json.loads((store / "manifest.json").read_text())
    del manifest["shards"]
    (store / "manifest.json").write_text(json.dumps(manifest))


def _query(dim: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(1, dim, generator=torch.Generator().manual_seed(0)), dim=1)


def test_flipped_bytes_are_named_by_search_serve_and_verify(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = shard_path(store, 1)
    _flip(shard)
    with pytest.raises(MPSCLIPError, match=r"shard-00001\.parquet: its SHA-256 differs .* 'mpsclip verify "):
        open_store(store)
    assert main(["search", str(store), "a harbor", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "shard-00001.parquet: its SHA-256 differs" in err and "Traceback" not in err
    with pytest.raises(MPSCLIPError, match=r"shard-00001\.parquet: its SHA-256 differs"):
        Catalog([store])  # what 'mpsclip serve' loads at start

    _forget_digests(store)  # a store made before digests: the Parquet page checksums catch the same bytes
    info = open_store(store)
    with pytest.raises(MPSCLIPError, match=r"shard-00001\.parquet: cannot be read as a shard \(OSError: .*CRC"):
        exact_topk(info, _query(info.dim), 3, "fused")
    with pytest.raises(MPSCLIPError, match=r"shard-00001\.parquet: cannot be read as a shard"):
        Catalog([store])
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "problem: " in out and "shard-00001.parquet: cannot be read as a shard" in out and "1 problem" in out


def test_a_truncated_shard_is_named_by_search_serve_reload_and_verify(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = Catalog([store])
    assert catalog.reload() == {"s": "unchanged"}
    _truncate(shard_path(store, 0))
    with pytest.raises(MPSCLIPError, match=r"shard-00000\.parquet: its SHA-256 differs"):
        open_store(store)
    status = catalog.reload()["s"]  # the server keeps the last good version and says why (GET /stores)
    assert status.startswith("failed: MPSCLIPError") and "shard-00000.parquet: its SHA-256 differs" in status
    assert main(["verify", str(store)]) == 1
    assert "shard-00000.parquet" in capsys.readouterr().out

    _forget_digests(store)
    with pytest.raises(MPSCLIPError, match=r"shard-00000\.parquet: cannot be read as a shard .*magic bytes"):
        open_store(store)
    assert main(["search", str(store), "a harbor", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "shard-00000.parquet: cannot be read as a shard" in err and "Traceback" not in err
    status = catalog.reload()["s"]
    assert status.startswith("failed: MPSCLIPError") and "shard-00000.parquet: cannot be read" in status


def test_verify_passes_a_sound_store(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(store)]) == 0
    assert capsys.readouterr().out.strip().endswith("2 shards, 6 rows checked: sound")


def _unit_rows(ids: list[str], metas: list[dict], seed: int = 0) -> ShardRows:
    rng = np.random.default_rng(seed)

    def unit(*shape: int) -> np.ndarray:
        x = rng.standard_normal((*shape, DIM))
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)

    n = len(ids)
    return ShardRows(ids, [json.dumps(m) for m in metas], unit(n), unit(n), unit(n, VIEWS), np.ones((n, VIEWS), bool))


def _crafted(folder: Path, rows: ShardRows, source_root: Path) -> Path:
    write_shard(shard_path(folder, 0), rows, DIM, VIEWS)
    n = len(rows.ids)
    write_manifest(folder, {"complete": True, "counts": {"items": n, "embedded": n, "failed": 0, "shards": 1},
                            "dim": DIM, "views": VIEWS, "unit_norm": True, "source_root": str(source_root),
                            "checkpoint_sha256": "crafted"})
    return folder


def test_an_embedding_off_the_unit_sphere_is_an_error_naming_shard_and_row(tmp_path: Path) -> None:
    rows = _unit_rows([f"i{n}" for n in range(4)], [{}] * 4)
    rows.retrieval[2] *= 50
    info = open_store(_crafted(tmp_path / "s", rows, tmp_path))
    with pytest.raises(MPSCLIPError, match=r"shard-00000\.parquet: row 2 has a 'retrieval' embedding of norm 50"):
        search_store(info, _query(DIM), 2, "fused")
    assert [h.id for h in search_store(info, _query(DIM), 4, "global")[0]]  # the other columns are sound
    with pytest.raises(MPSCLIPError, match=r"shard-00000\.parquet: row 2"):
        Catalog([tmp_path / "s"])
    report = verify_store(tmp_path / "s")
    assert len(report.problems) == 1 and "row 2 has a 'retrieval' embedding" in report.problems[0]


def test_a_shard_of_another_layout_is_an_error_naming_it(tmp_path: Path) -> None:
    store = _crafted(tmp_path / "s", _unit_rows(["a", "b"], [{}, {}]), tmp_path)
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "dim": 2 * DIM}))  # the shard holds 8-d rows
    with pytest.raises(MPSCLIPError, match=r"shard-00000\.parquet: its columns are not those of a shard with .* 16"):
        search_store(open_store(store), _query(2 * DIM), 1, "fused")


def _png(path: Path) -> None:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_item_paths_outside_the_source_are_refused_naming_the_item(tmp_path: Path) -> None:
    source, secret = tmp_path / "source", tmp_path / "secret.png"
    source.mkdir()
    _png(source / "ok.png")
    _png(secret)
    (source / "link.png").symlink_to(secret)
    metas = {
        "ok": {"kind": "file", "path": "ok.png"},
        "absolute": {"kind": "file", "path": str(secret)},
        "climbing": {"kind": "file", "path": "../secret.png"},
        "linked": {"kind": "file", "path": "link.png"},
        "tar": {"kind": "tar-member", "tar": "/etc/passwd", "member": "x.png", "offset": 0, "size": 9},
    }
    store = _crafted(tmp_path / "s", _unit_rows(list(metas), list(metas.values())), source)
    with pytest.raises(MPSCLIPError, match=r"shard-00000\.parquet: item absolute: its path .* is absolute"):
        open_store(store)  # what search and serve open first
    manifest = read_manifest(store)
    assert item_from_meta("ok", metas["ok"], manifest).path == source / "ok.png"
    for item_id, why in (("absolute", "is absolute"), ("climbing", "'..'"), ("linked", "symbolic link"),
                         ("tar", "is absolute")):
        with pytest.raises(MPSCLIPError, match=rf"^item {item_id}: .*{why}"):
            item_from_meta(item_id, metas[item_id], manifest)

    problems = verify_store(store).problems
    assert len(problems) == 4 and all("shard-00000.parquet: item " in p for p in problems)

    linked = _crafted(tmp_path / "linked", _unit_rows(["ok", "linked"], [metas["ok"], metas["linked"]]), source)
    with TestClient(create_app(Catalog([linked]))) as client:  # a link is seen when it is followed
        assert client.get("/items/linked/ok/thumbnail").status_code == 200
        answer = client.get("/items/linked/linked/thumbnail")
        assert answer.status_code == 404 and "item linked: its path link.png leads outside" in answer.text


def test_embed_refuses_a_source_with_a_link_or_a_path_outside_it(ckpt: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _png(source / "ok.png")
    _png(tmp_path / "secret.png")
    (source / "link.png").symlink_to(tmp_path / "secret.png")
    settings = EmbedSettings(workers=0, device="cpu")
    with pytest.raises(MPSCLIPError, match=r"^item link\.png: .*symbolic link"):
        embed_archive(source, tmp_path / "a", ckpt, settings=settings, progress=False)
    listing = tmp_path / "lists" / "images.txt"
    listing.parent.mkdir()
    listing.write_text(f"{tmp_path / 'secret.png'}\n")
    with pytest.raises(MPSCLIPError, match=r"is absolute"):
        embed_archive(listing, tmp_path / "b", ckpt, settings=settings, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_job_removes_the_temporary_files_a_killed_run_left(store: Path, synth: Path, ckpt: Path) -> None:
    stale = [store / ".shard-00002.parquet.k1ll3d.tmp", store / ".manifest.json.k1ll3d.tmp"]
    other = store / ".index.faiss.busy.tmp"  # another command's file: not the job's to remove
    for path in [*stale, other]:
        path.write_bytes(b"half")
    assert "temporary files" in " ".join(verify_store(store).notes)
    settings = EmbedSettings(perspectives="from-dir", sub_root=synth / "subimages", batch_size=3, shard_size=3,
                             device="cpu")  # the settings of the shared store: nothing is left to embed
    summary = embed_archive(synth / "images", store, ckpt, settings=settings, progress=False)
    assert summary.complete and summary.n_new == 0
    assert not any(path.exists() for path in stale) and other.exists()
