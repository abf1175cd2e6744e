"""What ``mpsclip serve`` runs, start to stop: the Triton towers (unless ``--no-triton``), then uvicorn with the API.

Start: the API's socket is bound first (a busy port fails before anything starts), then Triton and its models, then
the app starts and sends one real query through the towers (:func:`~mpsclip.serve.encoders.probe`); only when it was
answered right are the URLs printed ("serving ...") and ``/readyz`` 200, otherwise the server stops with status 1
and says why (keeping Triton's log). The log (``mpsclip.serve``, INFO and above) goes to stderr.

SIGINT/SIGTERM: uvicorn stops accepting, drains in-flight requests (up
to ``drain_s``) and runs the app's shutdown (the encoder closes its Triton client); then Triton stops (its
in-flight inferences finish first) and its workspace is removed. Returns 0 once nothing is listening any more.

A Ctrl-C typed in a terminal reaches the whole foreground process group, ``tritonserver`` included (PyTriton
starts it in ours), so requests caught between the API and the towers at that moment may get a 503; a signal sent
to this process alone (``kill -INT PID``, systemd, a container runtime) drains everything.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from mpsclip.serve.catalog import Catalog
from mpsclip.serve.encoders import InProcessEncoder, QueryEncoder, TritonEncoder
from mpsclip.serve.towers import TowerSet
from mpsclip.serve.triton import TritonSettings, TritonTowers

from mpsclip.errors import MPSCLIPError
from mpsclip.triton_config import MAX_BATCH_SIZE, QUEUE_DELAY_US

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOG_FORMAT = "%(levelname)s:    %(message)s"  # as uvicorn's own lines


@dataclass(frozen=True)
class ServerSettings:
    """Addresses and batching of one ``mpsclip serve``; Triton ports default to the API port + 1, + 2, + 3."""

    host: str = "127.0.0.1"
    port: int = 8000
    triton: bool = True
    triton_http_port: int | None = None
    triton_grpc_port: int | None = None
    triton_metrics_port: int | None = None
    batching: bool = True
    max_batch: int = MAX_BATCH_SIZE
    max_queue: int = 256
    queue_delay_us: int = QUEUE_DELAY_US
    drain_s: float = 10.0

    def triton_settings(self) -> TritonSettings:
        return TritonSettings(
            http_port=self.triton_http_port or self.port + 1,
            grpc_port=self.triton_grpc_port or self.port + 2,
            metrics_port=self.triton_metrics_port or self.port + 3,
            max_batch_size=self.max_batch,
            queue_delay_us=self.queue_delay_us,
            dynamic_batching=self.batching,
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """The API's socket, bound now so that a busy port fails before Triton starts; it listens (connections are
    refused until then) once uvicorn serves on it, after the towers are ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections accepted from such a socket; without
    # it a keep-alive client waits ~40 ms per response (Nagle against the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise MPSCLIPError(
            f"--host {host} --port {port}: cannot listen there ({err.strerror}); pick another --port"
        ) from err
    return sock


def urls(settings: ServerSettings, triton: TritonTowers | None) -> list[str]:
    api = f"http://{settings.host}:{settings.port}"
    lines = [f"search page  {api}/", f"API docs     {api}/docs", f"metrics      {api}/metrics"]
    if triton is not None:
        text, image = next(iter(triton.names.values()))
        lines += [
            f"Triton HTTP  http://{triton.http_url} (KServe v2; models {text}, {image})",
            f"Triton gRPC  {triton.grpc_url}",
            f"Triton metrics {triton.metrics_url}",
        ]
    return lines


def announce(server: Any, app: Any, lines: list[str], out: TextIO, failed: list[str], finished: threading.Event
             ) -> None:
    """Once uvicorn has started (the app's start-up query answered), print ``lines``; or, when that query failed,
    say why and stop the server (``failed`` gets the reason)."""
    while not server.started:
        if server.should_exit or finished.is_set():
            return
        time.sleep(0.05)
    error = getattr(getattr(app, "state", None), "ready_error", None)
    if error is not None:
        failed.append(error)
        print(f"not serving: {error}", file=out)
        server.should_exit = True
    else:
        print(*lines, sep="\n  ", file=out)
    out.flush()


def log_to(out: TextIO) -> logging.Handler:
    """Send the ``mpsclip.serve`` log (INFO and above) to ``out``; returns the handler, to remove at the end."""
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("mpsclip.serve")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False  # once, not again through a root handler someone else set up
    return handler


def serve(
    catalog: Catalog,
    towers: TowerSet,
    settings: ServerSettings,
    make_app: Callable[[QueryEncoder], Any],
    out: TextIO | None = None,
) -> int:
    """Run until SIGINT/SIGTERM (see the module docstring); ``make_app(encoder)`` builds the FastAPI app. Messages
    go to ``out`` (default: the ``sys.stderr`` of the call, not of the module's import)."""
    import uvicorn

    out = sys.stderr if out is None else out
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in STOP_SIGNALS}
    sock = bind_socket(settings.host, settings.port)
    triton: TritonTowers | None = None
    failed: list[str] = []
    handler = log_to(out)
    try:
        towers.add(catalog)
        encoder: QueryEncoder
        if settings.triton:
            starting = TritonTowers(towers.towers, settings.triton_settings())
            print(f"starting Triton Inference Server (models of {len(towers.towers)} checkpoint(s))...", file=out)
            took = starting.start()  # stops what it started when it fails
            triton = starting
            towers.frozen = True
            print(f"Triton started in {took:.1f} s (log: {triton.log_file})", file=out)
            encoder = TritonEncoder(towers, triton.grpc_url, triton.names, max_queue=settings.max_queue)
        else:
            encoder = InProcessEncoder(
                towers, batching=settings.batching, max_batch=settings.max_batch, max_queue=settings.max_queue
            )
        if stopping.is_set():
            return 0
        app = make_app(encoder)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(settings.drain_s))
        server = uvicorn.Server(config)
        lines = [f"serving {', '.join(catalog.stores)}; Ctrl-C stops", *urls(settings, triton)]
        finished = threading.Event()
        threading.Thread(target=announce, args=(server, app, lines, out, failed, finished), daemon=True).start()
        try:
            server.run(sockets=[sock])  # restores our handlers and re-raises the signal it caught: stopping is set
        finally:
            finished.set()
        return 0 if server.started and not failed else 1
    finally:
        sock.close()
        logging.getLogger("mpsclip.serve").removeHandler(handler)
        logging.getLogger("mpsclip.serve").propagate = True
        if triton is not None:
            print("stopping Triton...", file=out)
            triton.stop(keep_log=bool(failed))
            if failed:
                print(f"Triton's log is kept: {triton.log_file}", file=out)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("stopped", file=out)
