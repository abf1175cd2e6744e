"""Real servers on 127.0.0.1 for the tests of cloud archives, started and stopped by the tests themselves.

* :func:`nginx` serves a folder with Debian's nginx (range requests included), as a child process in the
  foreground with its own config, logs and temp folders below a tmp folder (``make test`` installs nginx);
* :func:`moto_s3` runs moto's standalone S3 server (``moto[server]``) and sets the AWS environment to reach it
  the way GDAL and boto3 both read it (``AWS_S3_ENDPOINT`` host:port, ``AWS_HTTPS=NO``, path-style addressing,
  ``AWS_ENDPOINT_URL``, dummy keys);
* :func:`stac_api` runs rustac's STAC API server (``rustac serve``, memory backend) over items in files;
* :func:`write_cog` makes a tiny Cloud-Optimized GeoTIFF (rio-cogeo) for them to serve.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, process: subprocess.Popen | None = None, timeout: float = START_TIMEOUT_S) -> None:
    """Return once ``url`` answers (any HTTP status); fail the test when ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"the server for {url} exited with {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"no answer from {url} after {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


NGINX_CONF = """\
{user}
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{
        application/json json;
        image/tiff tif tiff;
        image/jpeg jpg jpeg;
        image/png png;
    }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        pytest.fail("nginx is not installed: `make test` installs it (apt-get install -y nginx)", pytrace=False)
    return found


@contextmanager
def nginx(root: Path, tmp: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on a free loopback port; yields the base URL (``http://127.0.0.1:PORT``) and
    writes the access log to ``tmp/access.log``."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""  # workers as root read the tests' private tmp folders
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, port=port, root=root.resolve()), encoding="utf-8")
    process = subprocess.Popen(
        [nginx_binary(), "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "error.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/", process)
        yield url
    finally:
        stop(process)


@contextmanager
def moto_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server on a free loopback port, the AWS environment pointing at it; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION":
        "us-east-1", "AWS_REGION": "us-east-1", "AWS_S3_ENDPOINT": f"127.0.0.1:{port}", "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE", "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata address for credentials
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    try:
        wait_for_http(endpoint + "/")
        yield endpoint
    finally:
        server.stop()


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
    url = f"http://127.0.0.1:{port}"
    tmp.mkdir(parents=True, exist_ok=True)
    log = (tmp / "rustac.log").open("wb")
    process = subprocess.Popen(
        [str(rustac), "serve", *map(str, hrefs), "--use-duckdb", "false", "--addr", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(url + "/", process)
        yield url
    finally:
        stop(process)
        log.close()


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
