"""Remote rasters read by window over HTTP (Debian's nginx) and S3 (moto's server), both started here on
127.0.0.1; band assets; failures without credentials; rasters and files that must not be opened."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from extras import expect, require

rasterio = require("rasterio")
require("rio_cogeo", "rio-cogeo makes the test COGs (pip install 'mpsclip[dev]')")
expect(shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists(), "nginx is not installed (make test)")

from affine import Affine  # noqa: E402
from mpsclip.bench.servers import Nginx, moto_s3, nginx  # noqa: E402
from rio_cogeo.cogeo import cog_translate  # noqa: E402
from rio_cogeo.profiles import cog_profiles  # noqa: E402

from mpsclip.archive import remote  # noqa: E402
from mpsclip.archive.embedder import Embedder, EmbedSettings  # noqa: E402
from mpsclip.archive.geotiff import scene_tiles, to_uint8  # noqa: E402
from mpsclip.archive.items import READ_ERRORS, Item, TileSettings, item_from_meta  # noqa: E402
from mpsclip.archive.job import LocalExecutor, open_job, run_job  # noqa: E402
from mpsclip.archive.readers import open_item  # noqa: E402
from mpsclip.archive.sources import iter_items  # noqa: E402
from mpsclip.commands import embed as embed_cmd  # noqa: E402
from mpsclip.errors import MPSCLIPError  # noqa: E402
from mpsclip.model import MPSCLIP  # noqa: E402

TILES = TileSettings(tile_size=128, stride=128)
SECRET = "s3cr3tSIGNATURE"
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)


def write_cog(path: Path, data: np.ndarray, transform: Affine = TRANSFORM, nodata: float | None = 0) -> Path:
    """A COG of ``data`` [bands, H, W] in EPSG:32633 (64-px blocks, deflate, overviews) made with rio-cogeo."""
    plain = path.with_suffix(".plain.tif")
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0]}
    profile |= {"dtype": data.dtype.name, "crs": "EPSG:32633", "transform": transform, "nodata": nodata}
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(data)
    cog = {**cog_profiles.get("deflate"), "blockxsize": 64, "blockysize": 64}
    cog_translate(str(plain), str(path), cog, quiet=True, overview_level=2)
    plain.unlink()
    return path


def scene_data(seed: int = 0) -> np.ndarray:
    """16-bit, 3 bands, 256 x 256; the top-left 128-px tile is nodata."""
    data = np.random.default_rng(seed).integers(1, 4000, size=(3, 256, 256), dtype=np.uint16)
    data[:, :128, :128] = 0
    return data


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, Path]]:
    """nginx serving a folder with ``scene.tif`` (RGB COG), its bands ``red/green/blue.tif`` and
    ``truncated.tif`` (its first two thirds)."""
    root = tmp_path_factory.mktemp("www")
    data = scene_data()
    write_cog(root / "scene.tif", data)
    for band, name in enumerate(("red", "green", "blue")):
        write_cog(root / f"{name}.tif", data[band : band + 1])
    whole = (root / "scene.tif").read_bytes()
    (root / "truncated.tif").write_bytes(whole[: len(whole) * 2 // 3])  # header and index intact, data cut
    with nginx(root, tmp_path_factory.mktemp("nginx")) as server:
        yield server, root


def pixels(items: list[Item]) -> list[np.ndarray]:
    return [np.asarray(open_item(item)) for item in items]


def tile_meta(item: Item) -> dict[str, Any]:
    """What a tile's meta says about its pixels (not where they come from)."""
    return {k: v for k, v in item.meta.items() if k not in ("kind", "scene", "hrefs", "grid", "bands")}


def test_http_tiles_and_embeddings_equal_disk(served: tuple[Nginx, Path], tiny_model: MPSCLIP) -> None:
    server, root = served
    local = scene_tiles(root / "scene.tif", "scene.tif", TILES, root)
    url = f"{server.url}/scene.tif?X-Amz-Signature={SECRET}"
    items = remote.remote_items("scene.tif", [url], {"collection": "c"}, TILES, root)
    assert [i.id for i in items] == [i.id for i in local] and len(items) == 3  # the nodata tile is left out
    assert [tile_meta(i) for i in items] == [{**tile_meta(i), "collection": "c"} for i in local]
    assert items[0].meta["hrefs"] == [f"{server.url}/scene.tif"] and items[0].meta["kind"] == "remote-window"
    assert all(np.array_equal(a, b) for a, b in zip(pixels(items), pixels(local), strict=True))
    embedder = Embedder(tiny_model, EmbedSettings(device="cpu", workers=0, batch_size=8), "sha")
    over_http, failed = embedder.embed(items)
    on_disk, _ = embedder.embed(local)
    assert not failed and np.array_equal(over_http.retrieval, on_disk.retrieval)
    assert np.array_equal(over_http.perspectives, on_disk.perspectives)
    log = server.access_log.read_text().splitlines()
    assert all(line.startswith(("GET /scene.tif 206", "HEAD", "GET /scene.tif 200")) for line in log if "scene" in line)
    assert sum(" 206 " in line for line in log) > 0  # read by ranges


