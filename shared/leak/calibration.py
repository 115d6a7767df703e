"""The detector's calibrated parameters and how they are fitted.

Scoring (per layer with at least ``min_count`` weights, per scored feature):

1. the feature's *value*: ``sign_imbalance = |positive_fraction − ½|``,
   ``quantile_skewness = |Kelly's skewness|``, ``negative_cokurtosis = max(0, −neighbour
   cokurtosis)`` (see ``features``);
2. its *excess* over sampling noise: value minus a one-sided ``confidence`` allowance —
   the Student-t quantile with ``units − 1`` degrees of freedom times the cluster-robust
   standard error for the sign imbalance; the normal quantile times ``1.05/√n`` for the
   quantile skewness and ``√(((K + 3)² − 1)/2)/√n`` for the co-kurtosis (their standard errors
   under a null of independent weights, measured by simulation; ``K`` is the layer's
   excess kurtosis). Small layers therefore need a larger effect;
3. its *score*: excess over the feature's benign bound *for the layer's kind* — the
   largest excess any benign calibration layer of that kind showed (never below a floor,
   the smallest effect worth reporting). Kinds (`modelguard.leak.features.layer_kind`):
   dense, pointwise, depthwise and other convolutions. A depthwise filter is a small
   spatial kernel, centre-heavy and mostly positive in any trained network: judged by the
   envelope of dense layers, every published EfficientNet would look like a sign
   encoding. A kind the calibration never saw borrows the bound of the nearest kind it
   did (`FALLBACK`). A score of 1 is as far from "normal" as the most unusual benign
   layer of that kind got.

A model's score is its largest layer score; the verdict is "leak" at or above
``threshold``, the geometric midpoint between the largest benign calibration score (at
least 1) and the smallest malicious one. Nothing about a model's task or architecture is needed at
audit time: the features are scale-free and the noise allowance adapts to layer size.

The parameters ship as ``calibration.json`` beside this module (a few hundred bytes);
``python -m bench.leak_calibrate`` regenerates it from the model zoo.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelguard.leak.features import LAYER_KINDS, LayerStats

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")

SIGN_IMBALANCE = "sign_imbalance"
QUANTILE_SKEWNESS = "quantile_skewness"
NEGATIVE_COKURTOSIS = "negative_cokurtosis"
SCORED_FEATURES = (SIGN_IMBALANCE, QUANTILE_SKEWNESS, NEGATIVE_COKURTOSIS)
#: Smallest effects worth reporting (the bound never goes below these).
DEFAULT_FLOORS: Mapping[str, float] = {
    SIGN_IMBALANCE: 0.03,
    QUANTILE_SKEWNESS: 0.05,
    NEGATIVE_COKURTOSIS: 0.1,
}
#: Standard error × √n of the quantile skewness of independent normal weights
#: (simulation, n = 2000, 400 draws: 1.04; the co-kurtosis' is √(((K + 3)² − 1)/2), 2 for K = 0).
QUANTILE_SKEWNESS_NOISE = 1.05


#: The kind whose bound a kind without calibration layers borrows (nearest first).
FALLBACK: Mapping[str, tuple[str, ...]] = {
    "dense": ("pointwise", "conv"),
    "pointwise": ("dense", "conv"),
    "conv": ("dense", "pointwise"),
    "depthwise": ("conv", "dense", "pointwise"),
}
ANY_KIND = "any"


@dataclass(frozen=True)
class FeatureRule:
    feature: str
    #: largest benign excess seen in calibration (at least ``floor``)
    bound: float
    floor: float
    #: the layer kind the bound holds for (``any``: every kind, a version-1 calibration)
    kind: str = ANY_KIND

    def __post_init__(self) -> None:
        if self.feature not in SCORED_FEATURES:
            raise ValueError(f"unknown feature {self.feature!r}; known: {SCORED_FEATURES}")
        if self.kind not in (*LAYER_KINDS, ANY_KIND):
            raise ValueError(f"unknown layer kind {self.kind!r}; known: {LAYER_KINDS}")
        if not (math.isfinite(self.bound) and self.bound > 0 and self.floor >= 0):
            raise ValueError(f"{self.feature}: bound must be finite and > 0, floor >= 0")

    def to_dict(self) -> dict[str, object]:
        return {
            "feature": self.feature,
            "kind": self.kind,
            "bound": self.bound,
            "floor": self.floor,
        }


@dataclass(frozen=True)
class Calibration:
    """Benign bounds per feature and the verdict threshold (see the module docstring)."""

    rules: tuple[FeatureRule, ...]
    threshold: float
    min_count: int = 1024
    confidence: float = 0.999
    provenance: Mapping[str, Any] = field(default_factory=dict)
    version: int = 1

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("a calibration needs at least one feature rule")
        if len({(r.kind, r.feature) for r in self.rules}) != len(self.rules):
            raise ValueError("a feature appears twice for one layer kind in the calibration")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError("threshold must be finite and > 0")
        if self.min_count < 16:
            raise ValueError("min_count must be >= 16")
        if not 0.5 < self.confidence < 1.0:
            raise ValueError("confidence must be in (0.5, 1)")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(rule.kind for rule in self.rules))

    def bound(self, feature: str, kind: str = ANY_KIND) -> float:
        """The benign bound of ``feature`` for layers of ``kind`` (or of the nearest kind
        calibrated, see `FALLBACK`; the largest bound of any kind as the last resort)."""
        rules = {(rule.kind, rule.feature): rule.bound for rule in self.rules}
        for candidate in (kind, *FALLBACK.get(kind, ()), ANY_KIND):
            if (candidate, feature) in rules:
                return rules[(candidate, feature)]
        bounds = [bound for (_, name), bound in rules.items() if name == feature]
        if not bounds:
            raise KeyError(feature)
        return max(bounds)

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "threshold": self.threshold,
            "min_count": self.min_count,
            "confidence": self.confidence,
            "rules": [rule.to_dict() for rule in self.rules],
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        try:
            rules = tuple(
                FeatureRule(
                    str(r["feature"]),
                    float(r["bound"]),
                    float(r["floor"]),
                    str(r.get("kind", ANY_KIND)),
                )
                for r in data["rules"]
            )
            return cls(
                rules=rules,
                threshold=float(data["threshold"]),
                min_count=int(data["min_count"]),
                confidence=float(data["confidence"]),
                provenance=dict(data.get("provenance", {})),
                version=int(data.get("version", 1)),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"calibration data is incomplete: {err}") from err


@functools.lru_cache(maxsize=4)
def load_calibration(path: str = str(CALIBRATION_PATH)) -> Calibration:
    """The shipped calibration (read once; the only I/O of the detector)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise RuntimeError(
            f"leak-detector calibration {path} is missing: run `python -m bench.leak_calibrate`"
        ) from err
    return Calibration.from_dict(data)


