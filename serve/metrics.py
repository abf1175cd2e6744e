"""Prometheus metrics of the server: request latency per endpoint, stage times, queue depth, errors."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
