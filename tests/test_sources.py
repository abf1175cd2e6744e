from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mpsclip.archive.items import READ_ERRORS, Item, item_from_meta
from mpsclip.archive.job import EmbedSettings, embed_archive
from mpsclip.archive.readers import open_item
from mpsclip.archive.sources import iter_items
from mpsclip.archive.store_reader import load_store
from mpsclip.archive.webdataset import expand_braces, split_key
from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP


def png(colour: tuple[int, int, int], size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_expand_braces() -> None:
    assert expand_braces("shards-{0000..0002}.tar") == ["shards-0000.tar", "shards-0001.tar", "shards-0002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad, message in (("s-{3..1}.tar", "counts down"), ("s-{x}.tar", "neither"), ("s-{0..1.tar", "unbalanced")):
        with pytest.raises(MPSCLIPError, match=message):
            expand_braces(bad)
    assert split_key("./a/0001.seg.PNG") == ("a/0001", "seg.png") and split_key("a/.hidden.png") is None


def test_tar_samples(tmp_path: Path) -> None:
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("./b/0001.png", png((10, 20, 30))),
            ("./b/0001.jpg", jpeg(0)),  # same sample: the jpg is its image
            ("./b/0001.json", b'{"caption": "x"}'),
            ("0002.seg.png", png((0, 0, 0))),  # extension seg.png: not the image of sample 0002
            ("0002.png", png((40, 50, 60))),
            ("0003.txt", b"no image"),
            ("._0004.png", b"macOS metadata"),
        ],
    )
    items = list(iter_items(shard))
    assert [i.id for i in items] == ["s.tar/0002.png", "s.tar/b/0001.jpg"]
    meta = items[0].meta
    assert meta["tar"] == "s.tar" and meta["kind"] == "tar-member" and items[0].kind == "tar-member"
    assert meta["member"] == "0002.png" and items[0].path == shard
    assert shard.read_bytes()[meta["offset"] : meta["offset"] + meta["size"]] == png((40, 50, 60))
    # the meta and the source root are enough to read the pixels again (search re-opens hits this way)
    again = open_item(item_from_meta(items[0].id, meta, tmp_path))
    assert again.size == (24, 24) and again.getpixel((0, 0)) == (40, 50, 60)
    assert open_item(items[1]).size == (32, 32)


def test_folder_and_pattern_of_shards(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    write_tar(tmp_path / "sub" / "x.tar", [("k.jpg", jpeg(1))])
    write_tar(tmp_path / "shards-0000.tar", [("k.png", png((1, 2, 3)))])
    write_tar(tmp_path / "shards-0001.tar", [("k.png", png((4, 5, 6)))])
    ids = [i.id for i in iter_items(tmp_path)]
    assert ids == ["a.png", "shards-0000.tar/k.png", "shards-0001.tar/k.png", "sub/x.tar/k.jpg"]
    pattern = f"{tmp_path}/shards-{{0000..0001}}.tar"
    items = list(iter_items(pattern))
    assert [i.id for i in items] == ["shards-0000.tar/k.png", "shards-0001.tar/k.png"]
    assert open_item(items[1]).getpixel((0, 0)) == (4, 5, 6)
    both = [i.id for i in iter_items(f"{tmp_path}/{{sub/x,shards-0001}}.tar")]
    assert both == ["shards-0001.tar/k.png", "sub/x.tar/k.jpg"]
    with pytest.raises(MPSCLIPError, match="shards-0002.tar does not exist"):
        iter_items(f"{tmp_path}/shards-{{0000..0002}}.tar")


def test_bad_shards(tmp_path: Path) -> None:
    good = write_tar(tmp_path / "good.tar", [("a.png", png((1, 1, 1))), ("b.png", png((2, 2, 2)))])
    (tmp_path / "packed.tar").write_bytes(gzip.compress(good.read_bytes()))
    with pytest.raises(MPSCLIPError, match="packed.tar: cannot list the tar shard"):
        iter_items(tmp_path / "packed.tar")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(MPSCLIPError, match="empty.tar"):
        iter_items(tmp_path / "empty.tar")
    # cut inside b.png's bytes: a.png is read, b.png is listed but fails when read
    data = good.read_bytes()
    b_offset = data.index(png((2, 2, 2)))
    (tmp_path / "cut.tar").write_bytes(data[: b_offset + 10])
    with pytest.warns(UserWarning, match="cut.tar: truncated or corrupt"):
        a, b = iter_items(tmp_path / "cut.tar")
    assert open_item(a).getpixel((0, 0)) == (1, 1, 1)
    with pytest.raises(OSError, match="cut short"):
        open_item(b)
    corrupt = write_tar(tmp_path / "corrupt.tar", [("c.jpg", jpeg(2)[:60])])
    (item,) = iter_items(corrupt)
    with pytest.raises(READ_ERRORS):
        open_item(item)


def test_embed_tar_with_corrupt_member(tiny_model: MPSCLIP, tmp_path: Path) -> None:
    members = [(f"{n:04d}.jpg", jpeg(n)) for n in range(5)]
    members.insert(2, ("0002x.jpg", jpeg(9)[:80]))  # truncated JPEG
    shard = write_tar(tmp_path / "shard.tar", members)
    settings = EmbedSettings(batch_size=2, shard_size=4, workers=0, device="cpu")
    ckpt = tiny_model.save(tmp_path / "m")
    summary = embed_archive(shard, tmp_path / "store", ckpt, settings=settings, progress=False)
    assert summary.complete and summary.n_items == 6 and summary.n_embedded == 5 and summary.n_failed == 1
    failures = [json.loads(line) for line in (tmp_path / "store" / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["path"]) for f in failures] == [("shard.tar/0002x.jpg", str(shard))]
    data = load_store(tmp_path / "store")
    assert data.ids == [f"shard.tar/{n:04d}.jpg" for n in range(5)]
    assert data.manifest["source_root"] == str(tmp_path)
    assert all(
        open_item(item_from_meta(i, m, data.manifest)).size == (32, 32)
        for i, m in zip(data.ids, data.metas, strict=True)
    )


def test_readers_open_each_kind_from_meta_paths_relative_to_the_source_root(tmp_path: Path) -> None:
    """A folder with an image file and a shard in a subfolder: every item records its kind and a meta path
    relative to the root; the readers open each kind; the meta resolves below a moved root too."""
    root = tmp_path / "archive"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(png((1, 2, 3)))
    write_tar(root / "sub" / "s.tar", [("0001.png", png((4, 5, 6)))])
    items = list(iter_items(root))
    assert [(i.id, i.kind) for i in items] == [("a.png", "file"), ("sub/s.tar/0001.png", "tar-member")]
    assert items[0].meta == {"kind": "file", "path": "a.png"} and items[1].meta["tar"] == "sub/s.tar"
    assert [open_item(i).getpixel((0, 0)) for i in items] == [(1, 2, 3), (4, 5, 6)]
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    again = [item_from_meta(i.id, i.meta, {"source_root": str(moved)}) for i in items]
    assert [i.kind for i in again] == ["file", "tar-member"]
    assert [open_item(i).getpixel((0, 0)) for i in again] == [(1, 2, 3), (4, 5, 6)]
    with pytest.raises(MPSCLIPError, match="no item kind"):
        item_from_meta("x", {"footprint": [0, 0, 1, 1]}, moved)
    with pytest.raises(MPSCLIPError, match="kind 'zip'"):
        Item("x", moved, {}, "zip")  # type: ignore[arg-type]


def test_moved_store_still_finds_its_images(tiny_model: MPSCLIP, tmp_path: Path) -> None:
    """The manifest records ``source_root``; a store moved to another folder resolves every row through it."""
    (tmp_path / "src").mkdir()
    for n in range(3):
        (tmp_path / "src" / f"{n}.jpg").write_bytes(jpeg(n))
    settings = EmbedSettings(batch_size=2, shard_size=2, workers=0, device="cpu")
    summary = embed_archive(
        tmp_path / "src", tmp_path / "store", tiny_model.save(tmp_path / "m"), settings=settings, progress=False
    )
    assert summary.complete
    (tmp_path / "store").rename(tmp_path / "moved")
    data = load_store(tmp_path / "moved")
    assert data.manifest["source_root"] == str(tmp_path / "src")
    assert [m["path"] for m in data.metas] == ["0.jpg", "1.jpg", "2.jpg"]
    opened = [open_item(item_from_meta(i, m, data.manifest)) for i, m in zip(data.ids, data.metas, strict=True)]
    assert [im.size for im in opened] == [(32, 32)] * 3
