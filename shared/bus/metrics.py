"""Job-bus metrics on an injected registry; both bus implementations update them.

Names follow ``modelguard_<service>_bus_<thing>_{total,seconds}``, labelled by topic only
(topics are a small fixed set, see `modelguard.topics`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

#: Handlers range from millisecond bookkeeping to minutes-long model audits.
HANDLER_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class BusMetrics:
    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        prefix = "modelguard_" + service.replace("-", "_") + "_bus"
        self.prefix = prefix
        self.consumed = Counter(
            f"{prefix}_consumed_total",
            "Records taken from a topic for processing (redeliveries count again).",
            ["topic"],
            registry=registry,
        )
        self.failed = Counter(
            f"{prefix}_failed_total",
            "Handler attempts that raised (each retry counts).",
            ["topic"],
            registry=registry,
        )
        self.transient = Counter(
            f"{prefix}_transient_retries_total",
            "Handler attempts that met a dependency outage (broker, store) and were retried "
            "without using up an attempt.",
            ["topic"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            f"{prefix}_dead_lettered_total",
            "Records moved to the topic's dead-letter topic, by original topic.",
            ["topic"],
            registry=registry,
        )
        self.published = Counter(
            f"{prefix}_published_total",
            "Records acknowledged by the bus, dead letters included.",
            ["topic"],
            registry=registry,
        )
        self.assignments = Counter(
            f"{prefix}_group_assignments_total",
            "Completed consumer-group (re)joins with their partitions assigned, by group: a "
            "group that keeps rebalancing without this moving consumes nothing.",
            ["group"],
            registry=registry,
        )
        self.handler_seconds = Histogram(
            f"{prefix}_handler_seconds",
            "Wall time of one handler attempt.",
            ["topic"],
            buckets=HANDLER_BUCKETS,
            registry=registry,
        )
