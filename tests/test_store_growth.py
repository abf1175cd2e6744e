"""Stores that grow with their source: shards made from item ids, append-only, exact resumes, --prune and
--retry-failed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kills import killed_after_shards
from mpsclip.serve.catalog import _without, load_store_memory

from mpsclip.archive.embedder import Embedder
from mpsclip.archive.job import EmbedSettings, EmbedSummary, LocalExecutor, open_job, run_job
from mpsclip.archive.search import search_store, to_hits
from mpsclip.archive.sources import iter_items
from mpsclip.archive.store import read_failures, read_pruned
from mpsclip.archive.store_reader import load_store, open_store, pruned_rows
from mpsclip.cli import main

SMALL = EmbedSettings(batch_size=2, shard_size=2, workers=0, device="cpu")
Embed = Callable[..., EmbedSummary]


def _shards(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.glob("shard-*.parquet"))}


def _files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if not p.name.startswith(".")}


def _source(synth: Path, folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(synth / "images" / name, folder / name)
    return folder


def _listed(source: Path) -> set[str]:
    return {item.id for item in iter_items(source)}


def _live_ids(store: Path) -> list[str]:
    """The store's ids less the pruned ones, in store order."""
    gone = {p["id"] for p in read_pruned(store)}
    return [i for i in load_store(store).ids if i not in gone]


@pytest.fixture(scope="module")
def names(synth: Path) -> list[str]:
    return sorted(p.name for p in (synth / "images").iterdir())


@pytest.fixture(scope="module")
def embed(ckpt: Path) -> Embed:
    """``embed_archive`` with SMALL settings and one model for the whole module (each call loads none)."""
    embedder = Embedder.load(ckpt, None, SMALL)

    def run(source: Path, store: Path, **grow: bool) -> EmbedSummary:
        executor = LocalExecutor(ckpt, None, SMALL, embedder)
        job = open_job(source, store, ckpt, None, SMALL, executor.decode(), **grow)
        return run_job(job, executor, progress=False)

    return run


def test_a_grown_source_gets_only_its_new_items_embedded(
    synth: Path, embed: Embed, names: list[str], tmp_path: Path
) -> None:
    source = _source(synth, tmp_path / "src", names[1:5])  # four items: shards 0 and 1
    store = tmp_path / "store"
    first = embed(source, store)
    assert first.complete and first.n_shards == 2 and first.n_new == 4
    old = _shards(store)
    manifest = json.loads((store / "manifest.json").read_text())
    assert "n_source_items" not in manifest and len(manifest["shards"]) == 2

    _source(synth, source, [names[0], names[5]])  # one id sorts before every stored one, one after
    grown = embed(source, store)
    assert grown.complete and grown.n_new == 2 and grown.n_resumed_shards == 2 and grown.n_shards == 3
    now = _shards(store)
    assert {name: now[name] for name in old} == old  # the existing shards keep their bytes
    data = load_store(store)
    assert sorted(data.ids) == sorted(names) and len(set(data.ids)) == 6
    assert data.ids[4:] == [names[0], names[5]]  # the new items, in a new shard
    assert json.loads((store / "manifest.json").read_text())["counts"] == {
        "items": 6, "embedded": 6, "failed": 0, "shards": 3,
    }

    same = embed(source, store)  # nothing new: nothing written
    assert same.complete and same.n_new == 0 and _shards(store) == now


def test_a_store_made_before_ids_grows_too(synth: Path, embed: Embed, names: list[str], tmp_path: Path) -> None:
    """A manifest with ``n_source_items`` and no shard records (an older 'mpsclip embed') reads and grows."""
    source = _source(synth, tmp_path / "src", names[:4])
    store = tmp_path / "store"
    embed(source, store)
    manifest = json.loads((store / "manifest.json").read_text())
    del manifest["shards"], manifest["unit_norm"]
    (store / "manifest.json").write_text(json.dumps({**manifest, "n_source_items": 4}))
    assert open_store(store).n_rows == 4
    _source(synth, source, names[4:])
    grown = embed(source, store)
    assert grown.complete and grown.n_new == 2 and sorted(load_store(store).ids) == names
    assert len(json.loads((store / "manifest.json").read_text())["shards"]) == 3  # recorded from now on


def test_rename_between_kill_and_resume_gives_no_duplicate_and_no_gap(
    synth: Path, embed: Embed, names: list[str], tmp_path: Path
) -> None:
    source = _source(synth, tmp_path / "src", names)
    store = tmp_path / "store"
    with killed_after_shards(1):
        embed(source, store)
    embedded, waiting = names[0], names[3]
    (source / embedded).rename(source / f"zz_{embedded}")  # an embedded file renamed
    (source / waiting).rename(source / f"a_{waiting}")  # a file still to embed renamed: it now sorts first
    resumed = embed(source, store)
    assert resumed.complete
    ids = load_store(store).ids
    assert len(ids) == len(set(ids))  # no id twice
    assert _listed(source) <= set(ids)  # no listed item missing
    assert set(ids) - _listed(source) == {embedded}  # the old name stays until pruned

    pruned = embed(source, store, prune=True)
    assert pruned.n_pruned == 1 and pruned.n_new == 0
    assert read_pruned(store) == [{"id": embedded, "shard": 0, "row": 0}]
    assert sorted(_live_ids(store)) == sorted(_listed(source))


