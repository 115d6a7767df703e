"""neuron-scoring's ranking is the one the rollback repair computes itself on the same
inputs (same split, same probe), Shapley values included when estimated; the JSON
document and the summary say which data it was computed on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from modelguard.bus.memory import MemoryBus
from modelguard.config import NeuronScoringSettings, PlatformSettings
from modelguard.formats.loader import LoadedModel
from modelguard.jobdata import ModelAndData
from modelguard.metrics import ServiceMetrics
from modelguard.repair import rollback
from modelguard.repair.registry import repair
from modelguard.repair.scoring import NeuronRanking, NeuronScores
from modelguard.runtime import Runtime
from modelguard.services.neuron_scoring.service import NeuronScoringService
from modelguard.signing import Signer
from modelguard.store.local import LocalStore
from tests.unit import repairkit


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def service(tmp_path: Path) -> Iterator[NeuronScoringService]:
    bus = MemoryBus()
    runtime = Runtime(
        PlatformSettings(store_dir=tmp_path), bus, LocalStore(tmp_path), Signer.generate()
    )
    yield NeuronScoringService(
        runtime, NeuronScoringSettings(), ServiceMetrics(CollectorRegistry(), "neuron-scoring")
    )
    bus.close()


@pytest.fixture(scope="module")
def inputs() -> ModelAndData:
    model = repairkit.backdoored()
    return ModelAndData(
        LoadedModel(model, "torch-zip", "", 4), repairkit.clean_data(), repairkit.SPEC
    )


def test_stage_ranking_equals_what_rollback_computes_itself(
    service: NeuronScoringService, inputs: ModelAndData, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = service.score(inputs, [repairkit.trigger()], shapley=False)
    ranking = stored.ranking
    assert ranking.layer == "fc1" and ranking.neurons == 24 and ranking.shapley == ()
    assert ranking.data_split == "tune:0.3:seed=0"
    assert stored.summary["data_split"] == ranking.data_split
    document = json.loads(service.runtime.store.get_blob(stored.ref))
    assert document["data_split"] == ranking.data_split
    assert tuple(document["activation_ranking"]) == ranking.activation_ranking

    computed: list[NeuronScores] = []
    real = rollback.score_neurons

    def spy(*args: Any, **kwargs: Any) -> NeuronScores:
        computed.append(real(*args, **kwargs))
        return computed[-1]

    monkeypatch.setattr(rollback, "score_neurons", spy)
    assert inputs.data is not None
    repair(inputs.model.module, inputs.data, inputs.spec, [repairkit.trigger()], mode="rollback")
    assert len(computed) == 1
    assert NeuronRanking.from_scores(computed[0], data_split=ranking.data_split) == ranking
    assert torch.equal(computed[0].activation, stored.scores.activation)


def test_shapley_values_travel_in_the_ranking(
    service: NeuronScoringService, inputs: ModelAndData
) -> None:
    stored = service.score(inputs, [repairkit.trigger()], shapley=True, seed=1)
    assert stored.shapley is not None
    assert stored.ranking.shapley == tuple(float(v) for v in stored.shapley.values)
    assert len(stored.ranking.shapley) == stored.ranking.neurons
    assert stored.summary["model_evaluations"] == stored.shapley.evaluations > 0
