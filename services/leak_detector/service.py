"""leak-detector, transport-neutral: parameter-distribution forensics of a model that
was already scanned as a safe artifact by `shared.formats.loader.load_model`."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from shared.config import LeakDetectorSettings
from shared.formats.loader import LoadedModel
from shared.metrics import ServiceMetrics
from shared.runtime import Runtime
from shared.store.base import ArtifactRef


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

    def scan(self, model: LoadedModel) -> tuple[Any, dict[str, Any]]:
        from shared.leak.detector import detect_leak

        verdict = detect_leak(model.module)
        self.verdicts.labels(verdict.verdict).inc()
        summary = verdict.to_dict()
        summary["layers"] = [
            layer if isinstance(layer, dict) else asdict(layer) for layer in summary["layers"]
        ]
        return verdict, summary

    def store_summary(self, summary: dict[str, Any]) -> ArtifactRef:
        return self.runtime.store.put_blob(json.dumps(summary).encode(), "application/json")
