"""`MemoryBus`: the job bus inside one process (embedded mode, unit tests).

It keeps Kafka's semantics where the services can observe them: every topic is an
append-only log; each consumer group has its own committed offset per topic; a record
goes to one member of a group, and every group sees every record; a record is committed
only after its handler returned (or it was dead-lettered); a member that stops while a
record is in hand gives it back to the group. Records with the same key are handed out
one at a time in log order (Kafka's per-partition order); keyless records go to any
free member, like records spread over many partitions.

`deliver` (attempts, backoff, dead-letter decision) is shared with `KafkaBus` so both
buses retry and dead-letter identically.
"""

from __future__ import annotations

import enum
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from modelguard.bus.base import (
    HEADER_ATTEMPT,
    HEADER_ERROR,
    HEADER_ORIGINAL_TOPIC,
    Handler,
    Message,
    RetryPolicy,
    dead_letter_topic,
)
from modelguard.bus.metrics import BusMetrics
from modelguard.errors import InvalidInput, ModelGuardError, Unavailable, is_transient
from modelguard.tracing import consuming, inject_headers

log = logging.getLogger(__name__)

#: Longest error text carried in a dead letter's ``error`` header.
MAX_ERROR_CHARS = 2000
#: How often a waiting subscription looks at a caller-supplied stop event (an Event
#: cannot wake a Condition, so this one case checks periodically).
EXTERNAL_STOP_CHECK_S = 0.1
#: Used when a caller's stop event (not `stop()`) ends a subscription.
DEFAULT_STOP_GRACE_S = 10.0


# --------------------------------------------------------------------------------------
# Delivery: shared by both bus implementations
# --------------------------------------------------------------------------------------


class Outcome(enum.Enum):
    DONE = "done"  #: the handler returned: commit
    DEAD_LETTER = "dead-letter"  #: permanent error or attempts exhausted: dead-letter, commit
    ABANDONED = "abandoned"  #: stopped between attempts: leave uncommitted for redelivery


@dataclass(frozen=True)
class Delivery:
    outcome: Outcome
    attempts: int
    error: str = ""


def deliver(
    message: Message,
    handler: Handler,
    retry: RetryPolicy,
    wait_for_stop: Callable[[float], bool],
    metrics: BusMetrics | None = None,
) -> Delivery:
    """Run ``handler`` on ``message`` with retries and exponential backoff.

    Retries see the message with its ``attempt`` header set to 2, 3, ...; the first
    attempt sees the record's own headers, so `Message.attempt` is 1 for a fresh job and,
    on a dead-letter topic, still tells how many attempts the original record had.
    A transient error (a dependency outage, `modelguard.errors.is_transient`) does not use up
    an attempt: the same attempt is retried with its own backoff for as long as the outage
    lasts, so a job waits for the broker or the store instead of failing because of them.
    ``wait_for_stop(seconds)`` sleeps between attempts and returns True when the
    subscription is stopping, which abandons the message instead of retrying it.
    """
    backoff = retry.initial_backoff_s
    transient_backoff = retry.initial_backoff_s
    attempts = max(1, retry.max_attempts)
    attempt = 1
    while True:
        current = message
        if attempt > 1:
            current = replace(message, headers={**message.headers, HEADER_ATTEMPT: str(attempt)})
        started = time.perf_counter()
        try:
            try:
                with consuming(current):  # continues the publisher's trace (if tracing)
                    handler(current)
            finally:  # the handler's time only, not the backoff below
                if metrics is not None:
                    metrics.handler_seconds.labels(message.topic).observe(
                        time.perf_counter() - started
                    )
        except Exception as err:
            text = f"{type(err).__name__}: {err}"[:MAX_ERROR_CHARS]
            if is_transient(err):
                if metrics is not None:
                    metrics.transient.labels(message.topic).inc()
                log.warning(
                    "attempt %d on %s@%d waits for a dependency (%s); retrying in %.2fs",
                    attempt,
                    message.topic,
                    message.offset,
                    text,
                    transient_backoff,
                )
                if wait_for_stop(transient_backoff):
                    return Delivery(Outcome.ABANDONED, attempt, text)
                transient_backoff = min(transient_backoff * 2, retry.max_backoff_s)
                continue
            transient_backoff = retry.initial_backoff_s
            if metrics is not None:
                metrics.failed.labels(message.topic).inc()
            permanent = isinstance(err, ModelGuardError) and err.permanent
            if permanent or attempt >= attempts:
                log.warning(
                    "dead-lettering %s@%d (job %r) after attempt %d: %s",
                    message.topic,
                    message.offset,
                    message.job_id,
                    attempt,
                    text,
                    exc_info=not permanent,
                )
                return Delivery(Outcome.DEAD_LETTER, attempt, text)
            log.info(
                "attempt %d/%d on %s@%d failed (%s); retrying in %.2fs",
                attempt,
                attempts,
                message.topic,
                message.offset,
                text,
                backoff,
            )
            if wait_for_stop(backoff):
                return Delivery(Outcome.ABANDONED, attempt, text)
            backoff = min(backoff * 2, retry.max_backoff_s)
            attempt += 1
        else:
            return Delivery(Outcome.DONE, attempt)


