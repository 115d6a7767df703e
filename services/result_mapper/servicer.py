"""Thin gRPC servicer of result-mapper: Map and its batched streaming form."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from modelguard.errors import ModelGuardError
from modelguard.proto.modelguard.v1 import common_pb2, result_mapper_pb2, result_mapper_pb2_grpc
from modelguard.services.result_mapper.service import ResultMapperService
from modelguard.status import service_status


class ResultMapperServicer(result_mapper_pb2_grpc.ResultMapperServicer):
    def __init__(self, service: ResultMapperService) -> None:
        self.service = service

    def _map(self, request: result_mapper_pb2.MapRequest) -> result_mapper_pb2.MapResponse:
        try:
            result = self.service.map(
                request.user_id, request.credential, request.pseudo_output, request.rows
            )
        except ModelGuardError as err:
            self.service.refusals.labels(err.code.name).inc()
            raise
        return result_mapper_pb2.MapResponse(
            labels=result.labels.tolist(),
            probabilities=result.probabilities_bytes(),
            classes=result.classes,
            generation=result.generation,
        )

    def Map(
        self, request: result_mapper_pb2.MapRequest, context: grpc.ServicerContext
    ) -> result_mapper_pb2.MapResponse:
        return self._map(request)

    def MapStream(
        self,
        request_iterator: Iterator[result_mapper_pb2.MapRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[result_mapper_pb2.MapResponse]:
        # A refused request ends the stream with its status: the client knows which one
        # (responses come in order) and nothing after it is mapped unasked.
        for request in request_iterator:
            yield self._map(request)

    def GetStatus(
        self, request: common_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ServiceStatus:
        return service_status(self.service.metrics)
