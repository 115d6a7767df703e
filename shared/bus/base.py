"""The job bus: topics, consumer groups, at-least-once delivery with commit after the
handler finished, bounded retries with backoff, and a dead-letter topic.

Two implementations share these semantics and one test suite:
`modelguard.bus.memory.MemoryBus` (embedded mode, unit tests) and
`modelguard.bus.kafka.KafkaBus` (kafka-python against a real broker).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

#: Record headers every job message carries.
HEADER_JOB_ID = "job-id"
HEADER_JOB_TYPE = "job-type"
HEADER_ATTEMPT = "attempt"
#: Added to dead-lettered records.
HEADER_ERROR = "error"
HEADER_ORIGINAL_TOPIC = "original-topic"

DEAD_LETTER_SUFFIX = ".dlq"


def dead_letter_topic(topic: str) -> str:
    return topic + DEAD_LETTER_SUFFIX


@dataclass(frozen=True)
class Message:
    """One record as a handler sees it."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    partition: int = 0
    offset: int = 0
    #: When the record was published (seconds since the epoch; 0 if unknown). The same
    #: for every redelivery, so handlers can derive state from it deterministically.
    timestamp: float = 0.0

    @property
    def job_id(self) -> str:
        return self.headers.get(HEADER_JOB_ID, "")

    @property
    def attempt(self) -> int:
        return int(self.headers.get(HEADER_ATTEMPT, "1"))


#: A handler processes one message. Returning normally means done (the offset is
#: committed). Raising an error marked ``permanent`` (see modelguard.errors) dead-letters the
#: message at once; one marked ``transient`` (a dependency outage) is retried with backoff
#: without using up an attempt, until it succeeds or the subscription stops; any other
#: exception is retried with backoff up to ``max_attempts``, then dead-lettered with the
#: error text in the ``error`` header.
Handler = Callable[[Message], None]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0


class Subscription(Protocol):
    """A running consumer; `stop()` finishes the message in hand, commits, and leaves."""

    def stop(self, timeout: float = 10.0) -> None: ...

    @property
    def running(self) -> bool: ...


class JobBus(Protocol):
    def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish durably: returns once the broker acknowledged the record."""
        ...

    def subscribe(
        self,
        topics: list[str],
        group: str,
        handler: Handler,
        *,
        retry: RetryPolicy | None = None,
        stop_event: threading.Event | None = None,
    ) -> Subscription:
        """Start a consumer thread in ``group``: each record reaches one member of the
        group; it is committed only after ``handler`` returned (or it was dead-lettered)."""
        ...

    def ensure_topics(self, topics: list[str], partitions: int = 1) -> None: ...

    def close(self) -> None: ...
