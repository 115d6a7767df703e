"""leak-detector, transport-neutral: parameter-distribution forensics of a model that
was already scanned as a safe artifact (`modelguard.jobdata`).

`scan_module` is the use case: the gRPC servicer, the Kafka handler (through
`LeakDetectorService.scan`) and ``modelguard leakscan`` all call it, so they produce the
same verdict and the same summary document."""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from modelguard.config import LeakDetectorSettings
from modelguard.formats.loader import LoadedModel
from modelguard.leak.detector import LeakVerdict, detect_leak
from modelguard.metrics import ServiceMetrics
from modelguard.runtime import Runtime
from modelguard.store.base import ArtifactRef


def scan_module(module: nn.Module) -> tuple[LeakVerdict, dict[str, Any]]:
    """The verdict on ``module``'s weights and the stage's summary document
    (`LeakVerdict.to_dict`: verdict, score, threshold, evidence, per-layer statistics)."""
    verdict = detect_leak(module)
    return verdict, verdict.to_dict()


class LeakDetectorService:
    def __init__(
        self, runtime: Runtime, settings: LeakDetectorSettings, metrics: ServiceMetrics
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.verdicts = metrics.counter("verdicts_total", "Leak verdicts.", ("verdict",))
        self.refused = metrics.counter(
            "refused_artifacts_total", "Model files refused as unsafe or malformed."
        )

    def scan(self, model: LoadedModel) -> tuple[LeakVerdict, dict[str, Any]]:
        verdict, summary = scan_module(model.module)
        self.verdicts.labels(verdict.verdict).inc()
        return verdict, summary

    def store_summary(self, summary: dict[str, Any]) -> ArtifactRef:
        return self.runtime.store.put_blob(json.dumps(summary).encode(), "application/json")
