"""The page at `/` (try the model in a browser, watch the server) and `GET /v1/stats`, the JSON it polls.

The page is three plain files in `service/rest/static/` (HTML, CSS, JavaScript; no CDN, no build step), read
from the package once and served from memory. It classifies through the public `POST /classify`, so it runs
behind exactly the same limits and answers with the API's own error messages; the model card is
`GET /v1/model`.

`GET /v1/stats` is a cumulative snapshot of the server's own Prometheus registry (`metrics.registry()`,
the one `/metrics` exposes): counters and histogram buckets as they stand, plus the queue-depth gauge. The
browser keeps the snapshots it polled over the last minute and derives every "last minute" figure from the
difference between the newest and the oldest (throughput, latency percentiles by Prometheus'
`histogram_quantile` interpolation, mean batch size). Why differences in the browser rather than a ring of
snapshots kept by the server:

- the endpoint stays stateless: no sampling task, nothing to start, stop or size, and any number of pages
  can watch without the server doing more than one registry read per poll each;
- it stays right when the server runs as several processes: a server-side ring would live in whichever
  worker answered (each with its own history, started at a different time), while a snapshot of the
  (multiprocess-aware) registry is the same whichever worker reads it;
- there is exactly one metrics system: these are the numbers Prometheus would compute with `rate()` and
  `histogram_quantile()` from `/metrics`, over the window the page has been open (up to a minute).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample

from service import metrics

ASSETS = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}
ASSET_PREFIX = "/static/page/"
ROUTES = frozenset({"/", "/v1/stats", *(ASSET_PREFIX + name for name in ASSETS)})
# Everything the page loads comes from this server; photos are shown from blob: URLs of the chosen files.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

# Classification requests in levit_request_duration_seconds, whatever the protocol: the `route` label is the
# HTTP path (or /v2 template) or the gRPC method. Answered ones only: refusals are fast and would flatter
# the percentiles (they are counted in levit_rejections_total).
_CLASSIFY_ROUTES = ("/classify", "/infer", "/Classify", "/ClassifyStream", "/ModelInfer", "/ModelStreamInfer")
_ANSWERED = frozenset({"200", "OK"})


def _samples(registry: CollectorRegistry) -> dict[str, list[Sample]]:
    """Every sample of the registry by sample name (`levit_images_classified_total`, `..._bucket`): the
    sample names are the exposition's, whatever a collector calls the family (multiprocess ones differ)."""
    by_name: dict[str, list[Sample]] = defaultdict(list)
    for family in registry.collect():
        for sample in family.samples:
            by_name[sample.name].append(sample)
    return by_name


def _total(samples: list[Sample]) -> float:
    """Sum over every label set (and, under multiprocess, every process)."""
    return sum(s.value for s in samples)


def _latency_buckets(samples: list[Sample]) -> list[list[float | None]]:
    """Cumulative [upper bound, count] pairs of answered classification requests, summed over labels;
    the +Inf bound is written as null (JSON has no infinity)."""
    counts: dict[float, float] = {}
    for s in samples:
        if s.labels.get("status") in _ANSWERED and s.labels.get("route", "").endswith(_CLASSIFY_ROUTES):
            bound = float(s.labels["le"])
            counts[bound] = counts.get(bound, 0.0) + s.value
    if not counts:  # nothing answered yet: the configured bounds with zero counts keep the shape stable
        counts = dict.fromkeys((*metrics.LATENCY_BUCKETS, math.inf), 0.0)
    return [[None if math.isinf(b) else b, counts[b]] for b in sorted(counts)]


def snapshot(registry: CollectorRegistry) -> dict[str, Any]:
    """Cumulative figures as they stand now: the page turns successive snapshots into rates."""
    samples = _samples(registry)
    return {
        "time": time.time(),
        "images_classified": _total(samples["levit_images_classified_total"]),
        "latency_buckets": _latency_buckets(samples["levit_request_duration_seconds_bucket"]),
        "batches": {
            "count": _total(samples["levit_batch_size_count"]),
            "sum": _total(samples["levit_batch_size_sum"]),
        },
        "queue_depth": _total(samples["levit_queue_depth"]),
        "rejections": _total(samples["levit_rejections_total"]),
    }


def _asset(name: str) -> bytes:
    return resources.files("service.rest").joinpath("static").joinpath(name).read_bytes()


def create_router() -> APIRouter:
    router = APIRouter()
    index = _asset("index.html")
    assets = {name: _asset(name) for name in ASSETS}

    @router.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index, headers={**_HEADERS, "Content-Security-Policy": _CSP})

    def asset_route(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
        async def serve() -> Response:
            return Response(body, media_type=media_type, headers=_HEADERS)

        return serve

    for name, media_type in ASSETS.items():
        router.add_api_route(
            ASSET_PREFIX + name, asset_route(assets[name], media_type), methods=["GET"], include_in_schema=False
        )

    @router.get("/v1/stats")
    async def stats() -> JSONResponse:
        """Cumulative counters from the server's Prometheus registry, for the page's live view.

        `images_classified`, `rejections`: totals since start. `latency_buckets`: cumulative
        `[upper bound in s (null = +Inf), count]` of answered classification requests, all protocols.
        `batches`: count and sum of images per model call. `queue_depth`: images waiting now. `time`: the
        server's clock, in Unix seconds. Rates over a window are differences of two snapshots.
        """
        return JSONResponse(snapshot(metrics.registry()), headers={"Cache-Control": "no-store"})

    return router
