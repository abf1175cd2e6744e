"""STAC sources: static catalogs from disk, over HTTP (nginx) and S3 (moto), stac-geoparquet and a STAC API search
(rustac's server), all listed through pystac / pystac-client / stac-geoparquet; servers run on 127.0.0.1 (nginx
and moto as :mod:`mpsclip.bench.servers` starts them, rustac's as :mod:`tests.servers` does)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.extras import require

pystac = require("pystac", "pip install 'mpsclip[stac]'")
require("pystac_client", "pip install 'mpsclip[stac]'")
require("rasterio", "pip install 'mpsclip[geo]'")

from mpsclip.bench.servers import moto_s3, nginx  # noqa: E402

from mpsclip.archive import stac  # noqa: E402
from mpsclip.archive.hrefs import public_href  # noqa: E402
from mpsclip.archive.items import TileSettings  # noqa: E402
from mpsclip.errors import MPSCLIPError  # noqa: E402
from tests import servers  # noqa: E402

BANDS = {"B04": "red", "B03": "green", "B02": "blue"}
SCENES: dict[str, dict[str, Any]] = {
    "scene-0": {"when": datetime(2024, 5, 1, 10, 20, 30, tzinfo=timezone.utc), "cloud": 5.0, "visual": True},
    "scene-1": {"start": datetime(2024, 5, 10, 12, 0, tzinfo=timezone.utc), "cloud": 40.0, "visual": True},
    "scene-2": {"when": datetime(2024, 6, 1, 9, 0, tzinfo=timezone.utc), "cloud": 12.5, "visual": False},
}
"""scene-1 has only start/end datetimes; scene-2 has band assets but no visual one."""
DATA_URL = "https://data.example"
TILES = TileSettings(32, 32)
TILE_NAMES = ["r000000_c000000", "r000000_c000032", "r000032_c000000", "r000032_c000032"]
"""The 32 px tiles of a 64 px scene, in id order."""


def scene_pixels(index: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    return rng.integers(1, 255, size=(3, 64, 64), dtype=np.uint8)


def write_catalog(folder: Path) -> Path:
    """catalog.json -> collection ``s2`` -> the :data:`SCENES`, with a ``visual`` RGB COG (not scene-2) and B04/B03/B02
    single-band COGs (``eo:bands`` common names); relative hrefs throughout. Returns the catalog file."""
    catalog = pystac.Catalog("archive", "a tiny Sentinel-2-like archive")
    extent = pystac.Extent(pystac.SpatialExtent([[15.0, 45.0, 15.03, 45.01]]), pystac.TemporalExtent([[None, None]]))
    collection = pystac.Collection("s2", "Sentinel-2-like scenes", extent)
    catalog.add_child(collection)
    for index, (name, scene) in enumerate(SCENES.items()):
        west = 15.0 + 0.01 * index
        box = [west, 45.0, west + 0.01, 45.01]
        geometry = {"type": "Polygon", "coordinates": [[[box[0], box[1]], [box[2], box[1]], [box[2], box[3]],
                                                        [box[0], box[3]], [box[0], box[1]]]]}
        props: dict[str, Any] = {"platform": "sentinel-2a", "eo:cloud_cover": scene["cloud"]}
        if "start" in scene:
            props |= {"start_datetime": scene["start"].isoformat(), "end_datetime": scene["start"].isoformat()}
        item = pystac.Item(name, geometry, box, scene.get("when"), props)
        pixels = scene_pixels(index)
        scene_dir = folder / "s2" / name
        if scene["visual"]:
            servers.write_cog(scene_dir / "visual.tif", pixels, tuple(box))
            item.add_asset("visual", pystac.Asset(str(scene_dir / "visual.tif"), media_type=pystac.MediaType.COG,
                                                  roles=["visual"]))
        for band, (key, common) in enumerate(BANDS.items()):
            servers.write_cog(scene_dir / f"{key}.tif", pixels[band : band + 1], tuple(box))
            asset = pystac.Asset(str(scene_dir / f"{key}.tif"), media_type=pystac.MediaType.COG, roles=["data"],
                                 extra_fields={"eo:bands": [{"name": key, "common_name": common}]})
            item.add_asset(key, asset)
        collection.add_item(item)
    catalog.normalize_hrefs(str(folder))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return folder / "catalog.json"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of :func:`write_catalog` (read-only)."""
    folder = tmp_path_factory.mktemp("archive")
    write_catalog(folder)
    return folder


