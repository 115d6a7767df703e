"""Prometheus metrics on an injected registry (never the global one) and the /metrics
HTTP endpoint. The gRPC interceptor that feeds them is in `modelguard.interceptors`."""

from __future__ import annotations

import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


def metric_prefix(service: str) -> str:
    return "modelguard_" + service.replace("-", "_")


#: Whether counters and histograms export ``*_created`` (prometheus_client's own switch).
_EXPORT_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true",
    "1",
    "t",
)


class _LocalFamily:
    """A labelled metric family whose children are plain numbers updated under one lock
    and read by the registry at scrape time (a collector): the serving path pays one
    uncontended lock and an addition, where prometheus_client's `Counter` and `Histogram`
    add argument checks, per-value locks and a Python loop over the buckets. Scrapes see
    exactly the values recorded so far (nothing is buffered). The families export what
    `Counter` and `Histogram` export, under the same names."""

    kind = ""
    #: a suffix the given name may carry that the family's name drops (``_total``)
    name_suffix = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name.removesuffix(self.name_suffix) if self.name_suffix else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._child()
        if registry is not None:
            registry.register(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        """The child of these label values (bind it once: the look-up costs more than
        the update)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}; got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, self._child())
        return child

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, self.kind)]

    def collect(self) -> list[Metric]:
        metric = Metric(self.name, self.documentation, self.kind)
        for key, child in list(self._children.items()):
            child.samples(metric, dict(zip(self.labelnames, key, strict=True)))
        return [metric]


class _CounterChild:
    __slots__ = ("_lock", "_name", "created", "value")

    def __init__(self, name: str) -> None:
        self._lock = threading.Lock()
        self._name = name
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        with self._lock:
            self.value += amount

    def samples(self, metric: Metric, labels: dict[str, str]) -> None:
        metric.add_sample(self._name + "_total", labels, self.value)
        if _EXPORT_CREATED:
            metric.add_sample(self._name + "_created", labels, self.created)


class LocalCounter(_LocalFamily):
    """A Prometheus counter, as `prometheus_client.Counter` (``name`` without ``_total``
    or with it), for the serving path: see `_LocalFamily`."""

    kind = "counter"
    name_suffix = "_total"

    def _child(self) -> _CounterChild:
        return _CounterChild(self.name)

    def labels(self, *values: str) -> _CounterChild:
        child: _CounterChild = super().labels(*values)
        return child

    def inc(self, amount: float = 1.0) -> None:
        """Increment the unlabelled counter."""
        self._children[()].inc(amount)


class _HistogramChild:
    __slots__ = ("_bounds", "_counts", "_lock", "_name", "created", "total")

    def __init__(self, name: str, bounds: tuple[float, ...]) -> None:
        self._lock = threading.Lock()
        self._name = name
        self._bounds = bounds  # sorted, ending with +inf
        self._counts = [0] * len(bounds)
        self.total = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # the first bucket whose upper bound is >= amount ("le"), as Histogram counts it
        index = bisect_left(self._bounds, amount)
        with self._lock:
            if index < len(self._counts):  # (NaN: only the sum, as Histogram does)
                self._counts[index] += 1
            self.total += amount

    def samples(self, metric: Metric, labels: dict[str, str]) -> None:
        with self._lock:
            counts, total = list(self._counts), self.total
        cumulative = 0
        for bound, count in zip(self._bounds, counts, strict=True):
            cumulative += count
            bucket = {**labels, "le": floatToGoString(bound)}
            metric.add_sample(self._name + "_bucket", bucket, cumulative)
        metric.add_sample(self._name + "_count", labels, cumulative)
        metric.add_sample(self._name + "_sum", labels, total)
        if _EXPORT_CREATED:
            metric.add_sample(self._name + "_created", labels, self.created)


class LocalHistogram(_LocalFamily):
    """A Prometheus histogram, as `prometheus_client.Histogram`, for the serving path:
    see `_LocalFamily`."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _HistogramChild:
        return _HistogramChild(self.name, self.bounds)

    def labels(self, *values: str) -> _HistogramChild:
        child: _HistogramChild = super().labels(*values)
        return child

    def observe(self, amount: float) -> None:
        """Observe into the unlabelled histogram."""
        self._children[()].observe(amount)


class ServiceMetrics:
    """The metrics every service exports; services add their own on the same registry."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.service = service
        prefix = metric_prefix(service)
        self.prefix = prefix
        # counted on every call: local families (see `_LocalFamily`)
        self.grpc_requests = LocalCounter(
            f"{prefix}_grpc_requests_total",
            "gRPC requests by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.grpc_seconds = LocalHistogram(
            f"{prefix}_grpc_request_seconds",
            "gRPC request latency.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.jobs = Counter(
            f"{prefix}_jobs_total",
            "Jobs handled, by outcome (succeeded, failed, skipped, duplicate, retried, waiting).",
            ["outcome"],
            registry=registry,
        )
        self.job_seconds = Histogram(
            f"{prefix}_job_seconds",
            "Wall time of a job in this service.",
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{prefix}_jobs_in_flight", "Jobs being processed now.", registry=registry
        )
        self.store_errors = Counter(
            f"{prefix}_store_errors_total",
            "Artifact store operations that failed (unreachable, integrity).",
            ["kind"],
            registry=registry,
        )

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(f"{self.prefix}_{name}", doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"{self.prefix}_{name}", doc, list(labels), registry=self.registry)

    def histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
    ) -> Histogram:
        return Histogram(
            f"{self.prefix}_{name}", doc, list(labels), buckets=buckets, registry=self.registry
        )

    def local_counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> LocalCounter:
        """A counter updated on a serving path (see `_LocalFamily`)."""
        return LocalCounter(f"{self.prefix}_{name}", doc, labels, registry=self.registry)

    def local_histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
    ) -> LocalHistogram:
        """A histogram observed on a serving path (see `_LocalFamily`)."""
        return LocalHistogram(
            f"{self.prefix}_{name}", doc, labels, registry=self.registry, buckets=buckets
        )

    def job_count(self, outcome: str) -> int:
        value = self.registry.get_sample_value(f"{self.prefix}_jobs_total", {"outcome": outcome})
        return int(value or 0)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[Any, int]:
    """Start the /metrics endpoint; returns (server, bound port). ``port`` 0 picks one."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_port)
