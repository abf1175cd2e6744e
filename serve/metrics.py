"""Prometheus metrics of the server: request latency per endpoint, stage times, queue depth, errors."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REGISTRY = CollectorRegistry()
CONTENT_TYPE = CONTENT_TYPE_LATEST
REQUESTS = Histogram(
    "mpsclip_request_seconds", "request latency", ["endpoint", "status"], registry=REGISTRY
)
STAGES = Histogram("mpsclip_stage_seconds", "time per stage (encode, score, render)", ["stage"], registry=REGISTRY)
BATCH = Histogram(
    "mpsclip_batch_size", "queries per encoder batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=REGISTRY
)
QUEUE = Gauge("mpsclip_queue_depth", "queries waiting for the encoder", registry=REGISTRY)
ERRORS = Counter("mpsclip_errors_total", "errors by kind", ["kind"], registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)
QUICKLOOK_RENDERS = Counter(
    "mpsclip_quicklook_renders_total", "quicklooks rendered from a GeoTIFF (not served from memory)", registry=REGISTRY
)


class TimedMiddleware:
    """ASGI middleware observing each answered request's latency under its route and status; a request whose
    client went away before an answer started is not observed (there is no status to file it under)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status: list[int] = []

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            if status:
                endpoint = getattr(scope.get("route"), "path", "unmatched")
                REQUESTS.labels(endpoint, str(status[0])).observe(time.perf_counter() - start)
