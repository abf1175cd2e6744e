"""Real servers on 127.0.0.1 for the tests of cloud archives, started and stopped by the tests themselves.

Debian's nginx and moto's S3 server are :mod:`mpsclip.bench.servers`' (the remote-reading bench uses them too);
here are what the tests add around them:

* :func:`aws_environment` points the AWS environment at a moto server the way GDAL and boto3 both read it
  (``AWS_S3_ENDPOINT`` host:port, ``AWS_HTTPS=NO``, path-style addressing, ``AWS_ENDPOINT_URL``, dummy keys, no
  instance-metadata look-up) and :func:`upload_folder` fills a bucket;
* :func:`stac_api` runs rustac's STAC API server (``rustac serve``, memory backend) over items in files;
* :func:`write_cog` makes a tiny Cloud-Optimized GeoTIFF (rio-cogeo) for them to serve.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from mpsclip.bench.servers import free_port, wait_listening


def aws_environment(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The AWS environment for the S3 server at ``endpoint`` (``host:port``), for this test only."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION":
        "us-east-1", "AWS_REGION": "us-east-1", "AWS_S3_ENDPOINT": endpoint, "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE", "AWS_ENDPOINT_URL": f"http://{endpoint}",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata address for credentials
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_NO_SIGN_REQUEST"):
        monkeypatch.delenv(key, raising=False)


def upload_folder(folder: Path, bucket: str) -> None:
    """Every file below ``folder`` into ``bucket`` (created) at its relative path, with the environment's S3; the
    objects are public-read (so that ``AWS_NO_SIGN_REQUEST=YES`` reads them too)."""
    import boto3

    s3 = boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, path.relative_to(folder).as_posix(), ExtraArgs={"ACL": "public-read"})


@contextmanager
def stac_api(hrefs: list[Path], tmp: Path) -> Iterator[str]:
    """rustac's STAC API server (memory backend) over the collections/items in ``hrefs``; yields its URL."""
    rustac = Path(sys.executable).parent / "rustac"
    if not rustac.exists():
        pytest.fail(f"{rustac}: missing; `make venv` installs rustac (the dev extra)", pytrace=False)
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "rustac.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(rustac), "serve", *map(str, hrefs), "--use-duckdb", "false", "--addr", f"127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(port, process, "rustac serve", log)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def write_cog(path: Path, data: np.ndarray, bounds: tuple[float, float, float, float] = (15.0, 45.0, 15.01, 45.01),
              crs: str = "EPSG:4326") -> Path:
    """A Cloud-Optimized GeoTIFF of ``data`` [bands, H, W] covering ``bounds`` (W, S, E, N), made with rio-cogeo
    (deflate, 32 px internal tiles so that even 64 px files have several blocks)."""
    import rasterio
    from rasterio.io import MemoryFile
    from rasterio.transform import from_bounds
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    bands, height, width = data.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": bands, "dtype": data.dtype.name,
               "crs": crs, "transform": from_bounds(*bounds, width, height)}
    cog = {**cog_profiles.get("deflate"), "blockxsize": 32, "blockysize": 32}
    path.parent.mkdir(parents=True, exist_ok=True)
    with MemoryFile() as memory:
        with memory.open(**profile) as dst:
            dst.write(data)
        with memory.open() as src, rasterio.Env(GDAL_NUM_THREADS="1"):
            cog_translate(src, str(path), cog, in_memory=True, quiet=True)
    return path
