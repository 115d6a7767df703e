"""Wiring of trigger-reversal: gRPC API and the audit worker."""

from __future__ import annotations

from services.trigger_reversal.handler import AuditHandler
from services.trigger_reversal.service import TriggerReversalService
from services.trigger_reversal.servicer import TriggerReversalServicer
from shared.config import TriggerReversalSettings
from shared.metrics import ServiceMetrics
from shared.proto.modelguard.v1 import trigger_reversal_pb2_grpc
from shared.runtime import Runtime, ServiceApp
from shared.stage import StageReporter
from shared.topics import AUDIT_REQUESTED, STAGE_TRIGGER_REVERSAL

NAME = "trigger-reversal"


def build(
    settings: TriggerReversalSettings, runtime: Runtime, metrics: ServiceMetrics
) -> ServiceApp:
    service = TriggerReversalService(runtime, settings, metrics)
    app = ServiceApp(NAME, settings, runtime, metrics)
    app.components["service"] = service
    app.add_servicer(
        trigger_reversal_pb2_grpc.add_TriggerReversalServicer_to_server,
        TriggerReversalServicer(service),
        "modelguard.v1.TriggerReversal",
    )
    reporter = StageReporter(
        runtime.bus,
        STAGE_TRIGGER_REVERSAL,
        metrics,
        max_attempts=runtime.platform.job_max_attempts,
        time_limit=runtime.platform.stage_time_limit_seconds,
    )
    app.add_worker([AUDIT_REQUESTED], AuditHandler(service, reporter))
    return app


def main() -> None:
    from services.launcher import run_service

    run_service(NAME)


if __name__ == "__main__":
    main()
