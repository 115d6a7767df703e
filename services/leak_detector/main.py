"""Wiring of leak-detector: gRPC API and the audit worker."""

from __future__ import annotations

from modelguard.config import LeakDetectorSettings
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import leak_detector_pb2_grpc
from modelguard.runtime import Runtime, ServiceApp
from modelguard.services.leak_detector.handler import AuditHandler
from modelguard.services.leak_detector.service import LeakDetectorService
from modelguard.services.leak_detector.servicer import LeakDetectorServicer
from modelguard.stage import StageReporter
from modelguard.topics import AUDIT_REQUESTED, STAGE_LEAK_DETECTOR

NAME = "leak-detector"


def build(settings: LeakDetectorSettings, runtime: Runtime, metrics: ServiceMetrics) -> ServiceApp:
    service = LeakDetectorService(runtime, settings, metrics)
    app = ServiceApp(NAME, settings, runtime, metrics)
    app.components["service"] = service
    app.add_servicer(
        leak_detector_pb2_grpc.add_LeakDetectorServicer_to_server,
        LeakDetectorServicer(service),
        "modelguard.v1.LeakDetector",
    )
    reporter = StageReporter.for_platform(
        runtime.bus, STAGE_LEAK_DETECTOR, metrics, runtime.platform
    )
    app.add_worker([AUDIT_REQUESTED], AuditHandler(service, reporter))
    return app


def main() -> None:
    from modelguard.services.launcher import run_service

    run_service(NAME)


if __name__ == "__main__":
    main()
