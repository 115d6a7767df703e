"""Thin gRPC servicer of trigger-reversal."""

from __future__ import annotations

import grpc

from modelguard.convert import ref_to_proto
from modelguard.errors import InvalidInput
from modelguard.jobdata import load_inputs
from modelguard.proto.modelguard.v1 import (
    common_pb2,
    trigger_reversal_pb2,
    trigger_reversal_pb2_grpc,
)
from modelguard.services.trigger_reversal.service import TriggerReversalService
from modelguard.status import service_status


class TriggerReversalServicer(trigger_reversal_pb2_grpc.TriggerReversalServicer):
    def __init__(self, service: TriggerReversalService) -> None:
        self.service = service

    def ReverseTriggers(
        self, request: trigger_reversal_pb2.ReverseTriggersRequest, context: grpc.ServicerContext
    ) -> trigger_reversal_pb2.ReverseTriggersResponse:
        runtime = self.service.runtime
        inputs = load_inputs(runtime.store, request.model, request.data, runtime.platform)
        if inputs.data is None:
            raise InvalidInput("a clean dataset reference (data) is required")
        stored = self.service.reverse(
            inputs,
            steps=request.steps,
            seed=request.seed,
            rule=request.rule,
            detector=request.detector,
        )
        result = stored.result
        return trigger_reversal_pb2.ReverseTriggersResponse(
            labels=[
                trigger_reversal_pb2.LabelTrigger(
                    label=item.label,
                    l1_norm=item.l1_norm,
                    anomaly_index=item.anomaly_index,
                    attack_success=item.attack_success,
                    reached_threshold=item.reached_threshold,
                )
                for item in result.labels
            ],
            flagged=list(result.flagged),
            infected=result.verdict == "infected",
            triggers=ref_to_proto(stored.triggers),
            seconds=result.seconds,
        )

    def GetStatus(
        self, request: common_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ServiceStatus:
        return service_status(self.service.metrics)
