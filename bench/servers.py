"""Real servers on 127.0.0.1 for the remote-reading tests and bench: Debian's nginx serving a folder, moto's
standalone S3 server, and a TCP proxy that delays every request; each started on a free port and stopped by its
context manager."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on port {port} after {timeout} s; see {log}")


@dataclass
class Nginx:
    root: Path
    port: int
    access_log: Path
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """Stop serving at once (the master and its worker), as a server that dies mid-run."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


NGINX_CONF = """
user {user};
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format ranges '$request_method $uri $status $body_bytes_sent "$http_range"';
    access_log {tmp}/access.log ranges;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ image/tiff tif tiff; image/jpeg jpg jpeg; image/png png; application/json json; }}
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


@contextmanager
def nginx(root: Path, tmp: Path) -> Iterator[Nginx]:
    """nginx (not daemonised, its own config, log and pid in ``tmp``) serving ``root`` on a free port."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = tmp / "nginx.conf"
    user = pwd.getpwuid(os.geteuid()).pw_name  # workers read what the tests wrote (pytest's folders are 0700)
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, root=root, user=user))
    log = tmp / "stderr.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [NGINX, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    server = Nginx(root, port, tmp / "access.log", proc)
    try:
        wait_listening(port, proc, "nginx", log)
        yield server
    finally:
        server.kill()


@dataclass
class S3:
    endpoint: str
    proc: subprocess.Popen


@contextmanager
def moto_s3(tmp: Path) -> Iterator[S3]:
    """moto's standalone S3 server on a free port (``python -m moto.server``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = tmp / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_listening(port, proc, "moto S3 server", log)
        yield S3(f"127.0.0.1:{port}", proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while data := await reader.read(1 << 16):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def _serve_proxy(port: int, target: int, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, 0.0))

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


@contextmanager
def delaying_proxy(target_port: int, delay_s: float) -> Iterator[int]:
    """A TCP proxy on a free port (in its own process) to ``target_port`` that holds every chunk a client sends
    for ``delay_s`` before passing it on: each HTTP request arrives ``delay_s`` late (answers are not delayed)."""
    port = free_port()
    proc = multiprocessing.get_context("fork").Process(target=_serve_proxy, args=(port, target_port, delay_s))
    proc.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or not proc.is_alive():
                    raise RuntimeError(f"the delaying proxy did not listen on port {port}") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.join(10)