def hrefs_below(listing: stac.Listing, prefix: str) -> dict[str, tuple[str, ...]]:
    """Each record's hrefs with ``prefix`` cut off (to compare listings of one archive from different places)."""
    assert all(h.startswith(prefix) for r in listing.records for h in r.hrefs), listing.records
    return {r.item_id: tuple(h[len(prefix) :] for h in r.hrefs) for r in listing.records}


def test_local_catalog_gives_one_record_per_item_with_assets_and_meta(archive: Path) -> None:
    listing = stac.list_records(str(archive / "catalog.json"))
    assert [r.item_id for r in listing.records] == ["s2/scene-0", "s2/scene-1", "s2/scene-2"]
    assert listing.missing == []
    by_id = {r.item_id: r for r in listing.records}
    assert by_id["s2/scene-0"].hrefs == (str(archive / "s2/scene-0/visual.tif"),)
    assert by_id["s2/scene-2"].hrefs == tuple(str(archive / f"s2/scene-2/{k}.tif") for k in BANDS)  # no visual
    assert by_id["s2/scene-0"].meta == {
        "stac_item": "scene-0", "collection": "s2", "datetime": "2024-05-01T10:20:30Z", "platform": "sentinel-2a",
        "eo:cloud_cover": 5.0, "assets": ["visual"],
    }
    assert by_id["s2/scene-1"].meta["datetime"] == "2024-05-10T12:00:00Z"  # start_datetime, no datetime
    assert by_id["s2/scene-2"].meta["assets"] == list(BANDS)


def test_assets_by_key_or_band_common_name(archive: Path) -> None:
    source = str(archive / "catalog.json")
    rgb = stac.list_records(stac.with_assets(source, ["red", "green", "blue"]))
    assert [r.meta["assets"] for r in rgb.records] == [list(BANDS)] * 3
    assert rgb.records[0].hrefs == tuple(str(archive / f"s2/scene-0/{k}.tif") for k in BANDS)
    assert stac.list_records(stac.with_assets(source, ["B04", "B03", "B02"])).records == rgb.records

    visual = stac.list_records(stac.with_assets(source, ["visual"]))
    assert [r.item_id for r in visual.records] == ["s2/scene-0", "s2/scene-1"]
    assert [i for i, _ in visual.missing] == ["s2/scene-2"] and "no asset visual" in visual.missing[0][1]

    stac_1_1 = pystac.Item("x", None, None, datetime(2024, 1, 1, tzinfo=timezone.utc), {}, collection="c")
    stac_1_1.add_asset("B08", pystac.Asset("/d/B08.tif", extra_fields={"bands": [{"eo:common_name": "nir"}]}))
    assert stac._find_asset(stac_1_1, "nir") == "B08" and stac._find_asset(stac_1_1, "red") is None
    with pytest.raises(MPSCLIPError, match=r"none of its 3 items has the assets.*no asset nir.*--assets"):
        stac.list_records(stac.with_assets(source, ["nir"]))
    with pytest.raises(MPSCLIPError, match="give one asset"):
        stac.split_assets(source + "#assets=red,green")


def test_catalog_item_and_item_collection_over_http_from_nginx(archive: Path, tmp_path: Path) -> None:
    local = hrefs_below(stac.list_records(str(archive / "catalog.json")), str(archive))
    collection = pystac.ItemCollection([pystac.Item.from_file(str(archive / f"s2/{n}/{n}.json")) for n in SCENES])
    with nginx(archive, tmp_path / "nginx") as server:
        url = server.url
        assert hrefs_below(stac.list_records(f"{url}/catalog.json"), url) == local
        one = stac.list_records(f"{url}/s2/scene-1/scene-1.json")
        assert hrefs_below(one, url) == {"s2/scene-1": local["s2/scene-1"]}

        features = collection.to_dict()
        for feature in features["features"]:  # absolute hrefs: an ItemCollection has no self link
            for asset in feature["assets"].values():
                asset["href"] = f"{url}/s2/{feature['id']}/{Path(asset['href']).name}"
        (archive / "found.json").write_text(json.dumps(features), encoding="utf-8")
        try:
            assert hrefs_below(stac.list_records(f"{url}/found.json"), url) == local
        finally:
            (archive / "found.json").unlink()

        with pytest.raises(MPSCLIPError, match=r"/nowhere\.json: cannot read it as STAC.*404") as err:
            stac.list_records(f"{url}/nowhere.json?X-Amz-Signature=secret")
        assert "secret" not in str(err.value)
    access = (tmp_path / "nginx" / "access.log").read_text(encoding="utf-8")
    assert "GET /s2/collection.json" in access and "GET /s2/scene-2/scene-2.json" in access


