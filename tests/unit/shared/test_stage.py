"""StageReporter: retries are the bus's; the last attempt fails the stage with a reason."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry

from shared.bus.base import HEADER_ATTEMPT, Message, RetryPolicy
from shared.bus.memory import MemoryBus
from shared.errors import InvalidInput, Unavailable
from shared.metrics import ServiceMetrics
from shared.proto.modelguard.v1 import common_pb2, jobs_pb2
from shared.stage import StageOutcome, StageReporter
from shared.topics import AUDIT_EVENTS


def _events(bus: MemoryBus) -> list[tuple[str, int, str]]:
    out = []
    for message in bus.records(AUDIT_EVENTS):
        event = jobs_pb2.AuditEvent.FromString(message.value)
        out.append((event.audit_id, event.stage.state, event.stage.error.message))
    return out


def test_transient_errors_are_retried_by_the_bus_and_the_last_attempt_fails_the_stage() -> None:
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

        def work(_progress: object) -> StageOutcome:
            raise Unavailable("store unreachable")

        reporter.run("a1", work, message.attempt)  # type: ignore[arg-type]

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
    assert failed == [("a1", common_pb2.STAGE_STATE_FAILED, "store unreachable")]
    bus.close()


def test_bad_input_fails_at_once_and_is_not_raised() -> None:
    bus = MemoryBus()
    reporter = StageReporter(
        bus, "trigger-reversal", ServiceMetrics(CollectorRegistry(), "trigger-reversal")
    )

    def work(_progress: object) -> StageOutcome:
        raise InvalidInput("declare --input-shape")

    reporter.run("a2", work)  # type: ignore[arg-type]
    states = [e[1] for e in _events(bus)]
    assert states == [common_pb2.STAGE_STATE_RUNNING, common_pb2.STAGE_STATE_FAILED]
    assert HEADER_ATTEMPT == "attempt"
    bus.close()