def test_killed_run_with_failures_resumes_to_the_same_files(
    synth: Path, embed: Embed, names: list[str], tmp_path: Path
) -> None:
    """A failed item counts as done in its shard, so the shards after it hold the same items on a resume."""
    source = _source(synth, tmp_path / "src", names)
    (source / names[2]).write_bytes(b"not an image")  # fails in shard 1
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    embed(source, whole)
    with killed_after_shards(2):
        embed(source, killed)
    manifest = json.loads((killed / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]  # killed after shard 1 was renamed in, before the manifest recorded it
    (killed / "manifest.json").write_text(json.dumps(manifest))
    stale = killed / ".shard-00002.parquet.k1ll3d.tmp"  # and what a kill while writing a shard leaves
    stale.write_bytes(b"PAR1 half")
    resumed = embed(source, killed)
    assert not stale.exists()
    assert resumed.complete and resumed.n_failed == 1 and resumed.n_embedded == 5
    assert _shards(killed) == _shards(whole) and _files(killed)["manifest.json"] == _files(whole)["manifest.json"]
    failures = [[(f["id"], f["shard"]) for f in read_failures(store)] for store in (killed, whole)]
    assert failures[0] == failures[1] == [(names[2], 1)]


def test_retry_failed_embeds_a_repaired_item(synth: Path, embed: Embed, names: list[str], tmp_path: Path) -> None:
    source = _source(synth, tmp_path / "src", names)
    victim = source / names[2]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated: unreadable
    store = tmp_path / "store"
    assert embed(source, store).n_failed == 1
    shutil.copy(synth / "images" / names[2], victim)  # repaired
    again = embed(source, store)
    assert again.n_new == 0 and again.n_failed == 1  # without --retry-failed a failure stays a failure
    retried = embed(source, store, retry_failed=True)
    assert retried.complete and retried.n_new == 1 and retried.n_failed == 0 and retried.n_shards == 4
    assert (store / "failures.jsonl").read_text() == ""
    assert sorted(load_store(store).ids) == names


def test_embed_cli_prune_and_searches_skip_pruned_items(
    synth: Path, ckpt: Path, embed: Embed, names: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _source(synth, tmp_path / "src", names)
    store = tmp_path / "store"
    embed(source, store)
    before = _shards(store)
    (source / names[3]).unlink()
    args = ["embed", str(source), "--out", str(store), "--checkpoint", str(ckpt), "--shard-size", "2"]
    assert main([*args, "--batch-size", "2", "--workers", "0", "--device", "cpu", "--quiet", "--prune"]) == 0
    out = capsys.readouterr().out
    assert "1 stored items whose source disappeared are pruned" in out
    assert _shards(store) == before  # pruning rewrites no shard
    info = open_store(store)
    assert pruned_rows(info).tolist() == [3]
    query = torch.nn.functional.normalize(torch.randn(1, info.dim, generator=torch.Generator().manual_seed(0)), dim=1)
    for mode in ("fused", "global", "max-response"):
        hits = search_store(info, query, 10, mode)[0]
        assert len(hits) == 5 and names[3] not in {h.id for h in hits}
    hits = to_hits(info, torch.tensor([[0.9, 0.8, 0.7]]), torch.tensor([[3, 0, 5]]))[0]  # as an index answers
    assert [(h.rank, h.id) for h in hits] == [(1, names[0]), (2, names[5])]
    assert main(["search", str(store), "a harbor", "-k", "10", "--format", "json", "--device", "cpu"]) == 0
    assert names[3] not in capsys.readouterr().out
    served = load_store_memory("s", store)  # mpsclip serve skips them too, exactly and through an index's answer
    for mode in ("fused", "global", "max-response"):
        scores, rows = served.topk(query, 10, mode)
        assert 3 not in rows[0].tolist() and (rows[0] >= 0).sum() == 5
    scores, rows = _without((torch.tensor([[0.9, 0.8, 0.7]]), torch.tensor([[3, 0, 5]])), served.pruned)
    assert rows.tolist() == [[0, 5, -1]] and scores[0, 2] == float("-inf")
    shutil.copy(synth / "images" / names[3], source / names[3])  # back again: no longer pruned, not embedded twice
    assert embed(source, store).n_new == 0
    assert read_pruned(store) == [] and _shards(store) == before