def dead_letter_headers(message: Message, delivery: Delivery) -> dict[str, str]:
    """The original headers plus why, where from and after how many attempts."""
    return {
        **message.headers,
        HEADER_ERROR: delivery.error,
        HEADER_ORIGINAL_TOPIC: message.topic,
        HEADER_ATTEMPT: str(delivery.attempts),
    }


_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")


def check_topic(topic: str) -> None:
    """Kafka's topic-name rule, applied by both buses so embedded mode fails alike."""
    if not _TOPIC_RE.fullmatch(topic):
        raise InvalidInput(
            f"invalid topic name {topic!r}: use 1-249 characters from A-Z a-z 0-9 . _ -"
        )


def check_subscription(topics: list[str], group: str) -> None:
    """What both buses require of a subscription: topics with valid names and a group."""
    if not topics:
        raise InvalidInput("subscribe needs at least one topic")
    for topic in topics:
        check_topic(topic)
    if not group:
        raise InvalidInput("subscribe needs a consumer group name")


# --------------------------------------------------------------------------------------
# MemoryBus
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    offset: int
    value: bytes
    key: bytes | None
    headers: Mapping[str, str]
    timestamp: float


class _Claim:
    """A record handed to one subscription; invalid once given back to the group."""

    def __init__(self, topic: str, record: _Record, owner: MemorySubscription) -> None:
        self.topic = topic
        self.record = record
        self.owner = owner
        self.valid = True


@dataclass
class _Cursor:
    """One group's progress on one topic: ``committed`` is the first offset not yet
    done (what Kafka would store); ``done`` holds finished offsets above it."""

    committed: int = 0
    done: set[int] = field(default_factory=set)
    in_flight: dict[int, _Claim] = field(default_factory=dict)


class MemoryBus:
    """Thread-safe in-process job bus; see the module docstring. One instance is shared by
    every service of an embedded process."""

    def __init__(self, metrics: BusMetrics | None = None) -> None:
        self.metrics = metrics
        self._cond = threading.Condition()
        self._logs: dict[str, list[_Record]] = {}
        self._cursors: dict[tuple[str, str], _Cursor] = {}
        self._subscriptions: list[MemorySubscription] = []
        self._closed = False

    # -- JobBus -------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        check_topic(topic)
        with self._cond:
            if self._closed:
                raise Unavailable("the in-process job bus is closed")
            self._append(topic, value, key, dict(inject_headers(headers) or {}))

    def subscribe(
        self,
        topics: list[str],
        group: str,
        handler: Handler,
        *,
        retry: RetryPolicy | None = None,
        stop_event: threading.Event | None = None,
    ) -> MemorySubscription:
        check_subscription(topics, group)
        sub = MemorySubscription(
            self, list(topics), group, handler, retry or RetryPolicy(), stop_event
        )
        with self._cond:
            if self._closed:
                raise Unavailable("the in-process job bus is closed")
            for topic in topics:
                self._logs.setdefault(topic, [])
            self._subscriptions.append(sub)
        sub.start()
        return sub

    def ensure_topics(self, topics: list[str], partitions: int = 1) -> None:
        for topic in topics:
            check_topic(topic)
        with self._cond:
            for topic in topics:
                self._logs.setdefault(topic, [])

    def close(self) -> None:
        with self._cond:
            self._closed = True
            subs = list(self._subscriptions)
        for sub in subs:
            sub.stop(timeout=DEFAULT_STOP_GRACE_S)

    # -- introspection (tests, embedded-mode status) ---------------------------------------

    def topics(self) -> list[str]:
        with self._cond:
            return sorted(self._logs)

    def end_offset(self, topic: str) -> int:
        with self._cond:
            return len(self._logs.get(topic, ()))

    def committed_offset(self, group: str, topic: str) -> int:
        with self._cond:
            cursor = self._cursors.get((group, topic))
            return cursor.committed if cursor else 0

    def records(self, topic: str) -> list[Message]:
        """A copy of a topic's log, e.g. to inspect a dead-letter topic."""
        with self._cond:
            return [self._message(topic, r) for r in self._logs.get(topic, ())]

    # -- internals (called with or without the lock as noted) ------------------------------

    def _append(self, topic: str, value: bytes, key: bytes | None, headers: dict[str, str]) -> None:
        """Holding the lock."""
        log_ = self._logs.setdefault(topic, [])
        log_.append(_Record(len(log_), bytes(value), key, headers, time.time()))
        if self.metrics is not None:
            self.metrics.published.labels(topic).inc()
        self._cond.notify_all()

    @staticmethod
    def _message(topic: str, record: _Record) -> Message:
        return Message(
            topic=topic,
            value=record.value,
            key=record.key,
            headers=dict(record.headers),
            partition=0,
            offset=record.offset,
            timestamp=record.timestamp,
        )

    def _claim_next(self, sub: MemorySubscription) -> _Claim | None:
        """Holding the lock: the oldest record of one of ``sub``'s topics that no member of
        its group holds, skipping keys that are in hand or waiting behind one."""
        for topic in sub.next_topic_order():
            records = self._logs.get(topic, [])
            cursor = self._cursors.setdefault((sub.group, topic), _Cursor())
            blocked: set[bytes] = set()
            for offset in range(cursor.committed, len(records)):
                if offset in cursor.done:
                    continue
                record = records[offset]
                if offset in cursor.in_flight or (record.key is not None and record.key in blocked):
                    if record.key is not None:
                        blocked.add(record.key)
                    continue
                claim = _Claim(topic, record, sub)
                cursor.in_flight[offset] = claim
                return claim
        return None

    def _finish(self, claim: _Claim, delivery: Delivery, message: Message) -> None:
        """Commit (after dead-lettering if asked), unless the claim was given back."""
        with self._cond:
            if not claim.valid:
                log.info(
                    "%s@%d finished after its subscription gave it back; the "
                    "redelivered copy counts",
                    claim.topic,
                    claim.record.offset,
                )
                return
            if delivery.outcome is Outcome.DEAD_LETTER:
                self._append(
                    dead_letter_topic(claim.topic),
                    message.value,
                    message.key,
                    dead_letter_headers(message, delivery),
                )
                if self.metrics is not None:
                    self.metrics.dead_lettered.labels(claim.topic).inc()
            cursor = self._cursors[(claim.owner.group, claim.topic)]
            del cursor.in_flight[claim.record.offset]
            claim.valid = False
            cursor.done.add(claim.record.offset)
            while cursor.committed in cursor.done:
                cursor.done.remove(cursor.committed)
                cursor.committed += 1
            self._cond.notify_all()

    def _release(self, sub: MemorySubscription) -> None:
        """Give every record ``sub`` holds back to its group for redelivery."""
        with self._cond:
            for (group, _topic), cursor in self._cursors.items():
                if group != sub.group:
                    continue
                for offset, claim in list(cursor.in_flight.items()):
                    if claim.owner is sub:
                        claim.valid = False
                        del cursor.in_flight[offset]
                        log.warning(
                            "%s@%d given back to group %s for redelivery",
                            claim.topic,
                            offset,
                            group,
                        )
            self._cond.notify_all()

    def _forget(self, sub: MemorySubscription) -> None:
        with self._cond:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)


