"""trigger-reversal, transport-neutral: run a registered backdoor detector
(`modelguard.detection.registry`; default: the batched Neural Cleanse) on an audit's model and
store the reversed triggers (tensors and PNGs). The gRPC servicer and the Kafka handler
both call `TriggerReversalService.reverse`.

`RobustnessStage` is the audit's robustness stage: robust accuracy of the submitted model
against the ε the audit asks for (FGSM, PGD and the gradient-masking check of
`modelguard.robustness`), stored as a JSON summary (the report draws the curve from it).
It runs here because this is where the gradient machinery lives: both stages push
gradients through the submitted model on its clean data, within the same memory budget.
It is a second stage kind of the service rather than a step of the reversal: the same
``audit.requested`` records, read in a consumer group of its own
(`ROBUSTNESS_GROUP_SUFFIX`), so each stage has its own progress, attempts, time limit and
outcome — a failed attack never costs the audit its backdoor verdict, nor the other way
round — and the two run side by side."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelguard.config import TriggerReversalSettings
from modelguard.datasets import Dataset
from modelguard.detection.reference import apply_reference, compare_with_reference, set_aside
from modelguard.detection.registry import DEFAULT_DETECTOR, get_detector
from modelguard.detection.render import trigger_pngs
from modelguard.detection.triggers import save_triggers
from modelguard.errors import InvalidInput
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

if TYPE_CHECKING:
    from modelguard.detection.base import BackdoorDetector, DetectionResult
    from modelguard.formats.loader import LoadedModel

log = logging.getLogger(__name__)

#: Largest step budget a request may ask for (a guard against runaway synchronous calls).
MAX_STEPS = 20_000


@dataclass
class StoredReversal:
    """What `TriggerReversalService.reverse` returns: the detector's result, the stored
    triggers (safetensors), the stored JSON summary and the summary itself."""

    result: DetectionResult
    triggers: ArtifactRef
    summary_ref: ArtifactRef
    summary: dict[str, Any]


def ref_dict(ref: ArtifactRef) -> dict[str, Any]:
    return {"sha256": ref.sha256, "key": ref.key, "size": ref.size, "media_type": ref.media_type}


class TriggerReversalService:
    def __init__(
        self, runtime: Runtime, settings: TriggerReversalSettings, metrics: ServiceMetrics
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.labels_scanned = metrics.counter("labels_scanned_total", "Labels reverse-engineered.")
        self.optimisation_seconds = metrics.histogram(
            "optimisation_seconds",
            "Wall time of one reversal (all labels).",
            (1, 2.5, 5, 10, 15, 30, 60, 120, 300, 600),
        )
        self.last_anomaly = metrics.gauge(
            "last_anomaly_index", "Largest anomaly index of the last scanned model."
        )
        self.verdicts = metrics.counter("verdicts_total", "Reversal verdicts.", ("verdict",))

    def reverse(
        self,
        inputs: ModelAndData,
        *,
        steps: int = 0,
        seed: int = 0,
        rule: str = "",
        detector: str = "",
        progress: Progress | None = None,
        reference: LoadedModel | None = None,
        reference_name: str = "",
    ) -> StoredReversal:
        """``detector``: a `modelguard.detection.registry.DETECTORS` name (empty:
        neural-cleanse); ``rule``: one of its rules (empty: its first, for Neural Cleanse
        ``modelguard``; ``paper`` is the original test); ``reference``: the model the
        submitted one was fine-tuned from (see `against_reference`)."""
        assert inputs.data is not None
        plan = reversal_plan(
            inputs.data, self.settings, steps=steps, seed=seed, rule=rule, detector=detector
        )
        started = time.perf_counter()
        result = plan.detector.detect(
            inputs.model.module, plan.data, inputs.spec, plan.config, progress=progress
        )
        if reference is not None:
            result = against_reference(result, inputs, reference, reference_name)
        self.optimisation_seconds.observe(time.perf_counter() - started)
        self.labels_scanned.inc(len(result.labels))
        self.verdicts.labels(result.verdict).inc()
        finite = [x.anomaly_index for x in result.labels if math.isfinite(x.anomaly_index)]
        if finite:  # a label whose trigger never reached the threshold has no index
            self.last_anomaly.set(max(finite))
        return self.store(result, detector=plan.detector.name, clean=plan.data)

    def store(
        self,
        result: DetectionResult,
        *,
        detector: str = DEFAULT_DETECTOR,
        clean: Dataset | None = None,
    ) -> StoredReversal:
        """Store the triggers (safetensors), the flagged labels' pictures (with a clean
        image beside it stamped, given ``clean`` images) and the summary."""
        store = self.runtime.store
        triggers = store.put_blob(
            save_triggers(result.masks, result.patterns, result.labels_with_triggers),
            "application/vnd.modelguard.triggers+safetensors",
        )
        summary = reversal_summary(result, detector)
        summary["images"] = {
            name: ref_dict(store.put_blob(png, "image/png"))
            for name, png in trigger_pngs(
                result, [*result.flagged, *set_aside(result)], clean=clean
            ).items()
        }
        summary["triggers"] = ref_dict(triggers)
        summary_ref = store.put_blob(json.dumps(summary).encode(), "application/json")
        return StoredReversal(result, triggers, summary_ref, summary)


def against_reference(
    result: DetectionResult, inputs: ModelAndData, reference: LoadedModel, name: str = ""
) -> DetectionResult:
    """``result`` with the flagged labels whose reversed triggers ``reference`` follows as
    well set aside as inherited (`modelguard.detection.reference`); ``name`` names the
    reference in the evidence."""
    from modelguard.detection.neural_cleanse import ReversalResult

    if not isinstance(result, ReversalResult):
        raise InvalidInput("a reference model needs a trigger-reversal detector's result")
    assert inputs.data is not None
    comparison = compare_with_reference(
        result, inputs.model.module, reference.module, inputs.data, inputs.spec, name=name
    )
    return apply_reference(result, comparison)


@dataclass(frozen=True)
class ReversalPlan:
    """What a reversal runs: the detector, the clean images it sees and its config."""

    detector: BackdoorDetector
    data: Dataset
    config: Any


def reversal_plan(
    data: Dataset,
    settings: TriggerReversalSettings,
    *,
    steps: int = 0,
    seed: int = 0,
    rule: str = "",
    detector: str = "",
    overrides: Mapping[str, Any] | None = None,
) -> ReversalPlan:
    """The service's choices for a reversal (the CLI's in-process commands make the same):
    the named detector (empty: the default), at most ``settings.clean_samples`` clean
    images (a seeded subset), ``steps`` bounded by `MAX_STEPS` (0: the settings' or the
    rule's default) and ``rule``'s config with the seed, the steps and ``overrides``
    applied. Unknown names and contradicting overrides raise ``InvalidInput``."""
    method = get_detector(detector or DEFAULT_DETECTOR)
    if len(data) > settings.clean_samples:
        data = data.subset(settings.clean_samples, seed=seed)
    if not 0 <= steps <= MAX_STEPS:
        raise InvalidInput(f"steps must be between 0 (default) and {MAX_STEPS}")
    options: dict[str, Any] = {
        "seed": seed,
        "memory_budget_mb": settings.memory_budget_mb,
        "time_budget_seconds": settings.time_budget_seconds,
    }
    if steps or settings.steps:
        options["steps"] = steps or settings.steps
    options.update(overrides or {})
    return ReversalPlan(method, data, method.configure(rule, **options))


def reversal_summary(result: DetectionResult, detector: str) -> dict[str, Any]:
    """The stage summary, without the store references the service adds (``images``,
    ``triggers``): the result's JSON summary (the tensors stay out) and the detector."""
    summary = result.to_dict()
    # tensors live in the triggers artifact; the summary stays small
    for heavy in ("masks", "patterns"):
        summary.pop(heavy, None)
    summary["detector"] = detector
    return summary


#: The robustness worker's consumer group is the service's group plus this.
ROBUSTNESS_GROUP_SUFFIX = "-robustness"


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
