"""The robustness stage of an audit, transport-neutral: robust accuracy of the submitted
model against the ε the audit asks for (FGSM, PGD and the gradient-masking check of
`modelguard.robustness`), stored as a JSON summary (the report draws the curve from it).

It runs in trigger-reversal because that is where the gradient machinery lives: both
stages push gradients through the submitted model on its clean data, within the same
memory budget. It is a second stage kind of the service rather than a step of the
reversal: the same ``audit.requested`` records, read in a consumer group of its own
(`CONSUMER_GROUP_SUFFIX`), so each stage has its own progress, attempts, time limit and
outcome — a failed attack never costs the audit its backdoor verdict, nor the other way
round — and the two run side by side."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modelguard.config import TriggerReversalSettings
from modelguard.jobdata import ModelAndData
from modelguard.metrics import ServiceMetrics
from modelguard.progress import Progress
from modelguard.robustness import (
    ROBUST_ACCURACY_FLOOR,
    RobustnessConfig,
    RobustnessResult,
    evaluate_robustness,
    robustness_verdict,
)
from modelguard.runtime import Runtime
from modelguard.store.base import ArtifactRef

log = logging.getLogger(__name__)

#: The robustness worker's consumer group is the service's group plus this.
CONSUMER_GROUP_SUFFIX = "-robustness"


@dataclass(frozen=True)
class StoredRobustness:
    """What `RobustnessStage.evaluate` returns: the library's result, its verdict, the
    stored JSON summary and the summary itself."""

    result: RobustnessResult
    verdict: str
    summary_ref: ArtifactRef
    summary: dict[str, Any]


class RobustnessStage:
    def __init__(
        self, runtime: Runtime, settings: TriggerReversalSettings, metrics: ServiceMetrics
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.verdicts = metrics.counter(
            "robustness_verdicts_total", "Robustness stage verdicts.", ("verdict",)
        )

    def config(
        self, eps: Sequence[float], *, norm: str = "", steps: int = 0, seed: int = 0
    ) -> RobustnessConfig:
        """The evaluation an audit's options ask for (empty ``norm``, zero ``steps``: the
        library's defaults), within the service's image count and budgets."""
        return RobustnessConfig.of_request(
            eps,
            norm,
            steps,
            seed=seed,
            max_images=self.settings.robustness_images,
            memory_budget_mb=self.settings.memory_budget_mb,
            time_budget_seconds=self.settings.robustness_time_budget_seconds,
        )

    def evaluate(
        self, inputs: ModelAndData, config: RobustnessConfig, progress: Progress | None = None
    ) -> StoredRobustness:
        """Attack the model on its clean data and store the summary."""
        assert inputs.data is not None
        result = evaluate_robustness(
            inputs.model.module, inputs.data, inputs.spec, config, progress=progress
        )
        verdict = robustness_verdict(result)
        self.verdicts.labels(verdict).inc()
        summary = robustness_summary(result, verdict)
        summary_ref = self.runtime.store.put_blob(json.dumps(summary).encode(), "application/json")
        return StoredRobustness(result, verdict, summary_ref, summary)


def robustness_summary(result: RobustnessResult, verdict: str) -> dict[str, Any]:
    """The stage summary: the result's `to_dict` (whose ``images`` counts the images
    attacked), the verdict and the floor it was decided with."""
    return {**result.to_dict(), "verdict": verdict, "robust_accuracy_floor": ROBUST_ACCURACY_FLOOR}
