"""Prometheus metrics of the service: requests, latency, bytes sent, tile cache hits."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Metrics:
    """One registry per app (no global state), exposed at /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "wsi_http_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "wsi_http_request_seconds",
            "Request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.bytes_sent = Counter(
            "wsi_http_response_bytes", "Response body bytes", ["route"], registry=self.registry
        )
        self._children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}
        self.cache_stats: Callable[[], tuple[int, int, int]] | None = None
        """(hits, misses, bytes held) of the tile cache, read at each scrape."""
        self.registry.register(_CacheCollector(self))

    def observe(self, request: web.Request, response: web.StreamResponse, start: float) -> None:
        """Count one answered request (called by the app's front middleware)."""
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        # Label look-ups cost as much as serving a cached tile: keep the children per route.
        key = (name, response.status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(name, str(response.status)),
                self.latency.labels(name),
                self.bytes_sent.labels(name),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - start)
        body = getattr(response, "body", None)
        if isinstance(body, bytes | bytearray):
            children[2].inc(len(body))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):  # type: ignore[no-untyped-def]
        stats = self.metrics.cache_stats() if self.metrics.cache_stats else (0, 0, 0)
        lookups = CounterMetricFamily(
            "wsi_tile_cache_lookups", "Tile cache lookups", labels=["result"]
        )
        lookups.add_metric(["hit"], stats[0])
        lookups.add_metric(["miss"], stats[1])
        yield lookups
        yield GaugeMetricFamily(
            "wsi_tile_cache_bytes", "Bytes held by the tile cache", value=stats[2]
        )
