"""The Kafka consumer watchdog: a consumer blocked inside ``poll`` beyond the limit is
reported (``on_stuck``) and the subscription says it is unhealthy; a consumer that polls
normally is left alone. No broker: the consumer is a stand-in whose poll can hang."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from modelguard.bus import kafka as kafka_bus
from modelguard.bus.base import Message
from modelguard.bus.kafka import KafkaBus


class _Consumer:
    def __init__(self, hang: threading.Event) -> None:
        self.hang = hang
        self.released = threading.Event()

    def poll(self, timeout_ms: int = 0, **_: Any) -> dict[Any, Any]:
        if self.hang.is_set():
            self.released.wait()  # what kafka-python was seen to do after an outage
        else:
            self.released.wait(timeout_ms / 1000)
        return {}

    def close(self, **_: Any) -> None:
        self.released.set()


@pytest.fixture(autouse=True)
def _fast_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_bus, "_WATCHDOG_INTERVAL_S", 0.05)


def _subscribe(bus: KafkaBus, consumer: _Consumer) -> Any:
    bus._new_consumer = lambda sub: consumer  # type: ignore[method-assign]

    def handler(message: Message) -> None:
        raise AssertionError("no record is ever delivered here")

    return bus.subscribe(["mg.test.jobs"], "watchdog-group", handler)


def test_a_consumer_stuck_in_poll_is_reported_once() -> None:
    stuck_groups: list[str] = []
    reported = threading.Event()

    def on_stuck(group: str) -> None:
        stuck_groups.append(group)
        reported.set()

    bus = KafkaBus("127.0.0.1:1", stuck_poll_s=0.3, on_stuck=on_stuck)
    hang = threading.Event()
    consumer = _Consumer(hang)
    hang.set()
    subscription = _subscribe(bus, consumer)
    try:
        assert reported.wait(10)
        assert stuck_groups == ["watchdog-group"]
        assert not subscription.healthy
    finally:
        consumer.close()
        subscription.stop(timeout=1)


def test_a_consumer_that_polls_normally_is_healthy() -> None:
    calls: list[str] = []
    bus = KafkaBus("127.0.0.1:1", stuck_poll_s=0.3, on_stuck=calls.append)
    consumer = _Consumer(threading.Event())
    subscription = _subscribe(bus, consumer)
    try:
        # many poll rounds, each well under the limit
        assert not consumer.released.wait(1.2)
        assert subscription.healthy and calls == []
    finally:
        consumer.close()
        subscription.stop(timeout=1)
