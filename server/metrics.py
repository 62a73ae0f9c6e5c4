"""Prometheus metrics of the service: requests, latency, bytes sent, tile cache hits, and the
scheduled integrity check's last result, summed over the serving processes.

Requests are tallied in plain integers per (route, status) and turned into Prometheus families
only when `/metrics` is read: `prometheus_client`'s own counters and histogram cost 4.3 us a
request in one process (8.7 us in its multiprocess mode, which writes every increment to a
memory-mapped file), a tally under 1 us. With several processes (`server.processes`) each one
writes its tallies to a status file in the supervisor's private folder every second
(`snapshot`), and any process answers `/metrics` with its own live tallies plus the others' last
snapshots: counters and histograms are sums over the processes, `wsi_tile_cache_bytes` the sum
over the processes that are alive. A process that restarts takes its tallies over from its
predecessor's last snapshot (`restore`), so the sums never go back (a process killed outright
loses at most its last second of counts).

Where ingest runs (a job table is open), the ingest gauges (`IngestFigures`: jobs by state,
slides in quarantine, ingest loops down) are different: they describe what every process shares,
so the process that answers reads them afresh for each scrape (`server.replica.ingest_figures`)
and reports them as they are, never adding other processes' figures: they appear once, whatever
the number of processes.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from wsi.ingest.queue import JobState

if TYPE_CHECKING:
    from server.integrity import IntegrityStatus

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the latency histogram's buckets; one more for +Inf."""


OUTSIDE_FRONT = "(outside the front)"
"""The route label of the answers no route made (`Metrics.outside_front`)."""


@dataclass(frozen=True)
class IngestFigures:
    """What `/metrics` tells of ingest, read for one scrape (see the module's docstring)."""

    jobs: Mapping[JobState, int] | None
    """Jobs in the job table by state; None when the table could not be read."""
    quarantined: int | None
    """Slides in the quarantine folder; None when it could not be listed."""
    loops_down: int | None
    """Ingest loops down, as `/readyz` lists them (the ingest process, while its status is
    stale, counts as one); None when their status could not be read."""


class _Tally:
    """What one process answered for one (route, status): requests, body bytes, seconds, and
    the latency histogram (per bucket, not cumulative; the last one is +Inf)."""

    __slots__ = ("buckets", "nbytes", "requests", "seconds")

    def __init__(self) -> None:
        self.requests = 0
        self.nbytes = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)

    def to_json(self) -> list[Any]:
        return [self.requests, self.nbytes, self.seconds, list(self.buckets)]

    def add(self, doc: list[Any]) -> None:
        """Add a tally written by `to_json` (of this process's predecessor, or of another)."""
        requests, nbytes, seconds, buckets = doc
        self.requests += int(requests)
        self.nbytes += int(nbytes)
        self.seconds += float(seconds)
        if len(buckets) == len(self.buckets):
            for i, count in enumerate(buckets):
                self.buckets[i] += int(count)