class MemorySubscription:
    """One consumer-group member with its own daemon thread."""

    def __init__(
        self,
        bus: MemoryBus,
        topics: list[str],
        group: str,
        handler: Handler,
        retry: RetryPolicy,
        stop_event: threading.Event | None,
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.group = group
        self.handler = handler
        self.retry = retry
        self._external_stop = stop_event
        self._stop = threading.Event()
        self._stopped = False
        self._rotation = itertools.cycle(range(len(topics)))
        self._thread = threading.Thread(target=self._run, name=f"memory-bus-{group}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the record in hand finish within ``timeout``; otherwise give it back to the
        group (it will be redelivered) and return, leaving the handler to run out."""
        self._stop.set()
        with self.bus._cond:
            self.bus._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "subscription %s %s did not finish its record within %.1fs",
                self.group,
                self.topics,
                timeout,
            )
            self.bus._release(self)
        self._stopped = True
        self.bus._forget(self)

    def next_topic_order(self) -> list[str]:
        """Topics starting from a rotating index, so one busy topic cannot starve others."""
        start = next(self._rotation)
        return self.topics[start:] + self.topics[:start]

    def _stopping(self) -> bool:
        return self._stop.is_set() or (
            self._external_stop is not None and self._external_stop.is_set()
        )

    def _wait_for_stop(self, seconds: float) -> bool:
        if self._external_stop is None:
            return self._stop.wait(seconds)
        deadline = time.monotonic() + seconds
        while not self._stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._stop.wait(min(remaining, EXTERNAL_STOP_CHECK_S))
        return True

    def _run(self) -> None:
        bus = self.bus
        wait = None if self._external_stop is None else EXTERNAL_STOP_CHECK_S
        try:
            while True:
                with bus._cond:
                    claim = None
                    while not self._stopping():
                        claim = bus._claim_next(self)
                        if claim is not None:
                            break
                        bus._cond.wait(wait)
                if claim is None:
                    return
                self._process(claim)
        finally:
            bus._release(self)  # anything still held (e.g. a handler raised BaseException)

    def _process(self, claim: _Claim) -> None:
        message = MemoryBus._message(claim.topic, claim.record)
        if self.bus.metrics is not None:
            self.bus.metrics.consumed.labels(claim.topic).inc()
        delivery = deliver(message, self.handler, self.retry, self._wait_for_stop, self.bus.metrics)
        if delivery.outcome is Outcome.ABANDONED:
            self.bus._release(self)
        else:
            self.bus._finish(claim, delivery, message)
