"""The job bus (see `modelguard.bus.base`): pick an implementation by setting.

Embedded mode runs several services in one process on ONE `MemoryBus`: construct it once
(``MemoryBus(metrics)``) and hand the same instance to every service instead of calling
`make_bus` per service.
"""

from __future__ import annotations

from typing import Any

from modelguard.bus.base import JobBus, Message, RetryPolicy, Subscription, dead_letter_topic
from modelguard.bus.memory import MemoryBus
from modelguard.bus.metrics import BusMetrics
from modelguard.errors import InvalidInput

__all__ = [
    "BusMetrics",
    "JobBus",
    "MemoryBus",
    "Message",
    "RetryPolicy",
    "Subscription",
    "dead_letter_topic",
    "make_bus",
]


def make_bus(
    kind: str,
    *,
    bootstrap_servers: str = "",
    client_id: str = "modelguard",
    metrics: BusMetrics | None = None,
    **kafka_options: Any,
) -> JobBus:
    """A new bus: ``"memory"`` (in-process) or ``"kafka"`` (``bootstrap_servers`` needed;
    ``kafka_options`` go to `KafkaBus`, e.g. ``session_timeout_ms``)."""
    if kind == "memory":
        return MemoryBus(metrics)
    if kind == "kafka":
        from modelguard.bus.kafka import KafkaBus  # kafka-python only loads when used

        return KafkaBus(bootstrap_servers, client_id, metrics, **kafka_options)
    raise InvalidInput(f"unknown bus kind {kind!r}: use 'memory' or 'kafka'")
