"""Kafka handler: audit requested -> leak verdict (an audit stage event)."""

from __future__ import annotations

from modelguard.bus.base import Message
from modelguard.errors import UnsafeArtifact
from modelguard.jobdata import load_model_spec
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.services.leak_detector.service import LeakDetectorService
from modelguard.stage import Progress, StageOutcome, StageReporter, run_audit_stage


class AuditHandler:
    def __init__(self, service: LeakDetectorService, reporter: StageReporter) -> None:
        self.service = service
        self.reporter = reporter

    def __call__(self, message: Message) -> None:
        run_audit_stage(
            self.reporter,
            message,
            jobs_pb2.AuditRequested,
            lambda m: m.audit_id,
            self.handle,
            tenant=lambda m: m.tenant,
        )

    def handle(self, request: jobs_pb2.AuditRequested, progress: Progress) -> StageOutcome:
        runtime = self.service.runtime
        try:
            model, _spec = load_model_spec(runtime.store, request.model, runtime.platform)
        except UnsafeArtifact:
            self.service.refused.inc()
            raise
        verdict, summary = self.service.scan(model)
        ref = self.service.store_summary(summary)
        return StageOutcome(
            result=ref,
            summary=summary,
            message=f"verdict {verdict.verdict} (score {verdict.score:.3g})",
        )