@functools.lru_cache(maxsize=1024)
def _student_quantile(confidence: float, dof: int) -> float:
    from scipy.stats import norm, t

    if dof <= 0:
        return float(norm.ppf(confidence))
    return float(t.ppf(confidence, dof))


@functools.lru_cache(maxsize=16)
def _normal_quantile(confidence: float) -> float:
    return _student_quantile(confidence, 0)


@dataclass(frozen=True)
class FeatureValue:
    feature: str
    value: float
    #: value beyond the sampling-noise allowance (>= 0)
    excess: float


def feature_values(stats: LayerStats, confidence: float) -> list[FeatureValue]:
    """The scored features of one layer with their excess over sampling noise."""
    informative = max(1, round(stats.sampled * (1.0 - stats.zero_fraction)))
    root = math.sqrt(informative)
    z = _normal_quantile(confidence)
    imbalance = abs(stats.positive_fraction - 0.5)
    t = _student_quantile(confidence, stats.units - 1) if stats.units > 1 else z
    skew = abs(stats.quantile_skewness)
    cokurtosis = max(0.0, -stats.neighbour_cokurtosis)
    spread = math.sqrt(max((stats.kurtosis + 3.0) ** 2 - 1.0, 0.5) / 2.0)
    return [
        FeatureValue(
            SIGN_IMBALANCE, imbalance, max(0.0, imbalance - t * stats.positive_fraction_stderr)
        ),
        FeatureValue(QUANTILE_SKEWNESS, skew, max(0.0, skew - z * QUANTILE_SKEWNESS_NOISE / root)),
        FeatureValue(NEGATIVE_COKURTOSIS, cokurtosis, max(0.0, cokurtosis - z * spread / root)),
    ]


def scored(layers: Sequence[LayerStats], min_count: int) -> list[LayerStats]:
    """The layers large enough to be scored (finite, at least ``min_count`` weights)."""
    return [s for s in layers if s.count >= min_count and s.variance > 0]


def model_score(layers: Sequence[LayerStats], calibration: Calibration) -> float:
    best = 0.0
    for stats in scored(layers, calibration.min_count):
        for item in feature_values(stats, calibration.confidence):
            best = max(best, item.excess / calibration.bound(item.feature, stats.kind))
    return best


def fit_calibration(
    benign: Sequence[Sequence[LayerStats]],
    malicious: Sequence[Sequence[LayerStats]],
    *,
    min_count: int = 1024,
    confidence: float = 0.999,
    floors: Mapping[str, float] = DEFAULT_FLOORS,
    provenance: Mapping[str, Any] | None = None,
) -> Calibration:
    """Bounds from the ``benign`` models' layers (each model a list of layer statistics);
    threshold between the benign and the ``malicious`` model scores. Raises ValueError when
    the two sets are not separated."""
    if not benign or not malicious:
        raise ValueError("calibration needs benign and malicious models")
    largest: dict[tuple[str, str], float] = {}
    layer_counts: dict[str, int] = {}
    for layers in benign:
        for stats in scored(layers, min_count):
            layer_counts[stats.kind] = layer_counts.get(stats.kind, 0) + 1
            for item in feature_values(stats, confidence):
                key = (stats.kind, item.feature)
                largest[key] = max(largest.get(key, 0.0), item.excess)
    rules = tuple(
        FeatureRule(
            name, max(largest[(kind, name)], floors.get(name, 0.0)), floors.get(name, 0.0), kind
        )
        for kind in LAYER_KINDS
        if kind in layer_counts
        for name in SCORED_FEATURES
    )
    draft = Calibration(rules, threshold=1.0, min_count=min_count, confidence=confidence)
    benign_scores = [model_score(layers, draft) for layers in benign]
    malicious_scores = [model_score(layers, draft) for layers in malicious]
    top_benign, low_malicious = max(benign_scores), min(malicious_scores)
    # a score of 1 is the benign bound (or the floor, the smallest effect worth reporting)
    reference = max(top_benign, 1.0)
    if low_malicious <= reference:
        raise ValueError(
            f"calibration does not separate the classes: a malicious model scores "
            f"{low_malicious:.3f}, the benign bound is {reference:.3f}"
        )
    threshold = math.sqrt(reference * low_malicious)
    details = dict(provenance or {})
    details.update(
        benign_models=len(benign),
        malicious_models=len(malicious),
        benign_max_score=round(top_benign, 4),
        malicious_min_score=round(low_malicious, 4),
        benign_layers_by_kind=layer_counts,
    )
    return Calibration(rules, threshold, min_count, confidence, details, version=2)
