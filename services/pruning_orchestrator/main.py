"""Wiring of the pruning-orchestrator: gRPC API (and its HTTP/JSON face), stage-event
worker, repair worker."""

from __future__ import annotations

from modelguard.config import PruningOrchestratorSettings
from modelguard.errors import InvalidInput
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import pruning_orchestrator_pb2_grpc
from modelguard.runtime import Runtime, ServiceApp
from modelguard.services.pruning_orchestrator.handler import EventsHandler, RepairHandler
from modelguard.services.pruning_orchestrator.http_api import HttpApi
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
    if settings.http_port >= 0:
        if runtime.platform.tls_cert_file:
            # bearer tokens must not cross the network in clear beside a TLS gRPC API
            raise InvalidInput(
                "the HTTP API serves plain HTTP and TLS is configured: terminate TLS in front "
                "of it (an ingress) and bind it to loopback, or set "
                "MODELGUARD_PRUNING_ORCHESTRATOR_HTTP_PORT=-1"
            )
        http = HttpApi(orchestrator, app.tokens, settings.host, settings.http_port)
        app.components["http"] = http
        app.on_start.append(http.start)
        app.on_stop.append(http.stop)
    return app


def main() -> None:
    from modelguard.services.launcher import run_service

    run_service(NAME)


if __name__ == "__main__":
    main()
