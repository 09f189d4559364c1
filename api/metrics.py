"""Prometheus metrics of the API process (collector, publisher, HTTP requests), served at ``/metrics``.

Metrics live in prometheus-client's default registry, so whatever else runs in the process
(sinks, stream services) shows up on the same ``/metrics`` page.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

EVENTS_RECEIVED = Counter(
    "tidemark_collector_events_received_total",
    "Messages the collector received (a batch counts each item).",
    ["endpoint"],
)
EVENTS_ACCEPTED = Counter(
    "tidemark_collector_events_accepted_total",
    "Events the collector published to events.raw and Kafka acknowledged.",
    ["endpoint"],
)
EVENTS_REJECTED = Counter(
    "tidemark_collector_events_rejected_total",
    "Messages the collector refused (with a 4xx answer or a dead letter), by reason.",
    ["reason"],
)
PRODUCE_LATENCY = Histogram(
    "tidemark_publish_latency_seconds",
    "From handing a request's records to the Kafka producer until the broker acknowledged all of them.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0),
)
PRODUCE_FAILURES = Counter(
    "tidemark_publish_failures_total",
    "Requests whose records Kafka did not acknowledge (answered 503).",
    ["reason"],
)
REQUEST_LATENCY = Histogram(
    "tidemark_http_request_duration_seconds",
    "HTTP request latency of the API, by route template, method and status.",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


class RequestLatencyMiddleware:
    """Pure ASGI middleware timing every HTTP request (cheaper than Starlette's BaseHTTPMiddleware).

    The route label is the matched route's template (``/v1/track``), never the raw path, so label
    cardinality stays bounded; unmatched paths are labelled ``<unmatched>``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            REQUEST_LATENCY.labels(scope.get("method", ""), template, str(status)).observe(
                time.perf_counter() - started
            )
