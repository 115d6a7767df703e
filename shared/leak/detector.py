"""Leak verdict from the parameter distribution (after Song et al., CCS 2017).

``detect_leak(module)`` computes the per-layer statistics of ``features``, scores every
layer against the shipped calibration (``calibration``: how far each feature lies beyond
the benign envelope once sampling noise is allowed for) and returns a verdict, the score,
the evidence (which layers, which features, their values) and the statistics. No
reference model of the same task is needed, and nothing is trained at audit time.

Attacks it targets: correlated value encoding and sign encoding (Song et al., CCS 2017),
into any Linear/Conv layer large enough to hold data. Known blind spots: a secret whose
bits are balanced and unstructured (e.g. encrypted) written by sign encoding, and a
correlated value encoding of images without a dominant background scattered over the
weights in a secret order; the data-processing-stage attack (which leaves the weight
distribution normal) is handled by the pruning defence instead.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# re-exported: the leak API has always offered it (it lives with the weights formats)
from modelguard.formats.weights import module_from_state_dict as module_from_state_dict
from modelguard.leak.calibration import Calibration, feature_values, load_calibration, scored
from modelguard.leak.features import FeatureConfig, LayerStats, layer_statistics

log = logging.getLogger(__name__)

LEAK = "leak"
BENIGN = "benign"


@dataclass(frozen=True)
class DetectorConfig:
    """``threshold``: override the calibrated verdict threshold (None: calibrated);
    ``max_evidence``: most evidence items returned; ``features``: feature settings."""

    threshold: float | None = None
    max_evidence: int = 8
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        if self.threshold is not None and not (
            math.isfinite(self.threshold) and self.threshold > 0
        ):
            raise ValueError("threshold must be finite and > 0")
        if self.max_evidence < 1:
            raise ValueError("max_evidence must be >= 1")


@dataclass(frozen=True)
class Evidence:
    """One suspicious (layer, feature): the feature's ``value``, its ``excess`` over
    sampling noise, the largest benign excess ``bound`` among layers of the same ``kind``
    and ``score = excess / bound``."""

    layer: str
    feature: str
    value: float
    excess: float = 0.0
    bound: float = 1.0
    score: float = 0.0
    kind: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "feature": self.feature,
            "value": self.value,
            "excess": self.excess,
            "bound": self.bound,
            "score": self.score,
        }


@dataclass(frozen=True)
class LeakVerdict:
    """``verdict`` is "leak" when ``score >= threshold``. ``evidence`` lists the layers and
    features at or above the threshold (for a benign verdict: the single strongest one,
    to show how close the model came); ``layers`` holds every layer's statistics."""

    verdict: str
    score: float
    evidence: list[Evidence]
    layers: list[LayerStats]
    seconds: float
    threshold: float = 0.0

    @property
    def leak(self) -> bool:
        return self.verdict == LEAK

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "score": self.score,
            "threshold": self.threshold,
            "evidence": [item.to_dict() for item in self.evidence],
            "layers": [layer.to_dict() for layer in self.layers],
            "seconds": self.seconds,
        }


def score_layers(layers: list[LayerStats], calibration: Calibration) -> list[Evidence]:
    """Every (scored layer, feature) with its score, strongest first."""
    items: list[Evidence] = []
    for stats in scored(layers, calibration.min_count):
        for value in feature_values(stats, calibration.confidence):
            bound = calibration.bound(value.feature, stats.kind)
            items.append(
                Evidence(
                    stats.layer,
                    value.feature,
                    value.value,
                    value.excess,
                    bound,
                    value.excess / bound,
                    stats.kind,
                )
            )
    items.sort(key=lambda item: item.score, reverse=True)
    return items


@torch.no_grad()
def detect_leak(
    module: nn.Module,
    config: DetectorConfig = DetectorConfig(),
    calibration: Calibration | None = None,
) -> LeakVerdict:
    """Audit ``module``'s weights (any ``nn.Module`` or TorchScript module; every
    parameter named ``*weight`` with two or more dimensions) for encoded training data."""
    started = time.perf_counter()
    calibration = calibration or load_calibration()
    threshold = config.threshold if config.threshold is not None else calibration.threshold
    layers = layer_statistics(module, config.features)
    ranked = score_layers(layers, calibration)
    score = ranked[0].score if ranked else 0.0
    verdict = LEAK if score >= threshold else BENIGN
    if verdict == LEAK:
        evidence = [item for item in ranked if item.score >= threshold][: config.max_evidence]
    else:
        evidence = ranked[:1]
    seconds = time.perf_counter() - started
    log.info(
        "leak verdict %s (score %.3g, threshold %.3g) in %.3fs", verdict, score, threshold, seconds
    )
    return LeakVerdict(verdict, score, evidence, layers, seconds, threshold)
