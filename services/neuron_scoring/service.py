"""neuron-scoring, transport-neutral: rank a layer's neurons by activation under the
reversed trigger and by weight magnitude, optionally with Shapley values.

The rankings are computed exactly as the rollback repair would compute them itself (on the
fine-tuning part of its clean-data split, `modelguard.repair.rollback.rank_on_tune_split`) and
travel to the pruning-orchestrator as a `NeuronRanking`, so the repair does not score
again."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelguard.config import NeuronScoringSettings
from modelguard.detection.triggers import ReversedTrigger
from modelguard.jobdata import ModelAndData
from modelguard.metrics import ServiceMetrics
from modelguard.progress import Progress, scaled
from modelguard.runtime import Runtime
from modelguard.store.base import ArtifactRef

if TYPE_CHECKING:
    from modelguard.repair.scoring import NeuronRanking, NeuronScores
    from modelguard.repair.shapley import ShapleyResult

TOP_NEURONS_IN_SUMMARY = 20


@dataclass
class StoredScores:
    """What `NeuronScoringService.score` returns: the scores, the Shapley values (None when
    not estimated), the ranking the repair consumes, the stored JSON document and the
    stage summary."""

    scores: NeuronScores
    shapley: ShapleyResult | None
    ranking: NeuronRanking
    ref: ArtifactRef
    summary: dict[str, Any]


class NeuronScoringService:
    def __init__(
        self, runtime: Runtime, settings: NeuronScoringSettings, metrics: ServiceMetrics
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.evaluations = metrics.counter(
            "model_evaluations_total", "Model evaluations spent on Shapley estimation."
        )

    def score(
        self,
        inputs: ModelAndData,
        triggers: list[ReversedTrigger],
        *,
        layer: str = "",
        shapley: bool | None = None,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> StoredScores:
        from modelguard.repair.rollback import rank_on_tune_split
        from modelguard.repair.scoring import NeuronRanking
        from modelguard.repair.shapley import ShapleyConfig, estimate_shapley

        assert inputs.data is not None
        # the repair's own data and probe: the ranking is the one it would compute
        scores, scored_on, data_split = rank_on_tune_split(
            inputs.model.module, inputs.data, inputs.spec, triggers, layer=layer or None
        )
        if progress:
            progress(0.3, f"scored {len(scores.activation)} neurons of {scores.layer}")
        shapley_result = None
        if self.settings.shapley if shapley is None else shapley:
            shapley_result = estimate_shapley(
                inputs.model.module,
                scored_on,
                triggers,
                inputs.spec,
                ShapleyConfig(layer=scores.layer, seed=seed),
                progress=scaled(progress, 0.3, 0.7),
            )
            self.evaluations.inc(shapley_result.evaluations)
        ranking = NeuronRanking.from_scores(
            scores,
            shapley=shapley_result.values if shapley_result is not None else None,
            data_split=data_split,
        )
        neurons = []
        for index in range(len(scores.activation)):
            row: dict[str, Any] = {
                "index": index,
                "activation": float(scores.activation[index]),
                "weight": float(scores.weight[index]),
            }
            if shapley_result is not None:
                row["shapley"] = float(shapley_result.values[index])
                row["shapley_ci"] = float(shapley_result.ci[index])
            neurons.append(row)
        document: dict[str, Any] = {
            "layer": scores.layer,
            "target_labels": [t.label for t in triggers],
            "activation_ranking": [int(i) for i in scores.activation_ranking],
            "weight_ranking": [int(i) for i in scores.weight_ranking],
            "neurons": neurons,
            "model_evaluations": int(shapley_result.evaluations) if shapley_result else 0,
            "data_split": data_split,
        }
        ref = self.runtime.store.put_blob(json.dumps(document).encode(), "application/json")
        top = document["activation_ranking"][:TOP_NEURONS_IN_SUMMARY]
        summary = {
            "layer": scores.layer,
            "neuron_count": len(neurons),
            "top_by_activation": top,
            "top_by_weight": document["weight_ranking"][:TOP_NEURONS_IN_SUMMARY],
            "model_evaluations": document["model_evaluations"],
            "data_split": data_split,
            "neurons": [neurons[i] for i in top],
        }
        return StoredScores(scores, shapley_result, ranking, ref, summary)
