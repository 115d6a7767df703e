"""Conversions between the ``NeuronRanking`` bus message and its domain twin
`modelguard.repair.scoring.NeuronRanking` (written by neuron-scoring, read by the
pruning-orchestrator). Belongs with `modelguard.convert`; a module of its own while that one
is being reworked. Protobuf never enters algorithm code."""

from __future__ import annotations

from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.repair.scoring import NeuronRanking


def ranking_to_proto(ranking: NeuronRanking) -> jobs_pb2.NeuronRanking:
    return jobs_pb2.NeuronRanking(
        layer=ranking.layer,
        neurons=ranking.neurons,
        activation_ranking=list(ranking.activation_ranking),
        weight_ranking=list(ranking.weight_ranking),
        shapley=list(ranking.shapley),
        source=ranking.source,
        target_labels=list(ranking.target_labels),
        data_split=ranking.data_split,
    )


def ranking_from_proto(msg: jobs_pb2.NeuronRanking) -> NeuronRanking:
    """A malformed ranking (not permutations, wrong lengths) raises ``InvalidInput``."""
    return NeuronRanking(
        layer=msg.layer,
        neurons=msg.neurons,
        activation_ranking=tuple(msg.activation_ranking),
        weight_ranking=tuple(msg.weight_ranking),
        shapley=tuple(msg.shapley),
        source=msg.source,
        target_labels=tuple(msg.target_labels),
        data_split=msg.data_split,
    )


def carried_ranking(scored: jobs_pb2.NeuronsScored) -> NeuronRanking | None:
    """The ranking a ``NeuronsScored`` message carries; None when it carries none (a
    message from before the field existed)."""
    return ranking_from_proto(scored.ranking) if scored.HasField("ranking") else None
