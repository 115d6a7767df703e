"""StageReporter: retries are the bus's; the last attempt fails the stage with a reason;
an outage of a dependency never fails the stage."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry

from modelguard.bus.base import HEADER_ATTEMPT, Message, RetryPolicy
from modelguard.bus.memory import MemoryBus
from modelguard.errors import InvalidInput, Unavailable
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.stage import Progress, StageOutcome, StageReporter, run_audit_stage
from modelguard.store.encryption import current_tenant
from modelguard.topics import AUDIT_EVENTS


def _events(bus: MemoryBus) -> list[tuple[str, int, str]]:
    out = []
    for message in bus.records(AUDIT_EVENTS):
        event = jobs_pb2.AuditEvent.FromString(message.value)
        out.append((event.audit_id, int(event.stage.state), event.stage.error.message))
    return out


def test_errors_are_retried_by_the_bus_and_the_last_attempt_fails_the_stage() -> None:
    bus = MemoryBus()
    reporter = StageReporter(
        bus, "leak-detector", ServiceMetrics(CollectorRegistry(), "leak-detector"), max_attempts=3
    )
    attempts: list[int] = []
    done = threading.Event()

    def handler(message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt == 3:
            done.set()

        def work(_progress: Progress) -> StageOutcome:
            raise RuntimeError("model file unreadable")

        reporter.run("a1", work, message.attempt)

    sub = bus.subscribe(
        ["jobs"], "g", handler, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    )
    try:
        bus.publish("jobs", b"x")
        assert done.wait(10)
    finally:
        sub.stop()
    failed = [e for e in _events(bus) if e[1] == common_pb2.STAGE_STATE_FAILED]
    assert attempts == [1, 2, 3]
    assert failed == [("a1", common_pb2.STAGE_STATE_FAILED, "model file unreadable")]
    bus.close()


def test_an_outage_waits_without_using_attempts_and_never_fails_the_stage() -> None:
    """The store is down for longer than all attempts would last: the job waits and then
    succeeds; no FAILED event, nothing dead-lettered."""
    bus = MemoryBus()
    metrics = ServiceMetrics(CollectorRegistry(), "trigger-reversal")
    reporter = StageReporter(bus, "trigger-reversal", metrics, max_attempts=2)
    calls: list[int] = []
    done = threading.Event()

    def handler(message: Message) -> None:
        def work(_progress: Progress) -> StageOutcome:
            calls.append(message.attempt)
            if len(calls) <= 5:  # more outages than attempts
                raise Unavailable("S3 at 127.0.0.1:9000 unreachable")
            return StageOutcome(message="ok")

        reporter.run("a3", work, message.attempt)
        done.set()

    sub = bus.subscribe(
        ["jobs"],
        "g",
        handler,
        retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.001, max_backoff_s=0.01),
    )
    try:
        bus.publish("jobs", b"x")
        assert done.wait(10)
    finally:
        sub.stop()
    states = [e[1] for e in _events(bus)]
    assert calls == [1] * 6  # the outage used up no attempt
    assert common_pb2.STAGE_STATE_FAILED not in states
    assert states[-1] == common_pb2.STAGE_STATE_DONE
    assert bus.records("jobs.dlq") == []
    waiting = metrics.registry.get_sample_value(
        f"{metrics.prefix}_jobs_total", {"outcome": "waiting"}
    )
    assert waiting == 5
    bus.close()


class _FlakyBus(MemoryBus):
    """Refuses the first ``failures`` publishes of a FAILED event (the broker is down)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def publish(self, topic: str, value: bytes, **kwargs: Any) -> None:
        if topic == AUDIT_EVENTS and self.failures:
            event = jobs_pb2.AuditEvent.FromString(value)
            if event.stage.state == common_pb2.STAGE_STATE_FAILED:
                self.failures -= 1
                raise Unavailable("Kafka did not acknowledge a record")
        super().publish(topic, value, **kwargs)


def test_a_failure_that_cannot_be_published_is_retried_not_dropped() -> None:
    """Bad input while the broker is away: the FAILED event must still get through (it
    used to be logged and dropped, and the audit waited forever)."""
    bus = _FlakyBus(failures=2)
    reporter = StageReporter(bus, "leak-detector", ServiceMetrics(CollectorRegistry(), "ld"))
    done = threading.Event()

    def handler(message: Message) -> None:
        def work(_progress: Progress) -> StageOutcome:
            raise InvalidInput("not a model")

        reporter.run("a4", work, message.attempt)
        done.set()

    sub = bus.subscribe(
        ["jobs"], "g", handler, retry=RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.01)
    )
    try:
        bus.publish("jobs", b"x")
        assert done.wait(10)
    finally:
        sub.stop()
    failed = [e for e in _events(bus) if e[1] == common_pb2.STAGE_STATE_FAILED]
    assert failed == [("a4", common_pb2.STAGE_STATE_FAILED, "not a model")]
    assert bus.failures == 0
    bus.close()


def test_progress_events_are_best_effort_while_the_broker_is_away() -> None:
    class DownBus(MemoryBus):
        down = False

        def publish(self, topic: str, value: bytes, **kwargs: Any) -> None:
            if self.down:
                raise Unavailable("Kafka unreachable")
            super().publish(topic, value, **kwargs)

    bus = DownBus()
    reporter = StageReporter(bus, "neuron-scoring", ServiceMetrics(CollectorRegistry(), "ns"))
    report = reporter.progress("a5")
    bus.down = True
    report(0.5, "half way")  # logged, not raised: the work goes on
    bus.down = False
    report(0.9, "almost")  # paused after the failure: not even tried
    assert _events(bus) == []
    bus.close()


def test_bad_input_fails_at_once_and_is_not_raised() -> None:
    bus = MemoryBus()
    reporter = StageReporter(
        bus, "trigger-reversal", ServiceMetrics(CollectorRegistry(), "trigger-reversal")
    )

    def work(_progress: Progress) -> StageOutcome:
        raise InvalidInput("declare --input-shape")

    reporter.run("a2", work)
    states = [e[1] for e in _events(bus)]
    assert states == [common_pb2.STAGE_STATE_RUNNING, common_pb2.STAGE_STATE_FAILED]
    assert HEADER_ATTEMPT == "attempt"
    bus.close()


def test_a_stage_writes_for_the_audit_tenant() -> None:
    """Artifacts a stage stores are encrypted with its audit's tenant's key."""
    bus = MemoryBus()
    reporter = StageReporter(
        bus, "leak-detector", ServiceMetrics(CollectorRegistry(), "leak-detector")
    )
    seen: list[str] = []

    def work(request: jobs_pb2.AuditRequested, _progress: Progress) -> StageOutcome:
        seen.append(current_tenant())
        return StageOutcome()

    request = jobs_pb2.AuditRequested(audit_id="a1", tenant="acme")
    message = Message(topic="jobs", value=request.SerializeToString())
    run_audit_stage(
        reporter,
        message,
        jobs_pb2.AuditRequested,
        lambda m: m.audit_id,
        work,
        tenant=lambda m: m.tenant,
    )
    assert seen == ["acme"]
    assert current_tenant() == "platform"  # only while the stage runs
    bus.close()