def test_band_assets_equal_their_rgb_twin(served: tuple[Nginx, Path], tmp_path: Path) -> None:
    server, root = served
    rgb = remote.remote_items("s", [f"{server.url}/scene.tif"], {}, TILES, root)
    bands = remote.remote_items("s", [f"{server.url}/{n}.tif" for n in ("red", "green", "blue")], {}, TILES, root)
    assert [tile_meta(i) for i in bands] == [tile_meta(i) for i in rgb]
    assert all(np.array_equal(a, b) for a, b in zip(pixels(bands), pixels(rgb), strict=True))
    whole = remote.remote_items("s", [f"{server.url}/{n}.tif" for n in ("red", "green", "blue")], {}, None, root)
    assert len(whole) == 1 and whole[0].kind == "remote" and open_item(whole[0]).size == (256, 256)
    # a smooth 20 m blue band is read onto the 10 m grid of the others (bilinear)
    ramp = np.add.outer(np.arange(128.0), np.arange(128.0))
    coarse = (100 + 15 * ramp).astype(np.uint16)[None]
    write_cog(tmp_path / "blue20.tif", coarse, Affine(20.0, 0.0, 500000.0, 0.0, -20.0, 5000000.0))
    mixed = remote.remote_items(
        "s", [str(root / "red.tif"), str(root / "green.tif"), str(tmp_path / "blue20.tif")], {}, TILES, tmp_path
    )
    assert [i.id for i in mixed] == [i.id for i in rgb] and mixed[0].meta["grid"] == 0
    assert mixed[0].meta["hrefs"][2] == "blue20.tif" and mixed[0].meta["hrefs"][0] == str(root / "red.tif")
    fine = np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2)
    for tile, twin in zip(mixed, rgb, strict=True):
        got = np.asarray(open_item(tile)).astype(np.float64)
        assert np.array_equal(got[..., :2], np.asarray(open_item(twin))[..., :2])
        col, row, width, height = tile.meta["window"]
        stretch = tile.meta["stretch"][2:]
        want = to_uint8(fine[:, row : row + height, col : col + width], stretch)[0].astype(np.float64)
        assert got.shape == (128, 128, 3) and np.abs(got[..., 2] - want).max() <= 3


