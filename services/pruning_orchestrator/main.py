"""Wiring of the pruning-orchestrator: gRPC API, stage-event worker, repair worker."""

from __future__ import annotations

from modelguard.config import PruningOrchestratorSettings
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import pruning_orchestrator_pb2_grpc
from modelguard.runtime import Runtime, ServiceApp
from modelguard.services.pruning_orchestrator.handler import EventsHandler, RepairHandler
from modelguard.services.pruning_orchestrator.service import Orchestrator
from modelguard.services.pruning_orchestrator.servicer import PruningOrchestratorServicer
from modelguard.stage import StageReporter
from modelguard.topics import AUDIT_EVENTS, NEURONS_SCORED, STAGE_REPAIR

NAME = "pruning-orchestrator"


def build(
    settings: PruningOrchestratorSettings, runtime: Runtime, metrics: ServiceMetrics
) -> ServiceApp:
    orchestrator = Orchestrator(runtime, settings, metrics)
    app = ServiceApp(NAME, settings, runtime, metrics)
    app.components["orchestrator"] = orchestrator
    app.add_servicer(
        pruning_orchestrator_pb2_grpc.add_PruningOrchestratorServicer_to_server,
        PruningOrchestratorServicer(orchestrator),
        "modelguard.v1.PruningOrchestrator",
    )
    # Separate groups: a long repair must not hold up the audit-state events.
    app.add_worker([AUDIT_EVENTS], EventsHandler(orchestrator), group=f"{NAME}-events")
    reporter = StageReporter.for_platform(runtime.bus, STAGE_REPAIR, metrics, runtime.platform)
    app.add_worker([NEURONS_SCORED], RepairHandler(orchestrator, reporter), group=f"{NAME}-repair")
    return app


def main() -> None:
    from modelguard.services.launcher import run_service

    run_service(NAME)


if __name__ == "__main__":
    main()