def test_catalog_over_s3_from_moto(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require("boto3", "pip install 'mpsclip[stac]'")
    local = hrefs_below(stac.list_records(str(archive / "catalog.json")), str(archive))
    with moto_s3(tmp_path / "moto") as s3:
        servers.aws_environment(monkeypatch, s3.endpoint)
        servers.upload_folder(archive, "archive")
        monkeypatch.delenv("AWS_ENDPOINT_URL")  # GDAL's AWS_S3_ENDPOINT/AWS_HTTPS alone must do
        assert stac.s3_endpoint() == f"http://{s3.endpoint}"
        listing = stac.list_records("s3://archive/catalog.json#assets=red,green,blue")
        assert [r.hrefs[0] for r in listing.records] == [f"s3://archive/s2/{n}/B04.tif" for n in SCENES]
        listing_all = stac.list_records("s3://archive/catalog.json")
        assert hrefs_below(listing_all, "s3://archive") == local
        with pytest.raises(MPSCLIPError, match=r"s3://archive/missing\.json: cannot read it as STAC.*NoSuchKey"):
            stac.list_records("s3://archive/missing.json")

        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # a public bucket, read as GDAL reads it
            monkeypatch.delenv(key)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
        with pytest.raises(MPSCLIPError, match=r"s3://archive/catalog\.json: cannot read it as STAC.*NoCredentials"):
            stac.list_records("s3://archive/catalog.json")
        monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
        assert stac.list_records("s3://archive/catalog.json") == listing_all

        from mpsclip.archive.readers import open_item
        from mpsclip.archive.sources import iter_items

        tiles = list(iter_items("s3://archive/catalog.json#assets=visual", TILES))  # GDAL's /vsis3/ lists them
        assert [t.id for t in tiles] == [f"s2/{n}/{t}" for n in ("scene-0", "scene-1") for t in TILE_NAMES]
        assert tiles[0].meta["hrefs"] == ["s3://archive/s2/scene-0/visual.tif"]
        tile = np.asarray(open_item(tiles[0]).convert("RGB"))
        assert np.array_equal(tile, scene_pixels(0)[:, :32, :32].transpose(1, 2, 0))


def test_stac_geoparquet_lists_as_the_catalog(archive: Path, tmp_path: Path) -> None:
    import pyarrow.fs  # noqa: F401  (stac-geoparquet 0.8 uses pyarrow.fs without importing it)

    require("stac_geoparquet", "pip install 'mpsclip[stac]'")
    from stac_geoparquet.arrow import parse_stac_items_to_arrow, to_parquet

    catalog = pystac.Catalog.from_file(str(archive / "catalog.json"))
    items = [item.clone() for item in catalog.get_items(recursive=True)]
    for item in items:
        item.make_asset_hrefs_absolute()
    to_parquet(parse_stac_items_to_arrow(items), tmp_path / "items.parquet")
    from_parquet = stac.list_records(str(tmp_path / "items.parquet"))
    assert from_parquet == stac.list_records(str(archive / "catalog.json"))
    with nginx(tmp_path, tmp_path / "nginx") as server:
        assert stac.list_records(f"{server.url}/items.parquet") == from_parquet


def api_files(archive: Path, folder: Path, data_url: str) -> list[Path]:
    """The archive's collection and items as a STAC API loads them, asset hrefs absolute below ``data_url``."""
    collection = pystac.Catalog.from_file(str(archive / "catalog.json")).get_child("s2")
    items = []
    for item in collection.get_items():
        feature = item.to_dict(include_self_link=False, transform_hrefs=False)
        for asset in feature["assets"].values():
            asset["href"] = f"{data_url}/s2/{item.id}/{Path(asset['href']).name}"
        items.append(feature)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": items}), "utf-8")
    coll = {**collection.to_dict(include_self_link=False), "links": []}
    (folder / "collection.json").write_text(json.dumps(coll), encoding="utf-8")
    return [folder / "collection.json", folder / "items.json"]


def test_stac_api_search_through_pystac_client_against_rustac(archive: Path, tmp_path: Path) -> None:
    """A real STAC API on loopback: rustac's server (memory backend). stac-fastapi-geoparquet cannot start here:
    its DuckDB client downloads DuckDB's spatial extension at start (no network), and the extension wheels on
    PyPI (1.5.5) do not load into the DuckDB built into rustac (1.5.6). rustac's memory backend has no query or
    filter extension, so those are checked to fail clearly."""
    local = hrefs_below(stac.list_records(str(archive / "catalog.json")), str(archive))
    with servers.stac_api(api_files(archive, tmp_path / "files", DATA_URL), tmp_path / "api") as url:
        everything = stac.list_records(stac.StacSearch(url, collections=("s2",)).url())
        assert hrefs_below(everything, DATA_URL) == local
        may = stac.StacSearch(url, ("s2",), datetime="2024-05-01T00:00:00Z/2024-05-31T23:59:59Z")
        assert [r.item_id for r in stac.list_records(may.url()).records] == ["s2/scene-0", "s2/scene-1"]
        june = stac.StacSearch(url, ("s2",), datetime="2024-06-01T00:00:00Z/..")
        assert [r.item_id for r in stac.list_records(june.url()).records] == ["s2/scene-2"]
        east = stac.StacSearch(url, ("s2",), bbox=(15.021, 45.0, 15.05, 45.01))
        assert [r.item_id for r in stac.list_records(east.url()).records] == ["s2/scene-2"]
        with pytest.raises(MPSCLIPError, match="no STAC items found"):
            stac.list_records(stac.StacSearch(url, ("s2",), datetime="2025-01-01T00:00:00Z/..").url())
        with pytest.raises(MPSCLIPError, match="does not declare the QUERY extension.*drop --query"):
            stac.list_records(stac.StacSearch(url, ("s2",), query=["eo:cloud_cover<20"]).url())  # rustac's memory API


def test_search_urls_and_hrefs_keep_no_secrets() -> None:
    search = stac.StacSearch("https://stac.example/v1/", ("sentinel-2-l2a", "landsat"), (1.0, 2.5, 3.0, 4.0),
                             "2024-01-01/2024-02-01", {"eo:cloud_cover": {"lt": 20}}, "eo:cloud_cover < 20")
    url = search.url()
    assert url.startswith("https://stac.example/v1/search?collections=sentinel-2-l2a%2Clandsat&bbox=1%2C2.5%2C3%2C4")
    assert stac.StacSearch.from_url(url) == replace(search, api="https://stac.example/v1")
    cql2 = {"op": "<", "args": [{"property": "eo:cloud_cover"}, 20]}
    assert stac.StacSearch.from_url(replace(search, filter=cql2).url()).filter == cql2
    assert public_href("https://user:pw@h.example:8443/a/b.tif?sig=abc&se=2024#frag") == "https://h.example:8443/a/b.tif"
    assert public_href("s3://bucket/a.tif?versionId=1") == "s3://bucket/a.tif"
    assert public_href("/data/a.tif") == "/data/a.tif"
    assert stac.parse_query(["eo:cloud_cover<20"]) == ["eo:cloud_cover<20"]
    assert stac.parse_query(['{"eo:cloud_cover": {"lt": 20}}']) == {"eo:cloud_cover": {"lt": 20}}
    with pytest.raises(MPSCLIPError, match=r"stac\.example/v1/search: bbox '1,2,3': expected four numbers"):
        stac.StacSearch.from_url("https://stac.example/v1/search?bbox=1,2,3")
    with pytest.raises(MPSCLIPError, match=r"bbox \(1, 2, 3\): expected four numbers"):
        stac.StacSearch("https://stac.example/v1", bbox=(1, 2, 3))  # type: ignore[arg-type]


def test_embed_flags_give_the_source_a_store_records(archive: Path) -> None:
    from mpsclip.cli import build_parser
    from mpsclip.commands.embed import embed_source

    def source(*argv: str) -> str:
        return embed_source(build_parser().parse_args(["embed", *argv, "--out", "o", "--checkpoint", "c"]))

    url = source("--stac-api", "http://127.0.0.1:9/v1", "--collections", "s2,l8", "--bbox", "15,45,15.1,45.1",
                 "--datetime", "2024-05-01T00:00:00Z/..", "--query", "eo:cloud_cover<20", "--assets", "red,green,blue")
    search = stac.StacSearch.from_url(stac.split_assets(url)[0])
    assert search == stac.StacSearch("http://127.0.0.1:9/v1", ("s2", "l8"), (15, 45, 15.1, 45.1),
                                     "2024-05-01T00:00:00Z/..", ["eo:cloud_cover<20"])
    assert stac.split_assets(url)[1] == ("red", "green", "blue")
    catalog = str(archive / "catalog.json")
    assert source(catalog, "--assets", "visual") == catalog + "#assets=visual"
    assert source("s3://b/catalog.json") == "s3://b/catalog.json"
    with pytest.raises(MPSCLIPError, match="not both"):
        source(catalog, "--stac-api", "http://127.0.0.1:9/v1")
    with pytest.raises(MPSCLIPError, match="--collections, --datetime: only used with --stac-api"):
        source(catalog, "--collections", "s2", "--datetime", "2024")
    with pytest.raises(MPSCLIPError, match="--assets: .* is not a STAC"):
        source(str(archive), "--assets", "visual")
    with pytest.raises(MPSCLIPError, match="give a SOURCE"):
        source()
    with pytest.raises(MPSCLIPError, match="give one asset"):
        source(catalog, "--assets", "red,green")
    across = stac.StacSearch.from_url(source("--stac-api", "http://127.0.0.1:9/v1", "--bbox", "170,-20,-170,-10"))
    assert across.bbox == (170, -20, -170, -10)  # west > east: across the antimeridian, as 'mpsclip search' reads it
    with pytest.raises(SystemExit):  # a usage error, checked as 'mpsclip search --bbox' checks it
        source("--stac-api", "http://127.0.0.1:9/v1", "--bbox", "15,95,16,96")


def test_embed_a_catalog_over_http_equals_its_cogs_from_disk(
    archive: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mpsclip embed`` of the catalog served by nginx (visual assets, 32 px tiles) gives the embeddings of the
    same COGs embedded from a local folder, and so does ``mpsclip embed --stac-api`` searching May 2024 in
    rustac's API over the same items; scene-2 (no visual asset, June) is left out and named."""
    from mpsclip.archive.store_reader import load_store
    from mpsclip.cli import main

    disk = tmp_path / "disk"
    for name in ("scene-0", "scene-1"):
        (disk / name).mkdir(parents=True)
        (disk / name / "visual.tif").write_bytes((archive / "s2" / name / "visual.tif").read_bytes())
    flags = ["--checkpoint", str(ckpt), "--workers", "0", "--device", "cpu", "--quiet", "--tile-size", "32"]
    with nginx(archive, tmp_path / "nginx") as server:
        url = server.url
        source = f"{url}/catalog.json"
        assert main(["embed", source, "--assets", "visual", "--out", str(tmp_path / "http.store"), *flags]) == 0
        assert "item s2/scene-2 left out: no asset visual" in capsys.readouterr().err
        with servers.stac_api(api_files(archive, tmp_path / "files", url), tmp_path / "api") as api:
            may = "2024-05-01T00:00:00Z/2024-05-31T23:59:59Z"
            search = ["--stac-api", api, "--collections", "s2", "--datetime", may]
            assert main(["embed", *search, "--assets", "visual", "--out", str(tmp_path / "api.store"), *flags]) == 0
    assert main(["embed", str(disk), "--out", str(tmp_path / "disk.store"), *flags]) == 0

    http, local = load_store(tmp_path / "http.store"), load_store(tmp_path / "disk.store")
    assert len(http.ids) == len(local.ids) == 8  # 2 scenes of 64 px in 32 px tiles
    local_rows = {i.replace("/visual.tif", ""): row for row, i in enumerate(local.ids)}
    order = [local_rows[i.removeprefix("s2/")] for i in http.ids]
    assert np.array_equal(http.columns["retrieval"], local.columns["retrieval"][order])
    searched = load_store(tmp_path / "api.store")
    assert searched.ids == http.ids and np.array_equal(searched.columns["retrieval"], http.columns["retrieval"])
    assert "/search?collections=s2&datetime=2024-05-01" in searched.manifest["source"]  # the search, recorded
    meta = http.metas[http.ids.index("s2/scene-1/" + http.ids[-1].rsplit("/", 1)[1])]
    assert meta["stac_item"] == "scene-1" and meta["collection"] == "s2" and meta["datetime"] == "2024-05-10T12:00:00Z"
    assert meta["hrefs"] == [f"{url}/s2/scene-1/visual.tif"] and meta["eo:cloud_cover"] == 40.0


def test_a_signed_catalog_url_is_refused_as_source() -> None:
    from mpsclip.cli import build_parser
    from mpsclip.commands.embed import embed_source

    argv = ["embed", "https://h.example/c.json?sig=s3cr3t", "--out", "o", "--checkpoint", "c"]
    args = build_parser().parse_args(argv)
    with pytest.raises(MPSCLIPError, match=r"https://h.example/c.json: a query string .* manifest") as err:
        embed_source(args)
    assert "s3cr3t" not in str(err.value)


def test_url_lists_and_one_image_url_give_remote_items(archive: Path, tmp_path: Path) -> None:
    from mpsclip.archive.sources import iter_items

    with nginx(archive, tmp_path / "nginx") as server:
        url = server.url
        scene0, scene1 = f"{url}/s2/scene-0/visual.tif", f"{url}/s2/scene-1/visual.tif"
        listed = tmp_path / "urls.txt"
        listed.write_text(f"# two COGs\n{scene1}?se=2030&sig=s3cr3t\n\n{scene0}\n", encoding="utf-8")
        items = list(iter_items(listed))
        assert [(i.id, i.kind, i.meta["hrefs"]) for i in items] == [
            (scene0, "remote", [scene0]), (scene1, "remote", [scene1])
        ]
        tiles = list(iter_items(scene0, TILES))
        assert [i.id for i in tiles] == [f"{scene0}/{t}" for t in TILE_NAMES]
        from_stac = list(iter_items(f"{url}/catalog.json#assets=red,green,blue", TILES))
        assert len(from_stac) == 3 * 4 and from_stac[0].id == f"s2/scene-0/{TILE_NAMES[0]}"
        assert from_stac[0].meta["hrefs"] == [f"{url}/s2/scene-0/{k}.tif" for k in BANDS]
        assert from_stac[0].meta["datetime"] == "2024-05-01T10:20:30Z"
    listed.write_text(f"{scene0}\n{scene0}?token=1\n", encoding="utf-8")
    with pytest.raises(MPSCLIPError, match="line 2: .* is listed twice"):
        list(iter_items(listed))


def test_source_identity_keeps_urls_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpsclip.archive.sources import source_identity, source_root

    monkeypatch.chdir(tmp_path)
    assert source_identity(Path("https://h.example/stac/catalog.json#assets=visual")) == (
        "https://h.example/stac/catalog.json#assets=visual"  # what Path() made of it, repaired
    )
    assert source_identity("s3://bucket/catalog.json") == "s3://bucket/catalog.json"
    assert source_identity("mirror/catalog.json#assets=red,green,blue") == (
        f"{tmp_path.resolve()}/mirror/catalog.json#assets=red,green,blue"
    )
    assert source_root("mirror/catalog.json#assets=visual") == tmp_path / "mirror"


def test_catalog_reads_retry_5xx_and_time_out(archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A catalog host answering 503 is retried; one that never answers times out (bounded), naming the URL."""
    import http.server
    import socket
    import threading

    item = (archive / "s2/scene-0/scene-0.json").read_bytes()
    asked: list[str] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            asked.append(self.path)
            status, body = (503, b"busy") if len(asked) < 3 else (200, item)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/scene-0.json"
        listing = stac.list_records(url)
        assert [r.item_id for r in listing.records] == ["s2/scene-0"] and len(asked) == 3
        assert listing.records[0].hrefs == (f"http://127.0.0.1:{server.server_port}/visual.tif",)
    finally:
        server.shutdown()
        server.server_close()

    monkeypatch.setattr(stac, "HTTP_TIMEOUT_S", (1.0, 0.3))
    monkeypatch.setattr(stac, "HTTP_RETRIES", 1)
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with pytest.raises(MPSCLIPError, match=rf"127.0.0.1:{port}/c.json: cannot read it as STAC.*timed out") as err:
            stac.list_records(f"http://127.0.0.1:{port}/c.json?token=s3cr3t#assets=visual")
    assert "s3cr3t" not in str(err.value)
