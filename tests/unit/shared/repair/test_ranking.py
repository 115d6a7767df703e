"""The neuron ranking the repair consumes: `rank_on_tune_split` (what neuron-scoring runs)
gives exactly the ranking the rollback repair computes itself; given that ranking the
repair does not score again and decides exactly as before; a ranking of another site or
trigger set is refused; the bus message converts both ways."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from modelguard.convert_ranking import carried_ranking, ranking_from_proto, ranking_to_proto
from modelguard.errors import InvalidInput
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.repair import rollback
from modelguard.repair.context import split_label
from modelguard.repair.registry import repair
from modelguard.repair.result import RepairResult
from modelguard.repair.rollback import rank_on_tune_split
from modelguard.repair.scoring import NeuronRanking, NeuronScores, interleave
from tests.unit import repairkit


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def eager() -> nn.Module:
    return repairkit.backdoored()


def scripted(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    loaded: nn.Module = torch.jit.load(buffer)
    return loaded.eval()


class Spy:
    """Records `score_neurons` calls made by the rollback module."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.results: list[NeuronScores] = []
        real = rollback.score_neurons

        def spy(*args: Any, **kwargs: Any) -> NeuronScores:
            scores = real(*args, **kwargs)
            self.results.append(scores)
            return scores

        monkeypatch.setattr(rollback, "score_neurons", spy)


def run(model: nn.Module, ranking: NeuronRanking | None = None) -> RepairResult:
    return repair(
        model, repairkit.clean_data(), repairkit.SPEC, [repairkit.trigger()], ranking=ranking
    )


def same_decisions(a: RepairResult, b: RepairResult) -> None:
    assert a.pruned == b.pruned
    assert [s.to_dict() for s in a.curve] == [s.to_dict() for s in b.curve]
    assert a.before == b.before and a.after == b.after
    assert a.notes == b.notes and a.finetune_steps == b.finetune_steps
    assert a.model is not None and b.model is not None
    for (name, x), (_, y) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("kind", ["eager", "torchscript"])
def test_stage_ranking_is_the_one_rollback_computes_and_gives_the_same_repair(
    eager: nn.Module, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = eager if kind == "eager" else scripted(eager)
    # what neuron-scoring publishes
    scores, scored_on, split = rank_on_tune_split(
        model, repairkit.clean_data(), repairkit.SPEC, [repairkit.trigger()]
    )
    assert split == split_label(0.3, 0) == "tune:0.3:seed=0"
    assert len(scored_on) == 84  # 70% of 120
    stage = NeuronRanking.from_scores(scores, data_split=split)
    assert (stage.layer, stage.neurons, stage.target_labels) == ("fc1", 24, (repairkit.TARGET,))
    assert stage.source == ("hook" if kind == "eager" else "graph")

    # the repair scoring for itself
    spy = Spy(monkeypatch)
    own = run(model)
    assert len(spy.results) == 1
    computed = spy.results[0]
    assert NeuronRanking.from_scores(computed, data_split=split) == stage
    for field in ("activation", "activation_clean", "weight"):
        assert torch.equal(getattr(computed, field), getattr(scores, field)), field
    assert len(own.curve) > 10  # many decisions, each following the order

    # the repair given the stage's ranking: no scoring, the very same decisions and model
    spy.results.clear()
    carried = run(model, stage)
    assert spy.results == []
    same_decisions(own, carried)
    assert carried.curve[0].index == stage.interleaved()[0]


def test_ranking_of_another_site_or_trigger_set_is_refused(eager: nn.Module) -> None:
    scores, _, split = rank_on_tune_split(
        eager, repairkit.clean_data(), repairkit.SPEC, [repairkit.trigger()]
    )
    good = NeuronRanking.from_scores(scores, data_split=split)
    other_layer = NeuronRanking("fc2", 4, (0, 1, 2, 3), (3, 2, 1, 0))
    with pytest.raises(
        InvalidInput, match=r"ranking is of fc2 \(4 neurons\); the repair prunes fc1"
    ):
        run(eager, other_layer)
    narrower = NeuronRanking("fc1", 23, tuple(range(23)), tuple(range(23)))
    with pytest.raises(InvalidInput, match="23 neurons"):
        run(eager, narrower)
    other_labels = NeuronRanking(
        "fc1", 24, good.activation_ranking, good.weight_ranking, target_labels=(3,)
    )
    with pytest.raises(InvalidInput, match="target labels"):
        run(eager, other_labels)


def test_ranking_from_other_data_is_used_with_a_note(
    eager: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranking = NeuronRanking(
        "fc1", 24, tuple(range(24)), tuple(reversed(range(24))), data_split="all"
    )
    spy = Spy(monkeypatch)
    result = run(eager, ranking)
    assert spy.results == []
    assert result.curve[0].index == 0 and result.curve[1].index == 23
    assert any("computed on all" in note for note in result.notes)


def test_small_data_is_scored_whole() -> None:
    scores, scored_on, split = rank_on_tune_split(
        repairkit.SmallNet(), repairkit.clean_data(12), repairkit.SPEC, [repairkit.trigger()]
    )
    assert split == "all" and len(scored_on) == 12 and scores.neurons == 24


def test_a_ranking_must_be_permutations_of_its_width() -> None:
    NeuronRanking("fc1", 3, (2, 0, 1), (0, 1, 2), shapley=(0.1, 0.2, 0.3))
    for bad in (
        {"activation_ranking": (0, 0, 1)},
        {"weight_ranking": (0, 1)},
        {"activation_ranking": (0, 1, 3)},
        {"shapley": (0.1,)},
        {"neurons": 0, "activation_ranking": (), "weight_ranking": ()},
        {"layer": ""},
    ):
        fields: dict[str, Any] = {
            "layer": "fc1",
            "neurons": 3,
            "activation_ranking": (2, 0, 1),
            "weight_ranking": (0, 1, 2),
            **bad,
        }
        with pytest.raises(InvalidInput):
            NeuronRanking(**fields)
    # a huge claimed width with empty rankings fails on the lengths, allocating nothing
    with pytest.raises(InvalidInput, match="not a permutation"):
        NeuronRanking("fc1", 2**31 - 1, (), ())


def test_interleave_accepts_tensors_and_sequences() -> None:
    assert interleave(torch.tensor([2, 0, 1]), torch.tensor([0, 2, 1])) == [2, 0, 1]
    assert interleave((3, 1, 0, 2), [1, 2, 3, 0]) == [3, 1, 2, 0]
    assert NeuronRanking("x", 3, (2, 0, 1), (0, 2, 1)).interleaved() == [2, 0, 1]


def test_proto_round_trip() -> None:
    ranking = NeuronRanking(
        "fc:in", 3, (2, 0, 1), (0, 1, 2), (0.5, -0.25, 0.0), "graph", (7, 1), "tune:0.3:seed=0"
    )
    message = jobs_pb2.NeuronsScored(ranking=ranking_to_proto(ranking))
    wire = jobs_pb2.NeuronsScored.FromString(message.SerializeToString())
    assert carried_ranking(wire) == ranking
    assert ranking_from_proto(wire.ranking) == ranking
    assert carried_ranking(jobs_pb2.NeuronsScored()) is None  # a message from before the field
    broken = jobs_pb2.NeuronsScored(
        ranking=jobs_pb2.NeuronRanking(layer="fc1", neurons=2, activation_ranking=[1, 1])
    )
    with pytest.raises(InvalidInput):
        carried_ranking(broken)
