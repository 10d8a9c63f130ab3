"""``serve``'s ``/metrics``: Prometheus metrics of one server (requests by endpoint and
status, latency, in-flight requests; batches and queue depth by model) and the ASGI
middleware that measures every request."""

from __future__ import annotations

import time
from typing import Callable

from bertexport.shipping.batching import BatchStats


class Metrics:
    """Prometheus metrics of one server, in a registry of its own. Request metrics are
    labelled by endpoint (and status code), batch and queue metrics by model."""

    def __init__(self, queue_depths: Callable[[], dict[str, int]]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import GaugeMetricFamily

        self.registry = r = CollectorRegistry()
        self.requests = Counter("bertexport_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.errors = Counter("bertexport_request_errors", "HTTP requests answered with an error (4xx/5xx)",
                              ["endpoint", "code"], registry=r)
        self.latency = Histogram("bertexport_request_duration_seconds", "Time from request to answer", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.in_flight = Gauge("bertexport_requests_in_flight", "Inference requests being answered", registry=r)

        class QueueDepth:
            def collect(self):
                g = GaugeMetricFamily("bertexport_queue_depth", "Requests waiting for a model's inference thread",
                                      labels=["model"])
                for name, depth in queue_depths().items():
                    g.add_metric([name], depth)
                yield g

        r.register(QueueDepth())
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        self.batch_requests = Histogram("bertexport_batch_requests", "Requests coalesced into one inference batch",
                                        ["model"], buckets=sizes, registry=r)
        self.batch_texts = Histogram("bertexport_batch_texts", "Texts in one inference batch", ["model"], buckets=sizes,
                                     registry=r)
        self.batch_tokens = Histogram("bertexport_batch_tokens", "Tokens in one inference batch", ["model"],
                                      buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536), registry=r)
        self.batch_seconds = Histogram("bertexport_batch_duration_seconds", "Inference time of one batch", ["model"],
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)

    def on_batch(self, model: str) -> Callable[[BatchStats], None]:
        def observe(b: BatchStats) -> None:
            self.batch_requests.labels(model).observe(b.requests)
            self.batch_texts.labels(model).observe(b.texts)
            self.batch_tokens.labels(model).observe(b.tokens)
            self.batch_seconds.labels(model).observe(b.seconds)
        return observe

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MeasuredApp:
    """ASGI middleware: counts, times and labels every request by endpoint (unknown paths
    are one label, so random URLs cannot grow the metrics)."""

    def __init__(self, app, metrics: Metrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        posted = scope["method"] == "POST"
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        if posted:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            if posted:
                self.metrics.in_flight.dec()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(endpoint, str(status)).inc()
