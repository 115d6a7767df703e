"""The MAD outlier test of Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and
Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019, §IV-C).

Given the L1 norms ``a_k`` of the reversed triggers of the K labels:

* ``ã = median(a)``, ``b_k = |a_k − ã|``, ``MAD = 1.4826 · median(b)``;
* anomaly index ``b_k / MAD``;
* a label is flagged when ``a_k < ã`` (only *small* triggers are suspicious) and its index
  exceeds the threshold (2 by default: > 95% probability of being an outlier under a
  normal model of the clean labels' norms).

Rules for the cases the paper leaves open (documented, deliberate, and tested):

1. **Labels whose trigger never reached the attack-success threshold** (``a_k`` is None,
   NaN or +inf) have no valid trigger. Their minimal trigger is larger than anything the
   optimiser found, so they enter the median and the MAD as ``+inf`` (right-censored
   values; both statistics are rank-based and stay finite while fewer than half the
   labels are censored). They get no anomaly index and are never flagged: an unreachable
   label is the opposite of a backdoor target.
2. **Too few valid norms**: with fewer than ``min_valid`` labels (3) that produced a
   trigger, or with the median itself censored (half the labels or more unreached),
   no outlier test is possible: nothing is flagged and the outcome says *inconclusive*.
3. **Zero MAD** (half the labels or more share exactly the median norm): the dispersion
   estimate falls back to ``1.253314 · mean(b)`` over the valid labels (the mean
   absolute deviation scaled to be consistent for a normal distribution, the standard
   fallback for the modified z-score, as in IBM SPSS/Iglewicz–Hoaglin). If that is zero
   as well, every valid label has the same norm and every index is 0.
4. A negative or non-finite norm is never produced by the optimiser; a negative value is
   rejected as a programming error.

**Scale** (``scale="log"``, the reversal's default; ``"linear"`` is the paper's rule
exactly). The test is the same — median, 1.4826 · MAD, index > 2, only labels below the
median — applied to ``log a_k``. Trigger norms spread multiplicatively: on the zoo's
VGG and ResNet models the clean labels' norms run from about 10 to 150, so a 3-pixel
backdoor trigger (norm 3) sits only 1.1–1.6 linear MADs below the median and is missed,
while on the log scale it is 3–4 MADs away; the clean labels' log norms are close to
symmetric. Measured over the zoo (``bench.bench_detection``): see README. The reported
median is converted back to a norm, so "norm < median" reads the same on both scales.

Everything here is plain Python on floats: the arithmetic can be checked by hand.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: 1 / Φ⁻¹(3/4): makes the MAD a consistent estimator of σ for normal data.
MAD_CONSISTENCY = 1.4826
#: sqrt(π / 2): makes the mean absolute deviation consistent for σ (zero-MAD fallback).
MEAN_AD_CONSISTENCY = 1.253314
DEFAULT_THRESHOLD = 2.0
SCALES = ("linear", "log")


@dataclass(frozen=True)
class MadResult:
    """Outcome of the MAD test over K labels.

    ``anomaly_index[k]`` is None for a label without a valid trigger. ``dispersion`` is the
    denominator actually used (``MAD``, or the fallback of rule 3); ``rule`` says which:
    ``"mad"``, ``"mean-absolute-deviation"``, ``"identical-norms"`` or ``"inconclusive"``.
    ``median`` is in norm units whatever the ``scale``; ``mad`` and ``dispersion`` are on
    the test's scale.
    """

    median: float
    mad: float
    dispersion: float
    anomaly_index: tuple[float | None, ...]
    flagged: tuple[int, ...]
    rule: str
    reason: str = ""
    valid: tuple[bool, ...] = field(default_factory=tuple)
    scale: str = "linear"

    @property
    def conclusive(self) -> bool:
        return self.rule != "inconclusive"

    def to_dict(self) -> dict[str, Any]:
        return {
            "median": _json_float(self.median),
            "mad": _json_float(self.mad),
            "dispersion": _json_float(self.dispersion),
            "anomaly_index": [None if v is None else _json_float(v) for v in self.anomaly_index],
            "flagged": list(self.flagged),
            "rule": self.rule,
            "reason": self.reason,
            "scale": self.scale,
        }


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def is_valid_norm(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def mad_test(
    norms: Sequence[float | None],
    *,
    consistency: float = MAD_CONSISTENCY,
    threshold: float = DEFAULT_THRESHOLD,
    min_valid: int = 3,
    scale: str = "linear",
) -> MadResult:
    """Anomaly indices and flagged labels for the trigger norms ``norms[k]`` (None, NaN or
    +inf: the label's trigger never reached the attack-success threshold), on the
    ``scale`` ``"linear"`` (the paper) or ``"log"``."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}; got {scale!r}")
    if consistency <= 0 or not math.isfinite(consistency):
        raise ValueError(f"consistency constant must be finite and > 0; got {consistency}")
    if threshold < 0 or not math.isfinite(threshold):
        raise ValueError(f"anomaly threshold must be finite and >= 0; got {threshold}")
    valid = tuple(is_valid_norm(v) for v in norms)
    for value, ok in zip(norms, valid, strict=True):
        if ok and value is not None and value < 0:
            raise ValueError(f"a trigger norm cannot be negative; got {value}")
    values = [
        _transform(float(v), scale) if ok and v is not None else math.inf
        for v, ok in zip(norms, valid, strict=True)
    ]
    count = sum(valid)
    none: tuple[float | None, ...] = tuple(None for _ in values)
    if count < max(min_valid, 1):
        return MadResult(
            math.nan, math.nan, math.nan, none, (), "inconclusive",
            f"only {count} of {len(values)} labels produced a trigger that reaches the "
            f"attack-success threshold; the outlier test needs at least {min_valid}",
            valid, scale,
        )  # fmt: skip
    median = statistics.median(values)
    if not math.isfinite(median):
        return MadResult(
            median, math.nan, math.nan, none, (), "inconclusive",
            f"{len(values) - count} of {len(values)} labels never reached the "
            "attack-success threshold, so the median norm is undefined",
            valid, scale,
        )  # fmt: skip
    deviations = [abs(v - median) for v in values]
    mad = consistency * statistics.median(deviations)
    rule, dispersion = "mad", mad
    if not mad > 0:
        finite = [d for d, ok in zip(deviations, valid, strict=True) if ok]
        dispersion = MEAN_AD_CONSISTENCY * sum(finite) / len(finite)
        rule = "mean-absolute-deviation" if dispersion > 0 else "identical-norms"
    index: list[float | None] = []
    for deviation, ok in zip(deviations, valid, strict=True):
        if not ok:
            index.append(None)
        elif dispersion > 0:
            index.append(deviation / dispersion)
        else:
            index.append(0.0)
    flagged = tuple(
        k
        for k, (value, idx) in enumerate(zip(values, index, strict=True))
        if idx is not None and value < median and idx > threshold
    )
    median_norm = math.exp(median) if scale == "log" else median
    return MadResult(median_norm, mad, dispersion, tuple(index), flagged, rule, "", valid, scale)


def _transform(norm: float, scale: str) -> float:
    # a mask is strictly positive (sigmoid/tanh), but guard log(0) for hand-made inputs
    return math.log(max(norm, 1e-12)) if scale == "log" else norm
