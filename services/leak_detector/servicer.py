"""Thin gRPC servicer of leak-detector."""

from __future__ import annotations

import grpc

from modelguard.errors import UnsafeArtifact
from modelguard.jobdata import load_model_spec
from modelguard.proto.modelguard.v1 import common_pb2, leak_detector_pb2, leak_detector_pb2_grpc
from modelguard.services.leak_detector.service import LeakDetectorService
from modelguard.status import service_status


class LeakDetectorServicer(leak_detector_pb2_grpc.LeakDetectorServicer):
    def __init__(self, service: LeakDetectorService) -> None:
        self.service = service

    def ScanModel(
        self, request: leak_detector_pb2.ScanModelRequest, context: grpc.ServicerContext
    ) -> leak_detector_pb2.ScanModelResponse:
        runtime = self.service.runtime
        try:
            model, _spec = load_model_spec(runtime.store, request.model, runtime.platform)
        except UnsafeArtifact:
            self.service.refused.inc()
            raise
        verdict, summary = self.service.scan(model)
        return leak_detector_pb2.ScanModelResponse(
            layers=[
                leak_detector_pb2.LayerStatistics(
                    **{
                        k: layer[k]
                        for k in (
                            "layer",
                            "count",
                            "min",
                            "max",
                            "mean",
                            "variance",
                            "skewness",
                            "kurtosis",
                            "tail_fraction",
                        )
                    }
                )
                for layer in summary["layers"]
            ],
            verdict=verdict.verdict,
            score=verdict.score,
            evidence=[
                leak_detector_pb2.Evidence(layer=e["layer"], feature=e["feature"], value=e["value"])
                for e in summary["evidence"]
            ],
            seconds=verdict.seconds,
        )

    def GetStatus(
        self, request: common_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ServiceStatus:
        return service_status(self.service.metrics)
