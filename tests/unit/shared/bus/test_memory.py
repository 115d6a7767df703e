"""The JobBus contract against `MemoryBus`, plus what only the in-process bus shows."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from modelguard.bus import make_bus
from modelguard.bus.base import Message, RetryPolicy
from modelguard.bus.memory import MemoryBus
from modelguard.bus.metrics import BusMetrics
from modelguard.errors import InvalidInput, Unavailable
from tests.contracts.bus_contract import WAIT_S, BusContract, Collector


class TestMemoryBus(BusContract):
    @pytest.fixture
    def bus(self, metrics: BusMetrics) -> Iterator[MemoryBus]:
        bus = MemoryBus(metrics)
        yield bus
        bus.close()


def test_committed_offset_advances_only_after_the_handler() -> None:
    bus = MemoryBus()
    entered, release = threading.Event(), threading.Event()

    def slow(message: Message) -> None:
        entered.set()
        release.wait(WAIT_S)

    bus.publish("jobs", b"a")
    sub = bus.subscribe(["jobs"], "g", slow)
    assert entered.wait(WAIT_S)
    assert bus.committed_offset("g", "jobs") == 0
    release.set()
    sub.stop(timeout=WAIT_S)
    assert bus.committed_offset("g", "jobs") == 1
    bus.close()


def test_same_key_is_processed_in_order_by_one_member_at_a_time() -> None:
    """Two members, one key: the second record waits for the first (Kafka's partition
    order), while a record with another key is free to go to the idle member."""
    bus = MemoryBus()
    entered, release = threading.Event(), threading.Event()
    got = Collector()

    def handler(message: Message) -> None:
        if message.value == b"k1-first":
            entered.set()
            release.wait(WAIT_S)
        got(message)

    subs = [bus.subscribe(["jobs"], "g", handler) for _ in range(2)]
    bus.publish("jobs", b"k1-first", key=b"k1")
    assert entered.wait(WAIT_S)
    bus.publish("jobs", b"k1-second", key=b"k1")
    bus.publish("jobs", b"k2", key=b"k2")
    assert [m.value for m in got.wait_for(1)] == [b"k2"]
    release.set()
    assert [m.value for m in got.wait_for(3)] == [b"k2", b"k1-first", b"k1-second"]
    for sub in subs:
        sub.stop()
    bus.close()


def test_stop_during_backoff_gives_the_record_back() -> None:
    bus = MemoryBus()
    failed = threading.Event()

    def failing(message: Message) -> None:
        failed.set()
        raise RuntimeError("transient")

    slow_retry = RetryPolicy(max_attempts=3, initial_backoff_s=60.0, max_backoff_s=60.0)
    sub = bus.subscribe(["jobs"], "g", failing, retry=slow_retry)
    bus.publish("jobs", b"a")
    assert failed.wait(WAIT_S)
    sub.stop(timeout=WAIT_S)  # returns at once: the backoff wait is interruptible
    assert bus.committed_offset("g", "jobs") == 0
    assert bus.records("jobs.dlq") == []
    got = Collector()
    sub = bus.subscribe(["jobs"], "g", got)
    assert [m.value for m in got.wait_for(1)] == [b"a"]
    sub.stop()
    bus.close()


def test_closed_bus_refuses_publish() -> None:
    bus = MemoryBus()
    bus.close()
    with pytest.raises(Unavailable):
        bus.publish("jobs", b"a")


def test_make_bus() -> None:
    assert isinstance(make_bus("memory"), MemoryBus)
    with pytest.raises(InvalidInput):
        make_bus("rabbit")
