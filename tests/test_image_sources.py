"""One image file as SOURCE, and --tile-size on plain (not georeferenced) images: tiles in the image's own pixels,
no footprint, read back pixel for pixel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mpsclip.archive import readers
from mpsclip.archive.items import Item, TileSettings, image_windows, item_from_meta
from mpsclip.archive.job import EmbedSettings, embed_archive, list_items
from mpsclip.archive.readers import open_item
from mpsclip.archive.sources import iter_items
from mpsclip.archive.store_reader import load_store
from mpsclip.cli import main
from mpsclip.errors import MPSCLIPError

SMALL = EmbedSettings(batch_size=4, shard_size=4, workers=0, device="cpu")
TILES = TileSettings(32, 32)


def noise(path: Path, width: int, height: int, seed: int = 0, **save: object) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **save)
    return pixels


def test_image_windows_cover_the_image() -> None:
    assert image_windows(100, 70, 32, 32) == [
        (col, row, 32, 32) for row in (0, 32, 38) for col in (0, 32, 64, 68)
    ]
    assert image_windows(100, 20, 32, 48) == [(0, 0, 32, 20), (48, 0, 32, 20), (68, 0, 32, 20)]


def test_one_image_file_is_a_source(tmp_path: Path) -> None:
    noise(tmp_path / "a.png", 24, 24)
    noise(tmp_path / "b.webp", 24, 24, lossless=True)
    for name in ("a.png", "b.webp"):
        items = list_items(tmp_path / name, SMALL)  # what 'mpsclip embed FILE' lists: only that file
        assert [(i.id, i.kind, i.meta) for i in items] == [(name, "file", {"kind": "file", "path": name})]
    assert [i.id for i in iter_items(tmp_path)] == ["a.png", "b.webp"]  # WEBP files in folders too


def test_one_image_file_keeps_the_containment_rule(tmp_path: Path) -> None:
    """The root of a single file is its folder: a link to an image elsewhere is refused as in a folder."""
    outside, inside = tmp_path / "outside", tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    noise(outside / "x.png", 16, 16)
    (inside / "link.png").symlink_to(outside / "x.png")
    with pytest.raises(MPSCLIPError, match="link.png: its path link.png leads outside the source folder"):
        list_items(inside / "link.png", SMALL)


def test_plain_image_tiles(tmp_path: Path) -> None:
    pixels = noise(tmp_path / "big.png", 100, 70)
    noise(tmp_path / "small.jpg", 32, 20, seed=1)  # fits in one tile: stays whole
    items = list(iter_items(tmp_path, TILES))
    tiles = [i for i in items if i.kind == "image-window"]
    assert [i.id for i in items if i.kind == "file"] == ["small.jpg"]
    assert [i.id for i in tiles] == [f"big.png/r{r:06d}_c{c:06d}" for r in (0, 32, 38) for c in (0, 32, 64, 68)]
    assert tiles[7].meta == {"kind": "image-window", "path": "big.png", "window": [68, 32, 32, 32]}
    readers._decoded.cache_clear()
    for item in tiles:
        col, row, width, height = item.meta["window"]
        assert np.array_equal(np.asarray(open_item(item)), pixels[row : row + height, col : col + width])
    assert readers._decoded.cache_info().misses == 1  # the 12 tiles decode the image once
    again = item_from_meta(tiles[7].id, tiles[7].meta, tmp_path)  # as a store's row is read again
    assert np.array_equal(np.asarray(open_item(again)), pixels[32:64, 68:100])
    assert len(list(iter_items(tmp_path / "big.png", TileSettings(64, 48)))) == 4  # one file, with a stride


@pytest.mark.parametrize(
    ("window", "error"),
    [([80, 0, 32, 32], "outside the 100x70 image"), ([0, 0, 0, 8], "empty"), ([0, 0, "8", 8], "is not")],
)
def test_a_bad_window_is_a_read_error(tmp_path: Path, window: list, error: str) -> None:
    noise(tmp_path / "big.png", 100, 70)
    item = Item("big.png/x", tmp_path / "big.png", {"kind": "image-window", "path": "big.png", "window": window},
                "image-window")
    with pytest.raises(OSError, match=error):
        open_item(item)


def test_embed_one_large_image_with_tile_size(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    noise(tmp_path / "photo.jpg", 64, 48, quality=95)
    store = tmp_path / "s"
    args = ["embed", str(tmp_path / "photo.jpg"), "--out", str(store), "--checkpoint", str(ckpt), "--tile-size", "32"]
    assert main([*args, "--shard-size", "4", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    assert "4 of 4 items embedded in 1 shards" in capsys.readouterr().out
    data = load_store(store)
    assert data.ids == [f"photo.jpg/r{r:06d}_c{c:06d}" for r in (0, 16) for c in (0, 32)]
    assert [m["window"] for m in data.metas] == [[0, 0, 32, 32], [32, 0, 32, 32], [0, 16, 32, 32], [32, 16, 32, 32]]
    assert all("footprint" not in m for m in data.metas)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["source_root"] == str(tmp_path) and manifest["tiles"]["tile_size"] == 32
    whole = embed_archive(tmp_path / "photo.jpg", tmp_path / "whole", ckpt, settings=SMALL, progress=False)
    assert whole.n_embedded == 1 and load_store(tmp_path / "whole").ids == ["photo.jpg"]  # no --tile-size: one item
