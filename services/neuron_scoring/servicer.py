"""Thin gRPC servicer of neuron-scoring."""

from __future__ import annotations

import grpc

from modelguard.convert import ref_from_proto
from modelguard.detection.triggers import load_triggers
from modelguard.errors import InvalidInput
from modelguard.jobdata import load_inputs
from modelguard.proto.modelguard.v1 import common_pb2, neuron_scoring_pb2, neuron_scoring_pb2_grpc
from modelguard.services.neuron_scoring.service import NeuronScoringService
from modelguard.status import service_status


class NeuronScoringServicer(neuron_scoring_pb2_grpc.NeuronScoringServicer):
    def __init__(self, service: NeuronScoringService) -> None:
        self.service = service

    def ScoreNeurons(
        self, request: neuron_scoring_pb2.ScoreNeuronsRequest, context: grpc.ServicerContext
    ) -> neuron_scoring_pb2.ScoreNeuronsResponse:
        runtime = self.service.runtime
        inputs = load_inputs(runtime.store, request.model, request.data, runtime.platform)
        if inputs.data is None:
            raise InvalidInput("a clean dataset reference (data) is required")
        triggers = load_triggers(
            runtime.store.get_blob(ref_from_proto(request.triggers, "triggers")),
            [request.target_label],
        )
        stored = self.service.score(inputs, triggers, layer=request.layer, shapley=request.shapley)
        scores, shapley = stored.scores, stored.shapley
        return neuron_scoring_pb2.ScoreNeuronsResponse(
            layer=scores.layer,
            neurons=[
                neuron_scoring_pb2.NeuronScore(
                    index=i,
                    activation=float(scores.activation[i]),
                    weight=float(scores.weight[i]),
                    shapley=float(shapley.values[i]) if shapley is not None else 0.0,
                    shapley_ci=float(shapley.ci[i]) if shapley is not None else 0.0,
                )
                for i in range(len(scores.activation))
            ],
            activation_ranking=[int(i) for i in scores.activation_ranking],
            weight_ranking=[int(i) for i in scores.weight_ranking],
            model_evaluations=int(shapley.evaluations) if shapley is not None else 0,
        )

    def GetStatus(
        self, request: common_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ServiceStatus:
        return service_status(self.service.metrics)
