from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from modelguard.errors import InvalidInput
from modelguard.grpc_server import GrpcServer
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import (
    common_pb2,
    trigger_reversal_pb2,
    trigger_reversal_pb2_grpc,
)


class Failing(trigger_reversal_pb2_grpc.TriggerReversalServicer):
    def ReverseTriggers(
        self, request: trigger_reversal_pb2.ReverseTriggersRequest, context: grpc.ServicerContext
    ) -> trigger_reversal_pb2.ReverseTriggersResponse:
        raise InvalidInput("the input spec is missing: declare --input-shape")

    def GetStatus(
        self, request: common_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ServiceStatus:
        raise RuntimeError("secret internal detail")


@pytest.fixture()
def server() -> Iterator[GrpcServer]:
    metrics = ServiceMetrics(CollectorRegistry(), "trigger-reversal")
    srv = GrpcServer(metrics, port=0, metrics_port=0)
    srv.register(
        trigger_reversal_pb2_grpc.add_TriggerReversalServicer_to_server,
        Failing(),
        "modelguard.v1.TriggerReversal",
    )
    srv.start()
    yield srv
    srv.stop(0.5)


def test_project_errors_map_to_status_codes_with_the_message(server: GrpcServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = trigger_reversal_pb2_grpc.TriggerReversalStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ReverseTriggers(trigger_reversal_pb2.ReverseTriggersRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--input-shape" in caught.value.details()


def test_unexpected_errors_are_internal_without_leaking_details(server: GrpcServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = trigger_reversal_pb2_grpc.TriggerReversalStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetStatus(common_pb2.StatusRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in caught.value.details()
        assert "incident" in caught.value.details()


def test_health_reflection_and_request_metrics(server: GrpcServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "modelguard.v1.TriggerReversal"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "modelguard.v1.TriggerReversal" in names
        stub = trigger_reversal_pb2_grpc.TriggerReversalStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.ReverseTriggers(trigger_reversal_pb2.ReverseTriggersRequest(), timeout=5)
    registry = server.metrics.registry
    count = registry.get_sample_value(
        "modelguard_trigger_reversal_grpc_requests_total",
        {"method": "ReverseTriggers", "code": "INVALID_ARGUMENT"},
    )
    assert count == 1.0
    assert server.metrics_port > 0


def test_stop_marks_not_serving(server: GrpcServer) -> None:
    server.set_serving(False)
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
