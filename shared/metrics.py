"""Prometheus metrics on an injected registry (never the global one) and the /metrics
HTTP endpoint. The gRPC interceptor that feeds them is in `shared.interceptors`."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


def metric_prefix(service: str) -> str:
    return "modelguard_" + service.replace("-", "_")


class ServiceMetrics:
    """The metrics every service exports; services add their own on the same registry."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.service = service
        prefix = metric_prefix(service)
        self.prefix = prefix
        self.grpc_requests = Counter(
            f"{prefix}_grpc_requests_total",
            "gRPC requests by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.grpc_seconds = Histogram(
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

    def job_count(self, outcome: str) -> int:
        value = self.registry.get_sample_value(f"{self.prefix}_jobs_total", {"outcome": outcome})
        return int(value or 0)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[Any, int]:
    """Start the /metrics endpoint; returns (server, bound port). ``port`` 0 picks one."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_port)
