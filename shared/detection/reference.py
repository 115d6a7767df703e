"""A detection compared with a trusted reference model: the checkpoint the submitted model
was fine-tuned from (a published one, or the team's own base).

Trigger reversal finds the smallest input change that sends clean images to a label. On a
model trained on natural images some labels have a small *natural* universal patch of their
own (a few dozen coloured pixels that the published model already answers with that label),
and the outlier test cannot tell it from a planted trigger: both are small and both flip most
images. What tells them apart is where the behaviour comes from. A fine-tune keeps its
weights near its base, so a natural patch of the base still works on the fine-tune and its
reversed trigger still works on the base; a trigger planted by the fine-tune works on the
fine-tune only.

So each flagged label's reversed trigger is stamped on the same clean images and fed to both
models. A label whose trigger the reference follows at least ``min_ratio`` as often as the
submitted model is *inherited*: it is reported, and not counted towards ``infected``. A
label the reference ignores stays flagged.

A label the blend probe flagged is never set aside: its trigger is the probe's own noise
blend, which benign models also answer with some texture class, so a parent following it
says nothing about where a planted blend came from. Nor does the comparison turn a
reversal that ran out of time into ``clean``: with nothing left flagged, an inconclusive
reversal stays ``inconclusive``.

What it cannot see: a backdoor planted on a label that already has a natural patch of the
base, when the reversal finds the natural patch (it is the smaller) rather than the planted
one. The evidence says which labels were set aside so that a reader can weigh that.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.neural_cleanse import CLEAN, INCONCLUSIVE, INFECTED, ReversalResult
from modelguard.errors import InvalidInput
from modelguard.nn.probe import evaluating
from modelguard.spec import InputSpec, wrap

if TYPE_CHECKING:
    from modelguard.detection.base import DetectionResult

#: A flagged label is inherited when the reference follows its reversed trigger at least
#: this share as often as the submitted model: a natural trigger of the base mostly still
#: works on it, a trigger planted by the fine-tune not at all. Chosen on the real-scale
#: zoo's tuning fine-tunes, between the two kinds (``bench.bench_reference``, results page).
INHERITED_MIN_RATIO = 0.25

#: Clean images each flagged trigger is stamped on (a seeded random subset of those not of
#: its label: a folder read class by class must not give one class's images only).
REFERENCE_IMAGES = 200

#: Images per forward pass.
REFERENCE_BATCH = 32


@dataclass(frozen=True)
class LabelComparison:
    """One flagged label: the share of the clean images of other labels its reversed
    trigger sends to it on the submitted and on the reference model."""

    label: int
    submitted_success: float
    reference_success: float
    inherited: bool
    #: why a label was not compared (a blend probe's label), else empty
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in dataclasses.asdict(self).items()
        }


@dataclass(frozen=True)
class ReferenceComparison:
    """The flagged labels compared on at most ``images`` clean images each; ``name`` says
    which reference (a file name or an artifact digest, for the reader)."""

    labels: tuple[LabelComparison, ...]
    images: int
    min_ratio: float
    name: str = ""

    @property
    def inherited(self) -> tuple[int, ...]:
        return tuple(c.label for c in self.labels if c.inherited)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.name,
            "images": self.images,
            "min_ratio": self.min_ratio,
            "labels": [c.to_dict() for c in self.labels],
            "inherited": list(self.inherited),
        }


@torch.no_grad()
def compare_with_reference(
    result: ReversalResult,
    model: nn.Module,
    reference: nn.Module,
    data: Dataset,
    spec: InputSpec,
    *,
    min_ratio: float = INHERITED_MIN_RATIO,
    max_images: int = REFERENCE_IMAGES,
    name: str = "",
) -> ReferenceComparison:
    """Each flagged label's reversed trigger on ``model`` and on ``reference`` (see the
    module docstring). ``InvalidInput`` when the reference does not answer the same
    classes for the declared input."""
    if not 0.0 < min_ratio <= 1.0:
        raise InvalidInput(f"the reference ratio must be in (0, 1]; got {min_ratio}")
    with evaluating(model), evaluating(reference):
        submitted, trusted = wrap(model, spec), wrap(reference, spec)
        probe = data.x[:1]
        classes = int(submitted(probe).shape[-1])
        try:
            reference_classes = int(trusted(probe).shape[-1])
        except RuntimeError as error:
            raise InvalidInput(
                f"the reference model does not take the declared input: {error}"
            ) from None
        if reference_classes != classes:
            raise InvalidInput(
                f"the reference model answers {reference_classes} classes, the submitted one "
                f"{classes}: a reference must be the same task (the model it was fine-tuned "
                "from)"
            )
        blended = blend_probe_label(result)
        compared, images = [], 0
        generator = torch.Generator().manual_seed(0)
        for label in result.flagged:
            if label == blended:
                note = "the blend probe's label: a noise blend is not compared"
                compared.append(LabelComparison(label, math.nan, math.nan, False, note))
                continue
            mask, pattern = result.trigger(label)
            others = data.x[data.y != label]
            x = others[torch.randperm(len(others), generator=generator)[:max_images]]
            images = max(images, int(x.shape[0]))
            shares = [stamped_share(m, x, mask, pattern, label) for m in (submitted, trusted)]
            inherited = shares[0] > 0 and shares[1] >= min_ratio * shares[0]
            compared.append(LabelComparison(label, shares[0], shares[1], inherited))
    return ReferenceComparison(tuple(compared), images, min_ratio, name)


def set_aside(result: DetectionResult) -> tuple[int, ...]:
    """The labels a reference comparison set aside as inherited (none without one)."""
    evidence = result.to_dict().get("evidence") or {}
    compared = evidence.get("reference") or {}
    return tuple(int(label) for label in compared.get("inherited", ()))


def blend_probe_label(result: ReversalResult) -> int | None:
    """The label the blend probe flagged (its trigger is the probe's blend), if any."""
    probe = result.evidence.get("blend_probe")
    if isinstance(probe, dict) and probe.get("flagged"):
        label = probe.get("label")
        return int(label) if isinstance(label, int) else None
    return None


def stamped_share(
    model: nn.Module, x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor, label: int
) -> float:
    """The share of ``x`` stamped with the trigger that ``model`` answers with ``label``."""
    if len(x) == 0:
        return 0.0
    hits = 0
    for start in range(0, len(x), REFERENCE_BATCH):
        batch = x[start : start + REFERENCE_BATCH]
        stamped = (1 - mask) * batch + mask * pattern
        hits += int((model(stamped).argmax(-1) == label).sum())
    return hits / len(x)


def apply_reference(result: ReversalResult, comparison: ReferenceComparison) -> ReversalResult:
    """``result`` with its inherited labels set aside: no longer flagged (an ``infected``
    verdict whose every flagged label is inherited becomes ``clean``, or ``inconclusive``
    when the reversal itself was), named in the evidence's summary, the comparison under
    ``evidence["reference"]``."""
    inherited = set(comparison.inherited)
    flagged = tuple(label for label in result.flagged if label not in inherited)
    verdict = result.verdict
    found = str(result.evidence.get("summary", "")) or f"{verdict}: labels {list(result.flagged)}"
    summary = found
    if inherited:
        parts = [
            f"label {c.label} (the reference follows its trigger on "
            f"{c.reference_success:.0%} of the images, the submitted model on "
            f"{c.submitted_success:.0%})"
            for c in comparison.labels
            if c.inherited
        ]
        aside = (
            f"set aside as inherited from the reference model{_named(comparison.name)}: "
            + "; ".join(parts)
        )
        if verdict == INFECTED and not flagged:
            reason = result.evidence.get("reason")
            verdict = INCONCLUSIVE if reason else CLEAN
            head = f"inconclusive: {reason}" if reason else "clean against the reference"
            summary = f"{head}: every flagged trigger is inherited, {aside}"
        else:
            summary = f"{verdict}: label(s) {list(flagged)} after the comparison, {aside}"
        summary += f"; before the comparison: {found}"
    kept = [c for c in comparison.labels if not c.inherited]
    if kept:
        summary += "; not inherited: " + "; ".join(
            f"label {c.label} ({c.note})"
            if c.note
            else f"label {c.label} (reference {c.reference_success:.0%}, submitted "
            f"{c.submitted_success:.0%})"
            for c in kept
        )
    evidence = {**result.evidence, "summary": summary, "reference": comparison.to_dict()}
    return dataclasses.replace(result, flagged=flagged, verdict=verdict, evidence=evidence)


def _named(name: str) -> str:
    return f" {name}" if name else ""
