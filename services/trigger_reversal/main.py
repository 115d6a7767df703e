"""Wiring of trigger-reversal: gRPC API and the audit workers (reversal, robustness)."""

from __future__ import annotations

from modelguard.config import TriggerReversalSettings
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import trigger_reversal_pb2_grpc
from modelguard.runtime import Runtime, ServiceApp
from modelguard.services.trigger_reversal.handler import AuditHandler, RobustnessHandler
from modelguard.services.trigger_reversal.service import (
    ROBUSTNESS_GROUP_SUFFIX,
    RobustnessStage,
    TriggerReversalService,
)
from modelguard.services.trigger_reversal.servicer import TriggerReversalServicer
from modelguard.stage import StageReporter
from modelguard.topics import AUDIT_REQUESTED, STAGE_ROBUSTNESS, STAGE_TRIGGER_REVERSAL

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
    reporter = StageReporter.for_platform(
        runtime.bus, STAGE_TRIGGER_REVERSAL, metrics, runtime.platform
    )
    app.add_worker([AUDIT_REQUESTED], AuditHandler(service, reporter))
    # The robustness stage reads the same requests in a group of its own: its attempts,
    # time limit and outcome are its own, and it runs beside the reversal.
    robustness = RobustnessStage(runtime, settings, metrics)
    app.components["robustness"] = robustness
    app.add_worker(
        [AUDIT_REQUESTED],
        RobustnessHandler(
            robustness,
            StageReporter.for_platform(runtime.bus, STAGE_ROBUSTNESS, metrics, runtime.platform),
        ),
        group=(settings.group or NAME) + ROBUSTNESS_GROUP_SUFFIX,
    )
    return app


def main() -> None:
    from modelguard.services.launcher import run_service

    run_service(NAME)


if __name__ == "__main__":
    main()
