"""The JobBus contract against `KafkaBus` on a Tansu broker, plus broker failures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelguard.bus import make_bus
from modelguard.bus.base import Message
from modelguard.bus.kafka import KafkaBus
from modelguard.bus.metrics import BusMetrics
from modelguard.errors import Unavailable
from modelguard.localstack import TansuBroker, free_port
from tests.contracts.bus_contract import WAIT_S, BusContract, Collector

pytestmark = pytest.mark.integration


class TestKafkaBus(BusContract):
    @pytest.fixture
    def bus(self, tansu: TansuBroker, metrics: BusMetrics) -> Iterator[KafkaBus]:
        bus = KafkaBus(tansu.bootstrap, "contract", metrics, session_timeout_ms=6000)
        yield bus
        bus.close()


def test_broker_restart_loses_nothing(tansu: TansuBroker, topic_name: str) -> None:
    """S3-backed Tansu keeps records and committed offsets across a restart, and a running
    subscription carries on after it."""
    bus = KafkaBus(tansu.bootstrap, "restart-test", timeout_s=10)
    try:
        bus.ensure_topics([topic_name])
        got = Collector()
        sub = bus.subscribe([topic_name], "restart-group", got)
        bus.publish(topic_name, b"before")
        got.wait_for(1)
        tansu.restart()
        bus.publish(topic_name, b"after")
        assert [m.value for m in got.wait_for(2)] == [b"before", b"after"]
        sub.stop()
        bus.publish(topic_name, b"later")
        # a new group reads the whole log; the old group resumes after its commits
        everything, resumed = Collector(), Collector()
        subs = [
            bus.subscribe([topic_name], "restart-fresh", everything),
            bus.subscribe([topic_name], "restart-group", resumed),
        ]
        assert [m.value for m in everything.wait_for(3)] == [b"before", b"after", b"later"]
        assert [m.value for m in resumed.wait_for(1)] == [b"later"]
        for s in subs:
            s.stop()
    finally:
        bus.close()


def test_dead_broker_makes_publish_unavailable(tmp_path: Path) -> None:
    broker = TansuBroker(tmp_path / "tansu")  # memory storage: a throwaway broker
    broker.start()
    bus = KafkaBus(broker.bootstrap, "dead-broker", timeout_s=3)
    try:
        bus.publish("alive", b"x")
        broker.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable, match=broker.bootstrap):
            bus.publish("alive", b"y")
        assert time.monotonic() - started < 10
    finally:
        bus.close()
        broker.stop()


def test_unreachable_broker_is_unavailable_in_bounded_time() -> None:
    bus = make_bus("kafka", bootstrap_servers=f"127.0.0.1:{free_port()}", timeout_s=1)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="unreachable"):
        bus.publish("nowhere", b"x")
    with pytest.raises(Unavailable):
        bus.ensure_topics(["nowhere"])
    assert time.monotonic() - started < 5
    bus.close()


def test_subscription_waits_for_a_late_broker(tmp_path: Path) -> None:
    """A worker started before the broker connects once the broker is up."""
    port = free_port()
    bus = KafkaBus(f"127.0.0.1:{port}", "late", timeout_s=2)
    got = Collector()

    def handler(message: Message) -> None:
        got(message)

    sub = bus.subscribe(["late.jobs"], "late-group", handler)
    broker = TansuBroker(tmp_path / "tansu", port=port)
    try:
        broker.start()
        bus.publish("late.jobs", b"hello")
        assert [m.value for m in got.wait_for(1, WAIT_S)] == [b"hello"]
    finally:
        sub.stop()
        bus.close()
        broker.stop()
