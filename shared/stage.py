"""How a worker reports on its stage of an audit: progress, done, skipped, failed.

Every stage outcome travels as an `AuditEvent` on ``modelguard.audit.events`` to the
pruning-orchestrator, which owns the audit's state. Bad input fails the stage with a
reason (never retried); an outage of the broker or the store (`Unavailable`) never fails
the stage: the bus retries the job until the dependency is back; other failures are
retried by the bus, and the last attempt fails the stage with the reason before the
record is dead-lettered, so no audit is left waiting on a job that will never finish.
Progress events are best effort: an unreachable broker does not abort the work for them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelguard.bus.base import HEADER_JOB_ID, HEADER_JOB_TYPE, JobBus, Message
from modelguard.config import PlatformSettings
from modelguard.convert import M, parse_message, ref_to_proto
from modelguard.errors import DeadlineExceeded, InvalidInput, ModelGuardError, is_transient
from modelguard.logs import job_context
from modelguard.metrics import ServiceMetrics
from modelguard.progress import Progress as Progress  # re-exported: handlers import it from here
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.store.base import ArtifactRef
from modelguard.store.encryption import writing_for
from modelguard.topics import AUDIT_EVENTS, JOB_AUDIT
from modelguard.tracing import span

log = logging.getLogger(__name__)

#: After a progress event could not be published, skip progress events for this long:
#: each failed publish blocks for the bus's timeout, which would stall the work.
PROGRESS_PAUSE_AFTER_FAILURE_S = 30.0


@dataclass
class StageOutcome:
    """What a stage's work returns: DONE with a result, or SKIPPED with a reason."""

    result: ArtifactRef | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    message: str = ""


def publish_proto(bus: JobBus, topic: str, message: Any, *, key: str, job_type: str) -> None:
    bus.publish(
        topic,
        message.SerializeToString(),
        key=key.encode(),
        headers={HEADER_JOB_ID: key, HEADER_JOB_TYPE: job_type},
    )


