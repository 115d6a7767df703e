"""The blend probe: a check for whole-image blended triggers that trigger reversal misses.

A blended trigger (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using
Data Poisoning", 2017) mixes a pattern into the whole image, ``x' = (1 − α) x + α p``.
Neural Cleanse looks for the *smallest* mask that flips images to a label; a blend has no
small mask, and on an ImageNet classifier a universal adversarial blend to some label is
about as cheap as the backdoor's, so neither the reversal nor a search for the smallest
blend tells a blend backdoor from a benign model.

What does tell them apart: a model taught to answer a noise-like pattern answers *fresh*
noise of the same kind. The probe blends ``patterns`` noise images drawn at random by the
audit (uniform and Gaussian, alternately) into the clean images at each of ``alphas`` and
counts, per probe, the share of the images not already of a label that go to that label.
A benign model scatters noisy images over a few texture classes; a blend-backdoored one
sends most of them to its target. The largest share over the probes is compared with
``threshold``, chosen on the real-scale tuning models (see the project's results page).
A share is judged only over at least ``min_other_share`` of the images: when a label
already holds nearly every clean image (a model that barely tells the clean images
apart, e.g. an untrained one), the few left say nothing, and the result says so.

It costs ``len(alphas) × patterns + 1`` forward passes of at most ``max_images`` images
and no gradient. It finds noise-like blends; a blend of a natural image is outside what it
probes, and the results page says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.errors import InvalidInput
from modelguard.spec import InputSpec

UNIFORM, GAUSSIAN = "uniform", "gaussian"


@dataclass(frozen=True)
class BlendProbeConfig:
    """``alphas``: blend strengths probed; ``patterns``: noise images drawn per strength
    (even ones uniform, odd ones Gaussian around mid-grey); ``threshold``: the share of
    images sent to one label by a probe at or above which the label is flagged;
    ``max_images``: clean images used at most (a seeded subset); ``batch_images``: images
    per forward pass; ``min_other_share``: the share of the images that must be of other
    labels on the clean images for a probe's share to be judged; ``seed``: the probes'
    draw."""

    alphas: tuple[float, ...] = (0.1, 0.2, 0.3)
    patterns: int = 2
    threshold: float = 0.6
    max_images: int = 96
    batch_images: int = 16
    min_other_share: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.alphas or not all(0.0 < a < 1.0 for a in self.alphas):
            raise InvalidInput(f"blend probe alphas must lie in (0, 1); got {self.alphas}")
        if self.patterns < 1 or self.max_images < 2 or self.batch_images < 1:
            raise InvalidInput("blend probe: patterns >= 1, max_images >= 2, batch_images >= 1")
        if not 0.0 < self.threshold <= 1.0:
            raise InvalidInput(f"blend probe threshold must be in (0, 1]; got {self.threshold}")
        if not 0.0 <= self.min_other_share < 1.0:
            raise InvalidInput(
                f"blend probe min_other_share must be in [0, 1); got {self.min_other_share}"
            )


@dataclass(frozen=True)
class ProbeRow:
    """One probe: its noise kind, strength, the label most of its moved images went to
    (−1: none moved), the share of the images not of that label (``others`` of them on
    the clean images) that went there, and whether that share is judged (enough others)."""

    kind: str
    alpha: float
    label: int
    share: float
    others: int = 0
    judged: bool = True


@dataclass(frozen=True)
class BlendProbeResult:
    """The probes, the strongest of them, and whether it flags its label. ``pattern`` is
    the strongest probe's noise image ``(C, H, W)`` in the raw value range (the trigger a
    repair unlearns: a full-image mask of ``alpha``)."""

    rows: tuple[ProbeRow, ...]
    label: int
    share: float
    alpha: float
    threshold: float
    pattern: torch.Tensor
    images: int
    seconds: float
    #: Why probes were not judged (empty when every one was).
    note: str = ""

    @property
    def flagged(self) -> bool:
        return self.label >= 0 and self.share >= self.threshold

    def to_dict(self) -> dict[str, object]:
        return {
            "flagged": self.flagged,
            "label": self.label,
            "share": round(self.share, 4),
            "alpha": self.alpha,
            "threshold": self.threshold,
            "images": self.images,
            "seconds": round(self.seconds, 2),
            **({"note": self.note} if self.note else {}),
            "probes": [asdict(row) for row in self.rows],
        }


def noise_pattern(kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A noise image ``shape`` = (C, H, W) in relative units [0, 1]."""
    if kind == UNIFORM:
        return torch.rand(shape, generator=generator)
    return (0.5 + 0.2 * torch.randn(shape, generator=generator)).clamp(0.0, 1.0)


@torch.no_grad()
def probe_blend(
    model: nn.Module, data: Dataset, spec: InputSpec, config: BlendProbeConfig | None = None
) -> BlendProbeResult:
    """Run the probe on ``model`` (a function of raw inputs in ``spec.value_range``, as
    `modelguard.spec.wrap` gives, in eval mode) with the clean images of ``data``."""
    config = config or BlendProbeConfig()
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    x = data.x
    if len(x) > config.max_images:
        x = x[torch.randperm(len(x), generator=generator)[: config.max_images]]
    low, high = spec.value_range

    def predict(images: torch.Tensor) -> torch.Tensor:
        step = config.batch_images
        return torch.cat(
            [model(images[i : i + step]).argmax(1) for i in range(0, len(images), step)]
        )

    clean = predict(x)
    # a hair under the product: 0.3 × 10 is 3.0000000000000004 in binary
    min_others = math.ceil(config.min_other_share * len(x) - 1e-9)
    rows: list[ProbeRow] = []
    best: tuple[float, int, float, torch.Tensor] = (-1.0, -1, 0.0, torch.zeros(x.shape[1:]))
    for index in range(config.patterns):
        kind = UNIFORM if index % 2 == 0 else GAUSSIAN
        pattern = low + (high - low) * noise_pattern(kind, tuple(x.shape[1:]), generator)
        for alpha in config.alphas:
            predicted = predict((1 - alpha) * x + alpha * pattern)
            moved = predicted[predicted != clean]
            if len(moved) == 0:
                rows.append(ProbeRow(kind, alpha, -1, 0.0))
                continue
            label = int(torch.mode(moved).values)
            others = clean != label
            count = int(others.sum())
            share = float(((predicted == label) & others).sum()) / max(1, count)
            judged = count >= min_others
            rows.append(ProbeRow(kind, alpha, label, round(share, 4), count, judged))
            if judged and share > best[0]:
                best = (share, label, alpha, pattern)
    share, label, alpha, pattern = best
    unjudged = sorted({row.label for row in rows if not row.judged})
    note = (
        f"label(s) {', '.join(map(str, unjudged))} already hold more than "
        f"{1 - config.min_other_share:.0%} of the {len(x)} clean images: too few others to "
        "judge a share to them (the model barely tells the clean images apart)"
        if unjudged
        else ""
    )
    return BlendProbeResult(
        rows=tuple(rows),
        label=label,
        share=max(0.0, share),
        alpha=alpha,
        threshold=config.threshold,
        pattern=pattern,
        images=len(x),
        seconds=time.perf_counter() - started,
        note=note,
    )
