"""Per-job time limit of audit stages: a job past MODELGUARD_STAGE_TIME_LIMIT_SECONDS
fails with DEADLINE_EXCEEDED and a reason, and is not retried."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from modelguard.bus.base import Message, RetryPolicy
from modelguard.bus.memory import MemoryBus
from modelguard.config import PlatformSettings
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.stage import Progress, StageOutcome, StageReporter
from modelguard.topics import AUDIT_EVENTS


def _final_events(bus: MemoryBus) -> list[common_pb2.StageStatus]:
    events = [jobs_pb2.AuditEvent.FromString(m.value).stage for m in bus.records(AUDIT_EVENTS)]
    return [e for e in events if e.state != common_pb2.STAGE_STATE_RUNNING]


def test_a_job_past_its_time_limit_fails_with_a_reason_and_is_not_retried() -> None:
    bus = MemoryBus()
    reporter = StageReporter(
        bus,
        "trigger-reversal",
        ServiceMetrics(CollectorRegistry(), "trigger-reversal"),
        max_attempts=3,
        time_limit=0.2,
    )
    attempts: list[int] = []
    done = threading.Event()

    def handler(message: Message) -> None:
        attempts.append(message.attempt)

        def work(progress: Progress) -> StageOutcome:
            for step in range(10_000):  # a runaway optimisation that reports progress
                progress(step / 10_000, f"step {step}")
                time.sleep(0.01)
            return StageOutcome(message="finished")

        reporter.run("slow", work, message.attempt)
        done.set()

    sub = bus.subscribe(["jobs"], "g", handler, retry=RetryPolicy(initial_backoff_s=0.001))
    started = time.monotonic()
    try:
        bus.publish("jobs", b"x")
        assert done.wait(10)
        time.sleep(0.2)  # a retry, if any, would start now
    finally:
        sub.stop()
    assert time.monotonic() - started < 5
    assert attempts == [1]
    [failed] = _final_events(bus)
    assert failed.state == common_pb2.STAGE_STATE_FAILED
    assert failed.error.code == "DEADLINE_EXCEEDED"
    assert "time limit of 0.2 s" in failed.error.message
    assert bus.records("jobs.dlq") == []
    bus.close()


def test_a_job_inside_its_time_limit_is_unaffected() -> None:
    bus = MemoryBus()
    reporter = StageReporter(
        bus, "repair", ServiceMetrics(CollectorRegistry(), "repair"), time_limit=30
    )

    def work(progress: Progress) -> StageOutcome:
        for step in range(5):
            progress(step / 5, "")
        return StageOutcome(message="done")

    reporter.run("fast", work)
    [done] = _final_events(bus)
    assert done.state == common_pb2.STAGE_STATE_DONE
    bus.close()


def test_the_limit_is_a_platform_setting_that_reaches_every_stage_worker(tmp_path: Path) -> None:
    from modelguard.services.launcher import build_service

    platform = PlatformSettings(stage_time_limit_seconds=123.0, store_dir=tmp_path)
    assert PlatformSettings().stage_time_limit_seconds == 3600.0
    bus = MemoryBus()
    try:
        for name in ("trigger-reversal", "neuron-scoring", "leak-detector", "pruning-orchestrator"):
            app = build_service(name, platform, bus=bus)
            reporters: list[StageReporter] = [
                w.handler.reporter for w in app.workers if hasattr(w.handler, "reporter")
            ]
            assert reporters and all(r.time_limit == 123.0 for r in reporters), name
    finally:
        bus.close()
