"""The JobBus contract. Subclass `BusContract` as ``Test...`` and provide a ``bus``
fixture that builds the implementation with the ``metrics`` fixture.

Every wait is on a condition with a timeout (never a sleep); the timeout only bounds a
failing test. Subscriptions started through `self.subscribe` are stopped after each test.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from modelguard.bus.base import (
    HEADER_ATTEMPT,
    HEADER_ERROR,
    HEADER_JOB_ID,
    HEADER_ORIGINAL_TOPIC,
    JobBus,
    Message,
    RetryPolicy,
    Subscription,
    dead_letter_topic,
)
from modelguard.bus.metrics import BusMetrics
from modelguard.errors import InvalidInput, Unavailable

#: Bounds a failing wait; Kafka group joins take a few seconds.
WAIT_S = 30.0
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
SERVICE = "contract-test"


class Collector:
    """Thread-safe list of handled messages with a blocking wait."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = WAIT_S) -> list[Message]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.messages) >= count, timeout)
            assert ok, f"expected {count} messages within {timeout}s, got {self.values()}"
            return list(self.messages)

    def values(self) -> list[bytes]:
        return [m.value for m in self.messages]


class BusContract:
    # -- fixtures and helpers ---------------------------------------------------------------

    @pytest.fixture
    def registry(self) -> CollectorRegistry:
        return CollectorRegistry()

    @pytest.fixture
    def metrics(self, registry: CollectorRegistry) -> BusMetrics:
        return BusMetrics(registry, SERVICE)

    @pytest.fixture
    def topic(self, bus: JobBus) -> str:
        name = f"contract-{uuid.uuid4().hex[:12]}"
        bus.ensure_topics([name, dead_letter_topic(name)])
        return name

    @pytest.fixture(autouse=True)
    def _stop_subscriptions(self) -> Iterator[None]:
        self._subs: list[Subscription] = []
        yield
        for sub in self._subs:
            sub.stop(timeout=5.0)

    def subscribe(
        self,
        bus: JobBus,
        topics: list[str],
        handler: Callable[[Message], None],
        group: str | None = None,
        stop_event: threading.Event | None = None,
    ) -> Subscription:
        sub = bus.subscribe(
            topics,
            group or f"g-{uuid.uuid4().hex[:8]}",
            handler,
            retry=FAST_RETRY,
            stop_event=stop_event,
        )
        self._subs.append(sub)
        return sub

    @staticmethod
    def joins(sub: Subscription) -> int:
        """Group joins completed by ``sub`` (Kafka); 0 where joining is instant."""
        return int(getattr(sub, "assignments", 0))

    @staticmethod
    def wait_joined(sub: Subscription, count: int = 1) -> None:
        wait = getattr(sub, "wait_for_assignments", None)
        if wait is not None:
            assert wait(count, WAIT_S), f"subscription did not complete {count} group joins"

    @staticmethod
    def sample(registry: CollectorRegistry, name: str, topic: str) -> float:
        prefix = "modelguard_" + SERVICE.replace("-", "_") + "_bus_"
        return registry.get_sample_value(prefix + name, {"topic": topic}) or 0.0

    # -- delivery ---------------------------------------------------------------------------

    def test_publish_then_consume(
        self, bus: JobBus, topic: str, registry: CollectorRegistry
    ) -> None:
        for i in range(3):
            bus.publish(topic, f"m{i}".encode(), key=b"k", headers={HEADER_JOB_ID: f"j{i}"})
        got = Collector()
        self.subscribe(bus, [topic], got)
        messages = got.wait_for(3)
        assert [m.value for m in messages] == [b"m0", b"m1", b"m2"]
        assert [m.job_id for m in messages] == ["j0", "j1", "j2"]
        assert all(m.key == b"k" and m.topic == topic for m in messages)
        assert all(m.attempt == 1 for m in messages)
        assert [m.offset for m in messages] == sorted(m.offset for m in messages)
        assert self.sample(registry, "published_total", topic) == 3
        assert self.sample(registry, "consumed_total", topic) >= 3
        assert self.sample(registry, "handler_seconds_count", topic) >= 3

    def test_each_group_gets_every_message(self, bus: JobBus, topic: str) -> None:
        first, second = Collector(), Collector()
        self.subscribe(bus, [topic], first)
        self.subscribe(bus, [topic], second)
        for i in range(4):
            bus.publish(topic, f"m{i}".encode())
        expected = [b"m0", b"m1", b"m2", b"m3"]
        assert [m.value for m in first.wait_for(4)] == expected
        assert [m.value for m in second.wait_for(4)] == expected

    def test_group_members_share_the_work(self, bus: JobBus, topic: str) -> None:
        """Each record reaches exactly one member of a stable group."""
        got = Collector()
        group = f"g-{uuid.uuid4().hex[:8]}"
        first = self.subscribe(bus, [topic], got, group=group)
        bus.publish(topic, b"warm-up")
        got.wait_for(1)
        before = self.joins(first)
        second = self.subscribe(bus, [topic], got, group=group)
        self.wait_joined(second)
        self.wait_joined(first, before + 1)  # the first member took part in the rebalance
        values = [f"m{i}".encode() for i in range(10)]
        for value in values:
            bus.publish(topic, value)
        handled = [m.value for m in got.wait_for(11)]
        assert sorted(handled) == sorted([b"warm-up", *values])

    def test_stopped_mid_message_is_redelivered(self, bus: JobBus, topic: str) -> None:
        """Commit happens after the handler: a member that stops while its handler hangs
        leaves the record to the next member of the group."""
        entered, release = threading.Event(), threading.Event()
        seen: list[bytes] = []

        def hang(message: Message) -> None:
            seen.append(message.value)
            entered.set()
            release.wait(WAIT_S)

        group = f"g-{uuid.uuid4().hex[:8]}"
        first = self.subscribe(bus, [topic], hang, group=group)
        bus.publish(topic, b"job")
        assert entered.wait(WAIT_S)
        first.stop(timeout=0.5)
        assert not first.running
        got = Collector()
        self.subscribe(bus, [topic], got, group=group)
        try:
            assert [m.value for m in got.wait_for(1)] == [b"job"]
        finally:
            release.set()
        assert seen == [b"job"]

    def test_stop_finishes_and_commits_the_message_in_hand(self, bus: JobBus, topic: str) -> None:
        entered, release = threading.Event(), threading.Event()
        done: list[bytes] = []

        def slow(message: Message) -> None:
            entered.set()
            release.wait(WAIT_S)
            done.append(message.value)

        group = f"g-{uuid.uuid4().hex[:8]}"
        first = self.subscribe(bus, [topic], slow, group=group)
        bus.publish(topic, b"first")
        assert entered.wait(WAIT_S)
        stopper = threading.Thread(target=first.stop, kwargs={"timeout": WAIT_S})
        stopper.start()
        release.set()
        stopper.join(WAIT_S + 15)
        assert not stopper.is_alive() and not first.running
        assert done == [b"first"]
        bus.publish(topic, b"second")
        got = Collector()
        self.subscribe(bus, [topic], got, group=group)
        assert [m.value for m in got.wait_for(1)] == [b"second"]  # "first" was committed

    def test_external_stop_event_ends_the_subscription(self, bus: JobBus, topic: str) -> None:
        stop = threading.Event()
        sub = self.subscribe(bus, [topic], Collector(), stop_event=stop)
        stop.set()
        thread = getattr(sub, "_thread", None)
        if isinstance(thread, threading.Thread):
            thread.join(WAIT_S)
            assert not thread.is_alive()
        sub.stop(timeout=5.0)
        assert not sub.running

    # -- retries and dead letters --------------------------------------------------------------

    def _dead_letters(self, bus: JobBus, topic: str) -> Collector:
        letters = Collector()
        self.subscribe(bus, [dead_letter_topic(topic)], letters)
        return letters

    def test_retry_then_success(self, bus: JobBus, topic: str, registry: CollectorRegistry) -> None:
        attempts: list[int] = []
        stamps: set[float] = set()
        done = Collector()

        def flaky(message: Message) -> None:
            attempts.append(message.attempt)
            stamps.add(message.timestamp)
            if message.attempt < 3:
                raise RuntimeError("transient")
            done(message)

        self.subscribe(bus, [topic], flaky)
        bus.publish(topic, b"job")
        assert [m.value for m in done.wait_for(1)] == [b"job"]
        assert attempts == [1, 2, 3]
        # the publish time, identical on every delivery of the record
        [stamp] = stamps
        assert abs(stamp - time.time()) < 120
        assert self.sample(registry, "failed_total", topic) == 2
        assert self.sample(registry, "dead_lettered_total", topic) == 0

    def test_exhausted_retries_dead_letter(
        self, bus: JobBus, topic: str, registry: CollectorRegistry
    ) -> None:
        calls: list[int] = []

        def broken(message: Message) -> None:
            calls.append(message.attempt)
            raise RuntimeError("boom: model file unreadable")

        letters = self._dead_letters(bus, topic)
        self.subscribe(bus, [topic], broken)
        bus.publish(topic, b"job", key=b"audit-1", headers={HEADER_JOB_ID: "audit-1"})
        [letter] = letters.wait_for(1)
        assert calls == [1, 2, 3]
        assert letter.topic == dead_letter_topic(topic)
        assert letter.value == b"job" and letter.key == b"audit-1"
        assert "boom: model file unreadable" in letter.headers[HEADER_ERROR]
        assert letter.headers[HEADER_ORIGINAL_TOPIC] == topic
        assert letter.headers[HEADER_ATTEMPT] == "3"
        assert letter.job_id == "audit-1"
        assert self.sample(registry, "failed_total", topic) == 3
        assert self.sample(registry, "dead_lettered_total", topic) == 1

    def test_outage_retries_without_using_attempts(
        self, bus: JobBus, topic: str, registry: CollectorRegistry
    ) -> None:
        """A dependency outage (`Unavailable`) longer than all attempts: the record waits
        and is handled once the dependency is back; nothing is dead-lettered."""
        calls: list[int] = []
        done = Collector()

        def waits_for_store(message: Message) -> None:
            calls.append(message.attempt)
            if len(calls) <= 2 * FAST_RETRY.max_attempts:
                raise Unavailable("S3 unreachable")
            if len(calls) == 2 * FAST_RETRY.max_attempts + 1:
                raise RuntimeError("one ordinary failure still uses an attempt")
            done(message)

        self.subscribe(bus, [topic], waits_for_store)
        bus.publish(topic, b"job")
        assert [m.value for m in done.wait_for(1)] == [b"job"]
        assert calls == [1] * (2 * FAST_RETRY.max_attempts + 1) + [2]
        assert self.sample(registry, "transient_retries_total", topic) == 6
        assert self.sample(registry, "failed_total", topic) == 1
        assert self.sample(registry, "dead_lettered_total", topic) == 0

    def test_permanent_error_dead_letters_without_retry(self, bus: JobBus, topic: str) -> None:
        calls: list[int] = []

        def reject(message: Message) -> None:
            calls.append(message.attempt)
            raise InvalidInput("not a valid job record")

        letters = self._dead_letters(bus, topic)
        self.subscribe(bus, [topic], reject)
        bus.publish(topic, b"garbage")
        [letter] = letters.wait_for(1)
        assert calls == [1]
        assert letter.headers[HEADER_ATTEMPT] == "1"
        assert "InvalidInput: not a valid job record" in letter.headers[HEADER_ERROR]

    def test_consumer_keeps_going_after_a_dead_letter(self, bus: JobBus, topic: str) -> None:
        done = Collector()

        def handler(message: Message) -> None:
            if message.value == b"bad":
                raise InvalidInput("malformed")
            done(message)

        letters = self._dead_letters(bus, topic)
        self.subscribe(bus, [topic], handler)
        for value in (b"bad", b"good-1", b"good-2"):
            bus.publish(topic, value)
        assert [m.value for m in done.wait_for(2)] == [b"good-1", b"good-2"]
        assert [m.value for m in letters.wait_for(1)] == [b"bad"]

    def test_invalid_topic_is_refused(self, bus: JobBus) -> None:
        with pytest.raises(InvalidInput):
            bus.publish("no spaces allowed", b"x")
