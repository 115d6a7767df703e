"""trigger-reversal, transport-neutral: run the batched Neural Cleanse on an audit's model
and store the reversed triggers (tensors and PNGs). The gRPC servicer and the Kafka
handler both call `TriggerReversalService.reverse`."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from shared.config import TriggerReversalSettings
from shared.datasets import Dataset
from shared.detection.triggers import save_triggers
from shared.errors import InvalidInput
from shared.jobdata import ModelAndData
from shared.metrics import ServiceMetrics
from shared.plots import tensor_png
from shared.runtime import Runtime
from shared.stage import Progress
from shared.store.base import ArtifactRef

log = logging.getLogger(__name__)

#: Largest step budget a request may ask for (a guard against runaway synchronous calls).
MAX_STEPS = 20_000


@dataclass
class StoredReversal:
    result: Any  # shared.detection.neural_cleanse.ReversalResult
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
        progress: Progress | None = None,
    ) -> StoredReversal:
        """``rule``: the detection rule (``modelguard`` or ``paper``; empty: modelguard)."""
        from shared.detection.neural_cleanse import MODELGUARD, ReversalConfig, reverse_triggers

        assert inputs.data is not None
        data: Dataset = inputs.data
        if len(data) > self.settings.clean_samples:
            data = data.subset(self.settings.clean_samples, seed=seed)
        if not 0 <= steps <= MAX_STEPS:
            raise InvalidInput(f"steps must be between 0 (default) and {MAX_STEPS}")
        overrides: dict[str, Any] = {"seed": seed}
        if steps or self.settings.steps:
            overrides["steps"] = steps or self.settings.steps
        config = ReversalConfig.for_rule(rule or MODELGUARD, **overrides)
        started = time.perf_counter()
        result = reverse_triggers(
            inputs.model.module, data, inputs.spec, config=config, progress=progress
        )
        self.optimisation_seconds.observe(time.perf_counter() - started)
        self.labels_scanned.inc(len(result.labels))
        self.verdicts.labels(result.verdict).inc()
        finite = [x.anomaly_index for x in result.labels if math.isfinite(x.anomaly_index)]
        if finite:  # a label whose trigger never reached the threshold has no index
            self.last_anomaly.set(max(finite))
        return self.store(result, inputs)

    def store(self, result: Any, inputs: ModelAndData) -> StoredReversal:
        store = self.runtime.store
        triggers = store.put_blob(
            save_triggers(result.masks, result.patterns),
            "application/vnd.modelguard.triggers+safetensors",
        )
        low, high = inputs.spec.value_range
        images: dict[str, Any] = {}
        for label in result.flagged:
            mask = result.masks[label].numpy()
            pattern = ((result.patterns[label] - low) / (high - low)).numpy()
            stamped = pattern * mask[None]
            for name, array in (("mask", mask), ("pattern", pattern), ("trigger", stamped)):
                ref = store.put_blob(tensor_png(array), "image/png")
                images[f"label {label} {name}"] = ref_dict(ref)
        summary = result.to_dict()
        # tensors live in the triggers artifact; the summary stays small
        for heavy in ("masks", "patterns"):
            summary.pop(heavy, None)
        summary["images"] = images
        summary["triggers"] = ref_dict(triggers)
        summary_ref = store.put_blob(json.dumps(summary).encode(), "application/json")
        return StoredReversal(result, triggers, summary_ref, summary)
