"""Prometheus metrics: the autoscaling signals. Names are public API: keep them stable (README lists them)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

# 0.5 ms .. 60 s: fine enough for millisecond latencies, wide enough for overload.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

REQUEST_LATENCY = Histogram(
    "levit_request_duration_seconds",
    "Time from request arrival to response, by protocol, route and status.",
    ["protocol", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram("levit_queue_wait_seconds", "Time an image waited in the batch queue.", buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("levit_batch_size", "Images per model call.", buckets=BATCH_BUCKETS)
MODEL_FORWARD = Histogram(
    "levit_model_forward_seconds", "Wall time of one batched model call.", buckets=LATENCY_BUCKETS
)
PREPROCESS = Histogram(
    "levit_preprocess_seconds",
    "Decode + resize + crop time per image (normalisation runs per batch, in the model thread).",
    buckets=LATENCY_BUCKETS,
)
# Multiprocess modes (used when PROMETHEUS_MULTIPROC_DIR is set, i.e. under service.supervisor): the queue
# depth is global and set just before each scrape, so the most recent value is the answer; in-flight
# requests add up over the live front-ends; the model description is the same in every instance.
QUEUE_DEPTH = Gauge("levit_queue_depth", "Images waiting for the model.", multiprocess_mode="livemostrecent")
INFLIGHT = Gauge("levit_inflight_requests", "Requests being handled.", ["protocol"], multiprocess_mode="livesum")
IMAGES_CLASSIFIED = Counter("levit_images_classified", "Images that went through the model.")
REJECTIONS = Counter("levit_rejections", "Requests or images refused or dropped, by reason.", ["reason"])
MODEL_INFO = Gauge(
    "levit_model_info",
    "The model being served (value is always 1).",
    ["variant", "weights", "device", "dtype"],
    multiprocess_mode="max",
)

REJECTION_REASONS = ("queue_full", "deadline", "bad_input", "too_large", "cancelled", "draining", "model_error")
for _reason in REJECTION_REASONS:
    REJECTIONS.labels(_reason)
IMAGES_DROPPED = Counter(
    "levit_images_dropped", "Queued images dropped before compute (client gone or deadline passed).", ["reason"]
)
for _reason in ("cancelled", "deadline"):
    IMAGES_DROPPED.labels(_reason)


access_log = logging.getLogger("levit.access")


class Observation:
    """One request in levit_inflight_requests{protocol} and levit_request_duration_seconds{protocol, route,
    status}, and its access-log line: every protocol (HTTP, gRPC, v2 over either) observes through here.
    Started when made; `finish` once, with the status as the metrics label it ("200", "OK")."""

    def __init__(self, protocol: str, route: str, what: str) -> None:
        self.protocol, self.route, self.what = protocol, route, what  # `what`: the request in the log line
        self._inflight = INFLIGHT.labels(protocol)
        self._inflight.inc()
        self._start = time.perf_counter()

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self._start) * 1000

    def finish(self, status: str) -> None:
        elapsed = time.perf_counter() - self._start
        self._inflight.dec()
        REQUEST_LATENCY.labels(self.protocol, self.route, status).observe(elapsed)
        access_log.info("%s -> %s in %.1f ms", self.what, status, elapsed * 1000)


_BEFORE_READ: list[Callable[[], None]] = []


def before_read(refresh: Callable[[], None]) -> None:
    """Register a gauge refresher run before every read (the global queue depth, read from the ring)."""
    _BEFORE_READ.append(refresh)


def registry() -> CollectorRegistry:
    """The registry to read for the whole service: every reader (`/metrics`, summaries) goes through here.

    Under the supervisor that is the sum over every process, live or dead (counters never go back), read
    from prometheus-client's multiprocess files; otherwise this process's default registry.
    """
    for refresh in _BEFORE_READ:
        refresh()
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)
    return merged


def exposition() -> bytes:
    """`/metrics` body in the Prometheus text format."""
    return generate_latest(registry())
