"""Structured logs: JSON lines carry the job in hand; text stays the default."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from modelguard.bus.base import Message, RetryPolicy
from modelguard.bus.memory import MemoryBus
from modelguard.config import PlatformSettings
from modelguard.logs import JsonFormatter, configure_logging, current_job, job_context
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.services.launcher import configure_logging as configure_service_logging
from modelguard.stage import Progress, StageOutcome, StageReporter, run_audit_stage

stage_log = logging.getLogger("modelguard.test.stage")


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Give the root logger back as it was (configure_logging replaces its handlers)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_text_is_the_default_format() -> None:
    assert PlatformSettings().log_format == "text"


def test_the_setting_reads_json_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELGUARD_LOG_FORMAT", "json")
    assert PlatformSettings().log_format == "json"
    monkeypatch.setenv("MODELGUARD_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="log_format"):
        PlatformSettings()


def test_a_record_logged_inside_a_stage_carries_the_job_fields(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", "leak-detector", stream)
    bus = MemoryBus()
    reporter = StageReporter(
        bus, "leak-detector", ServiceMetrics(CollectorRegistry(), "leak-detector"), max_attempts=3
    )
    done = threading.Event()

    def work(request: jobs_pb2.AuditRequested, _progress: Progress) -> StageOutcome:
        stage_log.info("scanning %d layers", 3)
        return StageOutcome(message="benign")

    def handler(message: Message) -> None:
        try:
            run_audit_stage(
                reporter,
                message,
                jobs_pb2.AuditRequested,
                lambda m: m.audit_id,
                work,
                tenant=lambda m: m.tenant,
            )
        finally:
            done.set()

    sub = bus.subscribe(["jobs"], "g", handler, retry=RetryPolicy(max_attempts=1))
    try:
        bus.publish(
            "jobs", jobs_pb2.AuditRequested(audit_id="a-42", tenant="acme").SerializeToString()
        )
        assert done.wait(10)
    finally:
        sub.stop()
        bus.close()
    stage_lines = [line for line in json_lines(stream) if line["logger"] == stage_log.name]
    assert len(stage_lines) == 1
    line = stage_lines[0]
    assert line["message"] == "scanning 3 layers"
    assert line["level"] == "INFO"
    assert line["service"] == "leak-detector"
    assert (line["audit_id"], line["stage"], line["tenant"], line["attempt"]) == (
        "a-42",
        "leak-detector",
        "acme",
        1,
    )
    assert line["time"].endswith("+00:00")


def test_the_attempt_is_the_bus_count_and_the_fields_end_with_the_stage(
    root_logging: None,
) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", "neuron-scoring", stream)
    reporter = StageReporter(
        MemoryBus(), "neuron-scoring", ServiceMetrics(CollectorRegistry(), "neuron-scoring")
    )

    def work(_progress: Progress) -> StageOutcome:
        stage_log.warning("retrying the scores")
        return StageOutcome()

    reporter.run("a-7", work, attempt=2)
    stage_log.warning("between jobs")
    lines = {line["message"]: line for line in json_lines(stream)}
    assert lines["retrying the scores"]["attempt"] == 2
    assert lines["retrying the scores"]["audit_id"] == "a-7"
    assert "tenant" not in lines["retrying the scores"]  # not bound: left out, not empty
    assert not set(lines["between jobs"]) & {"audit_id", "stage", "tenant", "attempt"}


def test_exceptions_stay_on_one_line() -> None:
    formatter = JsonFormatter("result-mapper")
    try:
        raise RuntimeError("mapper unreadable")
    except RuntimeError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "load failed", (), exc_info=sys.exc_info()
        )
    text = formatter.format(record)
    assert "\n" not in text
    entry = json.loads(text)
    assert entry["message"] == "load failed"
    assert "RuntimeError: mapper unreadable" in entry["exception"]


def test_job_context_nests_and_restores() -> None:
    with job_context(tenant="acme"):
        with job_context(audit_id="a1", stage="trigger-reversal", attempt=1, tenant=None):
            assert current_job() == {
                "tenant": "acme",
                "audit_id": "a1",
                "stage": "trigger-reversal",
                "attempt": 1,
            }
        assert current_job() == {"tenant": "acme"}
    assert current_job() == {}
    with pytest.raises(ValueError, match="unknown log fields"), job_context(user="bob"):
        pass


def test_a_service_process_logs_text_by_default(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_service_logging(PlatformSettings(), "leak-detector")
    with job_context(audit_id="a1"):
        logging.getLogger("modelguard.test").info("ready")
    err = capsys.readouterr().err
    assert err.rstrip().endswith("INFO modelguard.test: ready")
    assert "{" not in err


def test_a_service_process_logs_json_when_set(
    root_logging: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELGUARD_LOG_FORMAT", "json")
    monkeypatch.setenv("MODELGUARD_LOG_LEVEL", "debug")
    configure_service_logging(PlatformSettings(), "leak-detector")
    logging.getLogger("modelguard.test").debug("ready")
    entry = json.loads(capsys.readouterr().err)
    assert (entry["service"], entry["level"], entry["message"]) == (
        "leak-detector",
        "DEBUG",
        "ready",
    )