class Metrics:
    """The metrics of one process (no global state); `render` exposes them, with the other
    processes' snapshots when there are several."""

    def __init__(self, process: int = 0) -> None:
        self.process = process
        """This process's index among the serving processes (label of the per-process count)."""
        self._tallies: dict[tuple[str, int], _Tally] = {}
        self._names: dict[int, str] = {}
        """id(resource) -> route name: a resource's `canonical` is looked up once."""
        self._resources: list[object] = []
        """Keeps the resources named in `_names` alive, so that no id is reused."""
        self._cache_base = (0, 0)
        """Tile cache hits and misses of this process's predecessors (see `restore`)."""
        self.cache_stats: Callable[[], tuple[int, int, int]] | None = None
        """(hits, misses, bytes held) of this process's tile cache, read at each scrape."""
        self.integrity: Callable[[], IntegrityStatus] | None = None
        """The integrity check's status, read at each scrape (set where it can be read)."""

    def observe(
        self, resource: AbstractResource | None, response: web.StreamResponse, start: float
    ) -> None:
        """Count one answered request of `resource` (None: no route matched), called by the
        front (`server.front`)."""
        body = getattr(response, "body", None)
        nbytes = len(body) if isinstance(body, bytes | bytearray) else 0
        self.count(resource, response.status, nbytes, start)

    def count(
        self, resource: AbstractResource | None, status: int, nbytes: int, start: float
    ) -> None:
        """Count one answer of `status` with `nbytes` of body to a request of `resource` begun
        at `start` (`time.perf_counter`): the front's (`observe`) and the express lane's."""
        elapsed = time.perf_counter() - start
        name = self._names.get(id(resource))
        if name is None:
            name = resource.canonical if resource is not None else "unmatched"
            self._names[id(resource)] = name
            self._resources.append(resource)
        key = (name, status)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally()
        tally.requests += 1
        tally.seconds += elapsed
        tally.buckets[bisect.bisect_left(BUCKETS, elapsed)] += 1
        tally.nbytes += nbytes

    def outside_front(self, response: web.StreamResponse) -> None:
        """Count an answer the connection made itself, before any route (a request that could
        not be parsed: 400) or after the front failed (500), as route `OUTSIDE_FRONT`: without
        it, a client or a scanner sending what is not HTTP was invisible in the metrics."""
        key = (OUTSIDE_FRONT, response.status)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally()
        tally.requests += 1
        tally.buckets[0] += 1  # answered at once: no handler ran
        body = getattr(response, "body", None)
        if isinstance(body, bytes | bytearray):
            tally.nbytes += len(body)

    def _cache(self) -> tuple[int, int, int]:
        hits, misses, held = self.cache_stats() if self.cache_stats else (0, 0, 0)
        return hits + self._cache_base[0], misses + self._cache_base[1], held

    def snapshot(self) -> dict[str, Any]:
        """This process's counts as JSON values, for the other processes (and its successor)."""
        return {
            "process": self.process,
            "requests": [[r, s, *t.to_json()] for (r, s), t in self._tallies.items()],
            "cache": list(self._cache()),
        }

    def restore(self, doc: Mapping[str, Any]) -> None:
        """Continue from a predecessor's last snapshot (a process restarted in its place), so
        that counters summed over the processes never decrease."""
        for route, status, *tally in doc.get("requests", ()):
            self._tallies.setdefault((str(route), int(status)), _Tally()).add(tally)
        hits, misses, _ = doc.get("cache", (0, 0, 0))
        self._cache_base = (int(hits), int(misses))

    def render(
        self, others: Iterable[Mapping[str, Any]] = (), ingest: IngestFigures | None = None
    ) -> bytes:
        """The text exposition: this process's live counts plus `others` (snapshots of the
        other processes; those in `live` also count for gauges), and the `ingest` figures as
        they are (None: this service runs no ingest)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(self, list(others), ingest))
        return generate_latest(registry)


class _Merged(Collector):
    """Every family, summed over this process and the snapshots of the others. A snapshot
    counts for gauges when it says `"live": true` (its process wrote it recently)."""

    def __init__(
        self,
        metrics: Metrics,
        others: list[Mapping[str, Any]],
        ingest: IngestFigures | None = None,
    ) -> None:
        self.metrics = metrics
        self.others = others
        self.ingest = ingest

    def collect(self) -> Iterable[Metric]:
        own = self.metrics.snapshot()
        docs = [own, *self.others]
        tallies: dict[tuple[str, int], _Tally] = {}
        per_process: dict[int, int] = {}
        for doc in docs:
            count = 0
            for route, status, *tally in doc.get("requests", ()):
                tallies.setdefault((str(route), int(status)), _Tally()).add(tally)
                count += int(tally[0])
            per_process[int(doc.get("process", 0))] = count
        yield from _request_families(tallies)
        by_process = CounterMetricFamily(
            "wsi_process_http_requests",
            "HTTP requests answered by each serving process (0 .. processes - 1)",
            labels=["process"],
        )
        for process in sorted(per_process):
            by_process.add_metric([str(process)], per_process[process])
        yield by_process
        live = [own, *(d for d in self.others if d.get("live"))]
        hits = sum(int(d.get("cache", (0, 0, 0))[0]) for d in docs)
        misses = sum(int(d.get("cache", (0, 0, 0))[1]) for d in docs)
        lookups = CounterMetricFamily(
            "wsi_tile_cache_lookups", "Tile cache lookups", labels=["result"]
        )
        lookups.add_metric(["hit"], hits)
        lookups.add_metric(["miss"], misses)
        yield lookups
        yield GaugeMetricFamily(
            "wsi_tile_cache_bytes",
            "Bytes held by the tile caches of the serving processes (each has its own)",
            value=sum(int(d.get("cache", (0, 0, 0))[2]) for d in live),
        )
        yield GaugeMetricFamily(
            "wsi_serving_processes", "Serving processes that answered lately", value=len(live)
        )
        if self.metrics.integrity is not None:
            yield from _integrity_families(self.metrics.integrity())
        if self.ingest is not None:
            yield from _ingest_families(self.ingest)


def _request_families(tallies: Mapping[tuple[str, int], _Tally]) -> Iterable[Metric]:
    requests = CounterMetricFamily("wsi_http_requests", "HTTP requests", labels=["route", "status"])
    latency = HistogramMetricFamily("wsi_http_request_seconds", "Request latency", labels=["route"])
    sent = CounterMetricFamily("wsi_http_response_bytes", "Response body bytes", labels=["route"])
    routes: dict[str, _Tally] = {}
    for (route, status), tally in sorted(tallies.items()):
        requests.add_metric([route, str(status)], tally.requests)
        routes.setdefault(route, _Tally()).add(tally.to_json())
    for route, tally in routes.items():
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), tally.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        latency.add_metric([route], buckets, tally.seconds)
        sent.add_metric([route], tally.nbytes)
    return requests, latency, sent


def _integrity_families(status: IntegrityStatus) -> Iterable[Metric]:
    """`wsi_integrity_*`: where the check runs, and in the processes that read its status."""
    if status.last_run is not None:
        yield GaugeMetricFamily(
            "wsi_integrity_last_run_timestamp_seconds",
            "When the last complete integrity check ended (Unix time)",
            value=status.last_run,
        )
    yield GaugeMetricFamily(
        "wsi_integrity_running", "1 while an integrity check runs", value=int(status.running)
    )
    yield GaugeMetricFamily(
        "wsi_integrity_slides_checked",
        "Slides the last complete integrity check read",
        value=status.slides_checked,
    )
    yield GaugeMetricFamily(
        "wsi_integrity_damaged_slides",
        "Slides with a damaged object, as last checked",
        value=status.damaged_slides,
    )
    yield GaugeMetricFamily(
        "wsi_integrity_damaged_objects",
        "Damaged objects, as last checked",
        value=len(status.damaged),
    )
    yield GaugeMetricFamily(
        "wsi_integrity_last_run_read_bytes",
        "Bytes the last complete integrity check read",
        value=status.bytes_read,
    )
    yield CounterMetricFamily(
        "wsi_integrity_read_bytes",
        "Bytes read by integrity checks since the process that runs them started",
        value=status.total_bytes_read,
    )


def _ingest_families(figures: IngestFigures) -> Iterable[Metric]:
    """`wsi_jobs`, `wsi_job_table_up`, `wsi_quarantined_slides`, `wsi_ingest_loops_down`: a
    figure that could not be read is left out (`wsi_job_table_up` 0 says which), so that an
    alert on it does not fire on a made-up 0, and the rest is still answered."""
    yield GaugeMetricFamily(
        "wsi_job_table_up",
        "1 when the job table answered this scrape, else 0 (and wsi_jobs is left out)",
        value=int(figures.jobs is not None),
    )
    if figures.jobs is not None:
        jobs = GaugeMetricFamily(
            "wsi_jobs", "Jobs in the job table (every process's), by state", labels=["state"]
        )
        for state in JobState:
            jobs.add_metric([state.value], figures.jobs.get(state, 0))
        yield jobs
    if figures.quarantined is not None:
        yield GaugeMetricFamily(
            "wsi_quarantined_slides",
            "Slides in the quarantine folder (failed for good, waiting for someone)",
            value=figures.quarantined,
        )
    if figures.loops_down is not None:
        yield GaugeMetricFamily(
            "wsi_ingest_loops_down",
            "Ingest loops down (dead, waiting for their restart), as /readyz lists them",
            value=figures.loops_down,
        )
