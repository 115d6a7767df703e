"""Wiring of neuron-scoring: gRPC API and the triggers-reversed worker."""

from __future__ import annotations

from modelguard.config import NeuronScoringSettings
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import neuron_scoring_pb2_grpc
from modelguard.runtime import Runtime, ServiceApp
from modelguard.services.neuron_scoring.handler import TriggersHandler
from modelguard.services.neuron_scoring.service import NeuronScoringService
from modelguard.services.neuron_scoring.servicer import NeuronScoringServicer
from modelguard.stage import StageReporter
from modelguard.topics import STAGE_NEURON_SCORING, TRIGGERS_REVERSED

NAME = "neuron-scoring"


def build(settings: NeuronScoringSettings, runtime: Runtime, metrics: ServiceMetrics) -> ServiceApp:
    service = NeuronScoringService(runtime, settings, metrics)
    app = ServiceApp(NAME, settings, runtime, metrics)
    app.components["service"] = service
    app.add_servicer(
        neuron_scoring_pb2_grpc.add_NeuronScoringServicer_to_server,
        NeuronScoringServicer(service),
        "modelguard.v1.NeuronScoring",
    )
    reporter = StageReporter.for_platform(
        runtime.bus, STAGE_NEURON_SCORING, metrics, runtime.platform
    )
    app.add_worker([TRIGGERS_REVERSED], TriggersHandler(service, reporter))
    return app


def main() -> None:
    from modelguard.services.launcher import run_service

    run_service(NAME)


if __name__ == "__main__":
    main()