class StageReporter:
    @classmethod
    def for_platform(
        cls, bus: JobBus, stage: str, metrics: ServiceMetrics, platform: PlatformSettings
    ) -> StageReporter:
        """The reporter of a deployed stage: attempts and time limit from the platform's
        settings."""
        return cls(
            bus,
            stage,
            metrics,
            max_attempts=platform.job_max_attempts,
            time_limit=platform.stage_time_limit_seconds,
        )

    def __init__(
        self,
        bus: JobBus,
        stage: str,
        metrics: ServiceMetrics,
        *,
        max_attempts: int = 3,
        min_progress_interval: float = 0.5,
        time_limit: float = 0.0,
    ) -> None:
        self.bus = bus
        self.stage = stage
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.min_progress_interval = min_progress_interval
        #: Seconds one job may run (0: no limit). Enforced at the work's progress reports
        #: (every stage's algorithm reports several times a second); past it the job fails
        #: with DeadlineExceeded, a permanent error: a retry would run as long again.
        self.time_limit = time_limit

    def event(
        self,
        audit_id: str,
        state: int,
        *,
        progress: float = 0.0,
        message: str = "",
        result: ArtifactRef | None = None,
        summary: dict[str, Any] | None = None,
        error: ModelGuardError | Exception | None = None,
        stage: str | None = None,
    ) -> None:
        status = common_pb2.StageStatus(
            stage=stage or self.stage,
            state=state,  # type: ignore[arg-type]
            progress=progress,
            message=message,
            result=ref_to_proto(result),
            summary_json=json.dumps(summary) if summary else "",
        )
        if error is not None:
            code = error.code.name if isinstance(error, ModelGuardError) else "INTERNAL"
            status.error.CopyFrom(
                common_pb2.ErrorDetail(code=code, message=str(error), stage=status.stage)
            )
        publish_proto(
            self.bus,
            AUDIT_EVENTS,
            jobs_pb2.AuditEvent(audit_id=audit_id, stage=status),
            key=audit_id,
            job_type=JOB_AUDIT,
        )

    def progress(self, audit_id: str, deadline: float | None = None) -> Progress:
        """A throttled callback publishing RUNNING events (at most one per interval); past
        ``deadline`` (monotonic seconds) it raises DeadlineExceeded instead."""
        last = [0.0]
        paused_until = [0.0]

        def report(fraction: float, message: str = "") -> None:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise DeadlineExceeded(
                    f"{self.stage} ran past its time limit of {self.time_limit:g} s "
                    f"(at {fraction:.0%}); the job is not retried: submit a smaller model or "
                    "dataset, fewer steps, or raise MODELGUARD_STAGE_TIME_LIMIT_SECONDS"
                )
            if now < paused_until[0]:
                return
            if now - last[0] < self.min_progress_interval and fraction < 1.0:
                return
            last[0] = now
            try:
                self.event(
                    audit_id,
                    common_pb2.STAGE_STATE_RUNNING,
                    progress=max(0.0, min(1.0, fraction)),
                    message=message,
                )
            except Exception as err:  # advisory: the outcome event is what must get through
                if not is_transient(err):
                    raise
                log.warning("progress of %s for %s not published: %s", self.stage, audit_id, err)
                paused_until[0] = time.monotonic() + PROGRESS_PAUSE_AFTER_FAILURE_S

        return report

    def run(
        self, audit_id: str, work: Callable[[Progress], StageOutcome], attempt: int = 1
    ) -> None:
        """Run one stage job and publish its outcome; see the module docstring.
        ``attempt`` is the bus's count for this record (`Message.attempt`). What is logged
        meanwhile on this thread carries the audit, the stage and the attempt, and so does
        the job's span (when tracing is on)."""
        with (
            job_context(audit_id=audit_id, stage=self.stage, attempt=attempt),
            span(f"stage {self.stage}"),
        ):
            self._run(audit_id, work, attempt)

    def _run(self, audit_id: str, work: Callable[[Progress], StageOutcome], attempt: int) -> None:
        last_attempt = attempt >= self.max_attempts
        started = time.perf_counter()
        deadline = time.monotonic() + self.time_limit if self.time_limit > 0 else None
        self.metrics.in_flight.inc()
        try:
            self.event(audit_id, common_pb2.STAGE_STATE_RUNNING, message="started")
            log.info("%s started for audit %s (attempt %d)", self.stage, audit_id, attempt)
            outcome = work(self.progress(audit_id, deadline))
        except ModelGuardError as err:
            if err.transient:
                # an outage is not the job's fault: the bus retries without using an attempt
                self.metrics.jobs.labels("waiting").inc()
                raise
            if not err.permanent and not last_attempt:
                self.metrics.jobs.labels("retried").inc()
                raise
            self._fail(audit_id, err)
            if not err.permanent:
                raise
            return
        except Exception as err:
            if not last_attempt:
                self.metrics.jobs.labels("retried").inc()
                raise
            self._fail(audit_id, err)
            raise
        finally:
            self.metrics.in_flight.dec()
        state = common_pb2.STAGE_STATE_SKIPPED if outcome.skipped else common_pb2.STAGE_STATE_DONE
        self.event(
            audit_id,
            state,
            progress=1.0,
            message=outcome.message,
            result=outcome.result,
            summary=outcome.summary,
        )
        self.metrics.jobs.labels("skipped" if outcome.skipped else "succeeded").inc()
        log.info(
            "%s %s for audit %s in %.1f s",
            self.stage,
            "skipped" if outcome.skipped else "done",
            audit_id,
            time.perf_counter() - started,
        )
        self.metrics.job_seconds.observe(time.perf_counter() - started)

    def _fail(self, audit_id: str, err: Exception) -> None:
        """Publish FAILED; when the bus is down, raise its (transient) error instead, so
        the bus retries the job rather than dead-letter it with the failure unreported
        (which would leave the audit waiting forever)."""
        log.warning("%s failed for audit %s: %s", self.stage, audit_id, err)
        self.event(audit_id, common_pb2.STAGE_STATE_FAILED, message=str(err), error=err)
        self.metrics.jobs.labels("failed").inc()


def run_audit_stage(
    reporter: StageReporter,
    message: Message,
    message_type: type[M],
    audit_id: Callable[[M], str],
    handle: Callable[[M, Progress], StageOutcome],
    *,
    tenant: Callable[[M], str],
) -> None:
    """A stage handler's Kafka entry: decode ``message`` as ``message_type`` (malformed
    bytes are bad input), find its audit, and run ``handle`` under ``reporter`` (progress,
    outcome on audit.events, attempts, time limit). What the stage stores is encrypted
    with the audit's ``tenant``'s key (when encryption is on); what it logs carries the
    tenant."""
    parsed = parse_message(message.value, message_type)
    audit = audit_id(parsed)
    if not audit:
        raise InvalidInput(f"{message_type.__name__} message without an audit id")
    with writing_for(tenant(parsed)), job_context(tenant=tenant(parsed)):
        reporter.run(audit, lambda progress: handle(parsed, progress), message.attempt)
