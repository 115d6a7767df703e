"""Wiring of result-mapper: gRPC API (Map and the Open Inference Protocol) and the
carrier-events worker."""

from __future__ import annotations

import os
import socket

from modelguard.config import ResultMapperSettings
from modelguard.metrics import ServiceMetrics
from modelguard.proto.inference import grpc_predict_v2_pb2_grpc
from modelguard.proto.modelguard.v1 import result_mapper_pb2_grpc
from modelguard.runtime import Runtime, ServiceApp
from modelguard.services.result_mapper.handler import CarrierEventsHandler
from modelguard.services.result_mapper.inference import InferenceServicer
from modelguard.services.result_mapper.service import ResultMapperService
from modelguard.services.result_mapper.servicer import ResultMapperServicer
from modelguard.topics import CARRIER_READY, CARRIER_REVOKED

NAME = "result-mapper"


def build(settings: ResultMapperSettings, runtime: Runtime, metrics: ServiceMetrics) -> ServiceApp:
    service = ResultMapperService(runtime, settings, metrics)
    app = ServiceApp(NAME, settings, runtime, metrics)
    app.components["service"] = service
    app.add_servicer(
        result_mapper_pb2_grpc.add_ResultMapperServicer_to_server,
        ResultMapperServicer(service),
        "modelguard.v1.ResultMapper",
        trace_ratio=settings.trace_ratio,  # the hot path: sampled, not traced every call
    )
    # the same mapping for Triton/KServe clients (Open Inference Protocol)
    app.add_servicer(
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
        InferenceServicer(service),
        "inference.GRPCInferenceService",
        trace_ratio=settings.trace_ratio,
    )
    # Every replica must see every carrier event (a revocation applies everywhere at
    # once), so each process reads them in a consumer group of its own, from the start.
    group = settings.group or f"{NAME}-{socket.gethostname()}-{os.getpid()}"
    app.add_worker([CARRIER_READY, CARRIER_REVOKED], CarrierEventsHandler(service), group=group)
    return app


def batch_scheduling() -> bool:
    """Put every thread of this process under SCHED_BATCH (threads started later inherit
    it from the thread that starts them); see ``ResultMapperSettings.batch_scheduling``.
    Returns whether it applied."""
    setter = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_BATCH", None)
    if setter is None or policy is None:
        return False
    try:
        for tid in os.listdir("/proc/self/task"):
            setter(int(tid), policy, os.sched_param(0))
    except OSError:
        return False
    return True


def main() -> None:
    from modelguard.config import ResultMapperSettings
    from modelguard.services.launcher import run_service

    if ResultMapperSettings().batch_scheduling:
        batch_scheduling()  # before the gRPC server starts its threads
    run_service(NAME)


if __name__ == "__main__":
    main()
