"""neuron-scoring, transport-neutral: rank a layer's neurons by activation under the
reversed trigger and by weight magnitude, optionally with Shapley values."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.config import NeuronScoringSettings
from shared.detection.triggers import ReversedTrigger
from shared.jobdata import ModelAndData
from shared.metrics import ServiceMetrics
from shared.runtime import Runtime
from shared.stage import Progress
from shared.store.base import ArtifactRef

TOP_NEURONS_IN_SUMMARY = 20


@dataclass
class StoredScores:
    scores: Any  # shared.repair.scoring.NeuronScores
    shapley: Any  # ShapleyResult | None
    ref: ArtifactRef
    summary: dict[str, Any]


def _scaled(progress: Progress, start: float, span: float) -> Progress:
    def report(fraction: float, message: str = "") -> None:
        progress(start + span * fraction, message)

    return report


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
        from shared.repair.scoring import ScoringConfig, score_neurons
        from shared.repair.shapley import ShapleyConfig, estimate_shapley

        assert inputs.data is not None
        scores = score_neurons(
            inputs.model.module,
            inputs.data,
            triggers,
            inputs.spec,
            ScoringConfig(layer=layer or None),
        )
        if progress:
            progress(0.3, f"scored {len(scores.activation)} neurons of {scores.layer}")
        shapley_result = None
        if self.settings.shapley if shapley is None else shapley:
            shapley_result = estimate_shapley(
                inputs.model.module,
                inputs.data,
                triggers,
                inputs.spec,
                ShapleyConfig(layer=scores.layer, seed=seed),
                progress=_scaled(progress, 0.3, 0.7) if progress else None,
            )
            self.evaluations.inc(shapley_result.evaluations)
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
        }
        ref = self.runtime.store.put_blob(json.dumps(document).encode(), "application/json")
        top = document["activation_ranking"][:TOP_NEURONS_IN_SUMMARY]
        summary = {
            "layer": scores.layer,
            "neuron_count": len(neurons),
            "top_by_activation": top,
            "top_by_weight": document["weight_ranking"][:TOP_NEURONS_IN_SUMMARY],
            "model_evaluations": document["model_evaluations"],
            "neurons": [neurons[i] for i in top],
        }
        return StoredScores(scores, shapley_result, ref, summary)