def test_s3_reads_through_vsis3(served: tuple[Nginx, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = require("boto3", "moto[server] brings boto3 (pip install 'mpsclip[dev]')")
    _, root = served
    with moto_s3(tmp_path / "moto") as s3:
        env = {"AWS_ACCESS_KEY_ID": "AKIDTESTKEY", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        client = boto3.client("s3", endpoint_url=f"http://{s3.endpoint}", region_name="us-east-1")
        client.create_bucket(Bucket="archive")
        client.upload_file(str(root / "scene.tif"), "archive", "l2a/scene.tif")
        monkeypatch.setenv("AWS_VIRTUAL_HOSTING", "FALSE")
        remote.set_gdal_config({"AWS_S3_ENDPOINT": s3.endpoint, "AWS_HTTPS": "NO"})  # as --gdal-config does
        try:
            items = remote.remote_items("scene", ["s3://archive/l2a/scene.tif"], {}, TILES, root)
            local = scene_tiles(root / "scene.tif", "scene", TILES, root)
            assert [tile_meta(i) for i in items] == [tile_meta(i) for i in local]
            assert all(np.array_equal(a, b) for a, b in zip(pixels(items[:4]), pixels(local[:4]), strict=True))
            assert remote.remote_hosts(items) == ["s3://archive"]
            missing = remote.remote_items("gone", ["s3://archive/l2a/gone.tif"], {}, None, root)
            with pytest.raises(OSError, match="s3://archive/l2a/gone.tif") as err:
                open_item(missing[0])
            assert SECRET not in str(err.value) and "AKIDTESTKEY" not in str(err.value)
        finally:
            remote.set_gdal_config({})


class KillAfterFirstShard(LocalExecutor):
    """Embeds like :class:`LocalExecutor` and kills the server once the first shard is made."""

    def __init__(self, server: Nginx, *args: Any) -> None:
        super().__init__(*args)
        self.server = server

    def embed_shards(self, job: Any, shards: list[int]) -> Iterator[Any]:
        for result in super().embed_shards(job, shards):
            self.server.kill()
            yield result


def test_404_and_dead_server_are_listed_without_credentials(
    served: tuple[Nginx, Path], ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, root = served
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with nginx(root, tmp_path / "nginx") as server:  # its own server: this test kills it
        user = f"http://reader:{SECRET}@127.0.0.1:{server.port}"
        items = remote.remote_items("missing", [f"{server.url}/missing.tif?sig={SECRET}"], {}, None, root)
        items += remote.remote_items("scene", [f"{user}/scene.tif?token={SECRET}"], {}, TILES, root)
        settings = EmbedSettings(device="cpu", workers=0, batch_size=2, shard_size=2)
        job = open_job(tmp_path, tmp_path / "store", ckpt, None, settings, "cpu", items=items)
        start = time.monotonic()
        summary = run_job(job, KillAfterFirstShard(server, ckpt, None, settings), progress=False)
    assert time.monotonic() - start < 60 and summary.complete
    failures = [json.loads(line) for line in (tmp_path / "store" / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == [items[0].id, *(i.id for i in items[2:])]  # the 404, then the dead server
    assert f"{server.url}/missing.tif" in failures[0]["error"] and "HTTP 404" in failures[0]["error"]
    assert all(f"http://127.0.0.1:{server.port}/scene.tif" in f["error"] for f in failures[1:])
    for path in (tmp_path / "store").rglob("*"):
        data = path.read_bytes()
        assert SECRET.encode() not in data and b"reader" not in data, path


def test_truncated_cog_and_silent_host_fail_with_the_url(
    served: tuple[Nginx, Path], listener: tuple[int, list[bytes]], tmp_path: Path
) -> None:
    server, root = served
    items = remote.remote_items("t", [f"{server.url}/truncated.tif"], {}, TILES, root)
    assert len(items) == 3  # listed from the overviews and header, which are there
    errors = []
    for item in items:
        try:
            open_item(item)
        except READ_ERRORS as err:
            errors.append(str(err))
    assert errors and all(e.startswith(f"{server.url}/truncated.tif: ") for e in errors)
    port, received = listener  # accepts, reads the request and never answers
    remote.set_gdal_config({"GDAL_HTTP_TIMEOUT": "1", "GDAL_HTTP_MAX_RETRY": "1", "GDAL_HTTP_RETRY_DELAY": "0.1"})
    try:
        start = time.monotonic()
        (silent,) = remote.remote_items("s", [f"http://127.0.0.1:{port}/a.tif"], {}, None, tmp_path)
        with pytest.raises(OSError, match=f"http://127.0.0.1:{port}/a.tif: .*timed out"):
            open_item(silent)
        assert time.monotonic() - start < 15 and received
    finally:
        remote.set_gdal_config({})


def test_gdal_config_flag(tiny_model: MPSCLIP) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    embed_cmd.configure(parser)
    args = parser.parse_args(
        [
            "s",
            "--out",
            "o",
            "--checkpoint",
            "c",
            "--gdal-config",
            "GDAL_HTTP_TIMEOUT=5",
            "--gdal-config",
            "AWS_S3_ENDPOINT=127.0.0.1:9000",
        ]
    )
    assert embed_cmd.gdal_config(args.gdal_config) == {"GDAL_HTTP_TIMEOUT": "5", "AWS_S3_ENDPOINT": "127.0.0.1:9000"}
    with pytest.raises(MPSCLIPError, match="KEY=VALUE"):
        embed_cmd.gdal_config(["timeout"])
    settings = EmbedSettings(device="cpu", workers=0, gdal_config=(("GDAL_HTTP_TIMEOUT", "5"), ("GDAL_CACHEMAX", "64")))
    Embedder(tiny_model, settings, "sha")  # sets them for its reading processes (forked after it)
    try:
        assert remote.gdal_options()["GDAL_HTTP_TIMEOUT"] == "5" and remote.gdal_options()["GDAL_CACHEMAX"] == 64
    finally:
        remote.set_gdal_config({})


def test_stored_remote_items_read_only_from_declared_hosts(tmp_path: Path) -> None:
    meta = {"kind": "remote", "hrefs": ["https://data.example.org/a.tif"]}
    manifest = {"source_root": str(tmp_path), "remote_hosts": ["https://data.example.org"]}
    assert item_from_meta("a", meta, manifest).hrefs == ("https://data.example.org/a.tif",)
    with pytest.raises(MPSCLIPError, match="http://127.0.0.1:9 is not among"):
        item_from_meta("a", {**meta, "hrefs": ["http://127.0.0.1:9/a.tif"]}, manifest)
    with pytest.raises(MPSCLIPError, match="not among"):
        item_from_meta("a", meta, {"source_root": str(tmp_path)})
    with pytest.raises(MPSCLIPError, match="only http"):
        item_from_meta("a", {**meta, "hrefs": ["/vsicurl/http://127.0.0.1:9/a.tif"]}, manifest)
    assert remote.allowed_remote("https://u:p@data.example.org/b.tif?x=1", {"https://data.example.org"})
    assert not remote.allowed_remote("https://data.example.org.evil/b.tif", {"https://data.example.org"})
    assert remote.public_href("https://u:p@Host.org:8443/a.tif?X-Amz-Signature=1#f") == "https://host.org:8443/a.tif"


@pytest.fixture()
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on loopback that records every connection's first bytes and never answers."""
    received: list[bytes] = []
    held: list[socket.socket] = []
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.settimeout(1)
            try:
                received.append(conn.recv(1024) or b"<connected>")
            except OSError:
                received.append(b"<connected>")
            held.append(conn)  # never answered, closed at the end

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1], received
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    sock.close()


def test_vrt_disguised_as_geotiff_makes_no_request(listener: tuple[int, list[bytes]], tmp_path: Path) -> None:
    port, received = listener
    vrt = (
        '<VRTDataset rasterXSize="64" rasterYSize="64"><SRS>EPSG:32633</SRS>'
        "<GeoTransform>500000, 10, 0, 5000000, 0, -10</GeoTransform>"
        '<VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
        f"<SourceFilename>/vsicurl/http://127.0.0.1:{port}/secret.tif</SourceFilename><SourceBand>1</SourceBand>"
        "</SimpleSource></VRTRasterBand></VRTDataset>"
    )
    (tmp_path / "scene.tif").write_text(vrt)
    item = Item("scene.tif", tmp_path / "scene.tif", {"kind": "file", "path": "scene.tif"}, "file")
    with pytest.raises(READ_ERRORS):
        open_item(item)
    tiled = list(iter_items(tmp_path, TILES))  # not opened as a georeferenced scene: one plain file item
    assert [i.kind for i in tiled] == ["file"]
    window = {"kind": "geotiff-window", "scene": "scene.tif", "window": [0, 0, 64, 64], "bands": [1], "stretch": None}
    with pytest.raises(OSError, match="not recognized"):
        open_item(Item("scene.tif/r0_c0", tmp_path / "scene.tif", window, "geotiff-window"))
    local = remote.remote_items("v", [str(tmp_path / "scene.tif")], {}, None, tmp_path)
    with pytest.raises(OSError, match="not recognized"):
        open_item(local[0])
    time.sleep(0.3)
    assert received == []


def test_fifo_and_devices_fail_fast(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    cases = [
        Item("pipe.jpg", fifo, {"kind": "file", "path": "pipe.jpg"}, "file"),
        Item("zero.png", Path("/dev/zero"), {"kind": "file", "path": "/dev/zero"}, "file"),
        Item(
            "t/a.jpg",
            Path("/dev/zero"),
            {"kind": "tar-member", "member": "a.jpg", "offset": 0, "size": 9},
            "tar-member",
        ),
        Item(
            "s/r0_c0",
            fifo,
            {"kind": "geotiff-window", "window": [0, 0, 8, 8], "bands": [1], "stretch": None},
            "geotiff-window",
        ),
        remote.remote_items("r", [str(fifo)], {}, None, tmp_path)[0],
    ]
    for item in cases:
        start = time.monotonic()
        with pytest.raises(OSError, match="not a regular file"):
            open_item(item)
        assert time.monotonic() - start < 2, item.id
