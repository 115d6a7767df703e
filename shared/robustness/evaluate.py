"""Robust accuracy against ε, and a sanity check for gradient masking.

For each ε of the user's list (in the input's value range, ascending) every image is
attacked with FGSM, PGD and — for the sanity check — a stronger PGD (twice the steps,
one more random start). An image counts as robust at ε when it is classified correctly
and no attack at ε, nor at any smaller ε, changed that: a smaller ball lies inside a
larger one, so an adversarial image found at ε′ < ε is one at ε too and the reported
curve is non-increasing by construction. Each attack's own accuracy is reported as it
came out, and it is those raw figures the sanity check reads.

The sanity check follows Athalye, Carlini and Wagner, "Obfuscated Gradients Give a False
Sense of Security", ICML 2018, and Carlini et al., "On Evaluating Adversarial
Robustness", 2019: gradient-based figures only mean something when the gradients lead
somewhere. It flags the evaluation, with the reasons, when

* the loss gradient is exactly zero for many images (the attacks see no direction:
  quantised or non-differentiable inputs, a saturated softmax);
* PGD leaves more images correct than FGSM at some ε (iterations should only help);
* the stronger PGD leaves more images correct than PGD (more steps or starts should
  only help);
* an attack's accuracy rises with ε (a larger ball contains the smaller one);
* PGD with an unbounded ε (the whole value range) leaves images correct: an attack that
  may change everything must win.

Differences within ``max(tolerance, 2 images)`` are noise and pass. A flagged
evaluation's robust accuracy is an upper bound nobody should rely on.

The work is sized like the backdoor detectors': the images of one pass come from the
memory budget and the model's measured cost per image (`modelguard.detection.budget`),
and the number of images from the time budget; a run that still overruns stops between
batches with the figures of the images done, and says so.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.budget import BASELINE_BYTES, measure_pass_cost
from modelguard.errors import InvalidInput
from modelguard.progress import Progress
from modelguard.robustness.attacks import (
    Norm,
    PgdConfig,
    check_norm,
    fgsm,
    loss_gradient,
    pgd,
    succeeded,
)
from modelguard.spec import InputSpec, wrap

log = logging.getLogger(__name__)

FGSM, PGD, PGD_STRONG = "fgsm", "pgd", "pgd-strong"
#: Verdicts of an evaluation (`robustness_verdict`).
ROBUST, FRAGILE, MASKED_GRADIENTS = "robust", "fragile", "masked gradients"
#: A model is "robust" when at least this share of the images stays correct under every
#: attack at the largest ε asked for. Half: Madry et al. (2018) report about 89% for a
#: PGD-trained MNIST network at ε = 0.3 (L∞) and near 0% for a standard one, so the line
#: separates the two by far; a deployment with its own requirement reads the curve.
ROBUST_ACCURACY_FLOOR = 0.5
#: The share of the time budget the plan fills: the cost per image is measured on two
#: images and a run must not overrun on a noisy machine.
TIME_PLAN_SHARE = 0.8


@dataclass(frozen=True)
class RobustnessConfig:
    """What to measure (``eps`` in the data's units, ``norm``, PGD's ``steps`` and
    ``restarts``, ``targeted``) on at most ``max_images`` images, within
    ``memory_budget_mb`` and ``time_budget_seconds``. ``batch_size`` 0 sizes a pass from
    the memory budget. ``masking_check`` adds the stronger PGD and the unbounded run.
    Targets of a targeted attack are drawn per image (``seed``) among the other labels."""

    eps: tuple[float, ...]
    norm: Norm = "linf"
    steps: int = 20
    restarts: int = 1
    targeted: bool = False
    max_images: int = 500
    masking_check: bool = True
    tolerance: float = 0.02
    zero_gradient_max: float = 0.1
    unbounded_max_accuracy: float = 0.1
    seed: int = 0
    batch_size: int = 0
    max_batch_images: int = 256
    memory_budget_mb: int = 4096
    time_budget_seconds: float = 480.0

    def __post_init__(self) -> None:
        check_norm(self.norm)
        if not self.eps or any(not (math.isfinite(e) and e > 0) for e in self.eps):
            raise InvalidInput(f"eps takes one or more positive numbers; got {list(self.eps)}")
        object.__setattr__(self, "eps", tuple(sorted(set(float(e) for e in self.eps))))
        PgdConfig(steps=self.steps, restarts=self.restarts)  # validates them
        if self.max_images < 1 or self.batch_size < 0 or self.max_batch_images < 1:
            raise InvalidInput("max_images >= 1, batch_size >= 0 and max_batch_images >= 1")
        for name in ("tolerance", "zero_gradient_max", "unbounded_max_accuracy"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise InvalidInput(f"{name} must lie in [0, 1]; got {value}")
        if self.memory_budget_mb < 1 or not (
            math.isfinite(self.time_budget_seconds) and self.time_budget_seconds > 0
        ):
            raise InvalidInput("the memory budget must be >= 1 MB and the time budget > 0 s")

    @classmethod
    def of_request(
        cls, eps: Sequence[float], norm: str = "", steps: int = 0, **options: Any
    ) -> RobustnessConfig:
        """The config of a request whose empty ``norm`` and zero ``steps`` mean the
        defaults (an audit's options); ``options``: any other field."""
        if norm:
            options["norm"] = norm
        if steps:
            options["steps"] = steps
        return cls(eps=tuple(eps), **options)

    def attacks(self) -> dict[str, PgdConfig | None]:
        """The attacks run at every ε: name → PGD config (None for FGSM)."""
        runs: dict[str, PgdConfig | None] = {
            FGSM: None,
            PGD: PgdConfig(steps=self.steps, restarts=self.restarts),
        }
        if self.masking_check:
            runs[PGD_STRONG] = PgdConfig(steps=2 * self.steps, restarts=self.restarts + 1)
        return runs

    def passes_per_image(self) -> int:
        """Forward and backward passes one image costs: the attacks at every ε, the
        gradient check, the unbounded run and the clean pass."""
        per_eps = sum(
            1 if c is None else c.steps * c.restarts + c.restarts for c in self.attacks().values()
        )
        extra = 2 + (self.steps + 1 if self.masking_check else 0)
        return per_eps * len(self.eps) + extra

    def to_dict(self) -> dict[str, Any]:
        return {
            "eps": list(self.eps),
            "norm": self.norm,
            "steps": self.steps,
            "restarts": self.restarts,
            "targeted": self.targeted,
            "max_images": self.max_images,
            "masking_check": self.masking_check,
            "memory_mb": self.memory_budget_mb,
            "time_seconds": self.time_budget_seconds,
        }


@dataclass(frozen=True)
class AttackAccuracy:
    """One attack at one ε: the share of images still classified correctly, and the
    share where the attack reached its goal (misclassified; the target when targeted)."""

    attack: str
    accuracy: float
    success_rate: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "accuracy": round(self.accuracy, 4),
            "success_rate": round(self.success_rate, 4),
        }


@dataclass(frozen=True)
class RobustPoint:
    """Robust accuracy at one ε: correct under every attack at this and every smaller ε."""

    eps: float
    robust_accuracy: float
    attacks: tuple[AttackAccuracy, ...]

    def accuracy_of(self, attack: str) -> float:
        return next(a.accuracy for a in self.attacks if a.attack == attack)

    def to_dict(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "robust_accuracy": round(self.robust_accuracy, 4),
            "attacks": [a.to_dict() for a in self.attacks],
        }


@dataclass(frozen=True)
class MaskingCheck:
    """The gradient-masking sanity check: ``flagged`` with the ``reasons``; the figures
    it read besides the curve (None when not measured)."""

    flagged: bool
    reasons: tuple[str, ...]
    zero_gradient_fraction: float
    unbounded_accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "flagged": self.flagged,
            "reasons": list(self.reasons),
            "zero_gradient_fraction": round(self.zero_gradient_fraction, 4),
            "unbounded_accuracy": (
                None if self.unbounded_accuracy is None else round(self.unbounded_accuracy, 4)
            ),
        }


@dataclass(frozen=True)
class RobustnessResult:
    """Robust accuracy against ε (``points``, ascending ε) on ``images`` images."""

    config: RobustnessConfig
    images: int
    clean_accuracy: float
    points: tuple[RobustPoint, ...]
    masking: MaskingCheck
    seconds: float
    batch_size: int
    out_of_time: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def robust_accuracy(self, eps: float) -> float:
        return next(p.robust_accuracy for p in self.points if p.eps == eps)

    def below(self, threshold: float) -> bool:
        """Whether the robust accuracy at some ε (the largest: the curve does not rise)
        is below ``threshold``."""
        return any(p.robust_accuracy < threshold for p in self.points)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.config.to_dict(),
            "images": self.images,
            "clean_accuracy": round(self.clean_accuracy, 4),
            "points": [p.to_dict() for p in self.points],
            "masking": self.masking.to_dict(),
            "batch_size": self.batch_size,
            "out_of_time": self.out_of_time,
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


def robustness_verdict(result: RobustnessResult, floor: float = ROBUST_ACCURACY_FLOOR) -> str:
    """``masked gradients`` when the sanity check flagged the evaluation (its figures are
    an upper bound, so neither of the others can be said), else ``robust`` when the robust
    accuracy at the largest ε is at least ``floor``, else ``fragile``."""
    if result.masking.flagged:
        return MASKED_GRADIENTS
    return ROBUST if result.points[-1].robust_accuracy >= floor else FRAGILE


def draw_targets(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """A target label per image, uniform among the labels other than its own."""
    if num_classes < 2:
        raise InvalidInput("a targeted attack needs a model with at least two classes")
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


def _batch_size(net: nn.Module, x: torch.Tensor, config: RobustnessConfig) -> tuple[int, float]:
    """Images per pass and the measured seconds per image and pass."""
    cost = measure_pass_cost(net, x)
    if config.batch_size:
        return config.batch_size, cost.seconds_per_image
    room = (config.memory_budget_mb << 20) - BASELINE_BYTES
    if room <= 0:
        raise InvalidInput(
            f"a memory budget of {config.memory_budget_mb} MB leaves no room for the "
            "attacks' passes: raise it"
        )
    return min(config.max_batch_images, cost.images_per_pass(room)), cost.seconds_per_image


class _Counts:
    """Running sums over the batches done."""

    def __init__(self, config: RobustnessConfig) -> None:
        self.images = 0
        self.clean = 0
        self.zero_gradient = 0
        self.unbounded = 0
        self.robust = [0] * len(config.eps)
        names = list(config.attacks())
        self.correct = [dict.fromkeys(names, 0) for _ in config.eps]
        self.success = [dict.fromkeys(names, 0) for _ in config.eps]


def evaluate_robustness(
    model: nn.Module,
    data: Dataset,
    spec: InputSpec,
    config: RobustnessConfig,
    *,
    progress: Progress | None = None,
) -> RobustnessResult:
    """Robust accuracy of ``model`` (taking inputs normalised as ``spec`` declares) on
    ``data`` (``(N, C, H, W)`` in ``spec.value_range``, true labels) at each of
    ``config.eps``, with the gradient-masking check. The model is left as it was."""
    started = time.perf_counter()
    deadline = started + config.time_budget_seconds
    if len(data) == 0:
        raise InvalidInput("robustness needs at least one labelled image")
    if tuple(data.x.shape[1:]) != tuple(spec.shape):
        raise InvalidInput(
            f"the images have shape {list(data.x.shape[1:])}, the model's input is "
            f"{list(spec.shape)}"
        )
    low, high = spec.value_range
    width = high - low
    if config.norm == "linf" and config.eps[-1] > width:
        raise InvalidInput(
            f"an L∞ ε of {config.eps[-1]:g} exceeds the value range {low:g}..{high:g}: ε is "
            "measured in the data's own units"
        )
    notes: list[str] = []
    if len(data) > config.max_images:
        data = data.subset(config.max_images, seed=config.seed)
        notes.append(f"a seeded subset of {config.max_images} images was attacked")
    net = wrap(model, spec)
    was_training = model.training
    net.eval()
    try:
        batch, seconds_per_pass = _batch_size(net, data.x[:2].float(), config)
        affordable = int(
            TIME_PLAN_SHARE
            * config.time_budget_seconds
            / max(1e-9, seconds_per_pass * config.passes_per_image())
        )
        if affordable < len(data):
            count = max(1, affordable)
            data = data.subset(count, seed=config.seed)
            notes.append(
                f"the time budget ({config.time_budget_seconds:g} s) affords about "
                f"{count} images at this model's speed: {count} were attacked"
            )
        counts, out_of_time = _run(net, data, spec, config, batch, deadline, progress)
    finally:
        model.train(was_training)
    if out_of_time:
        notes.append(
            f"the time budget ({config.time_budget_seconds:g} s) ran out: the figures are "
            f"those of the first {counts.images} of {len(data)} images"
        )
    points = tuple(
        RobustPoint(
            eps=eps,
            robust_accuracy=counts.robust[i] / counts.images,
            attacks=tuple(
                AttackAccuracy(
                    attack=name,
                    accuracy=counts.correct[i][name] / counts.images,
                    success_rate=counts.success[i][name] / counts.images,
                )
                for name in config.attacks()
            ),
        )
        for i, eps in enumerate(config.eps)
    )
    masking = masking_check(
        points,
        config,
        images=counts.images,
        zero_gradient_fraction=counts.zero_gradient / counts.images,
        unbounded_accuracy=counts.unbounded / counts.images if config.masking_check else None,
    )
    return RobustnessResult(
        config=config,
        images=counts.images,
        clean_accuracy=counts.clean / counts.images,
        points=points,
        masking=masking,
        seconds=time.perf_counter() - started,
        batch_size=batch,
        out_of_time=out_of_time,
        notes=tuple(notes),
    )


def _run(
    net: nn.Module,
    data: Dataset,
    spec: InputSpec,
    config: RobustnessConfig,
    batch: int,
    deadline: float,
    progress: Progress | None,
) -> tuple[_Counts, bool]:
    """The attacks over ``data`` in batches; the counts and whether time ran out."""
    generator = torch.Generator().manual_seed(config.seed)
    value_range = spec.value_range
    low, high = value_range
    unbounded_eps = (high - low) * (1.0 if config.norm == "linf" else math.sqrt(data.x[0].numel()))
    counts = _Counts(config)
    attacks = config.attacks()
    batches = math.ceil(len(data) / batch)
    for number, start in enumerate(range(0, len(data), batch)):
        if number and time.perf_counter() > deadline:
            return counts, True
        x = data.x[start : start + batch].float()
        y = data.y[start : start + batch]
        with torch.no_grad():
            logits = net(x)
        clean = logits.argmax(1) == y
        goal = draw_targets(y, int(logits.shape[1]), generator) if config.targeted else y
        grad = loss_gradient(net, x, y)
        counts.zero_gradient += int((grad.flatten(1) == 0).all(dim=1).sum())
        robust = clean.clone()
        for i, eps in enumerate(config.eps):
            for name, pgd_config in attacks.items():
                kwargs: dict[str, Any] = {
                    "norm": config.norm,
                    "value_range": value_range,
                    "targeted": config.targeted,
                }
                if pgd_config is None:
                    x_adv = fgsm(net, x, goal, eps, **kwargs)
                else:
                    x_adv = pgd(net, x, goal, eps, pgd_config, generator=generator, **kwargs)
                with torch.no_grad():
                    adv_logits = net(x_adv)
                correct = adv_logits.argmax(1) == y
                counts.correct[i][name] += int(correct.sum())
                counts.success[i][name] += int(
                    succeeded(adv_logits, goal, targeted=config.targeted).sum()
                )
                robust &= correct
            counts.robust[i] += int(robust.sum())
            if progress is not None:
                done = (number + (i + 1) / len(config.eps)) / batches
                progress(done, f"ε = {eps:g}: images {start + len(y)} of {len(data)}")
        if config.masking_check:
            x_adv = pgd(
                net,
                x,
                goal,
                unbounded_eps,
                PgdConfig(steps=config.steps),
                generator=generator,
                norm=config.norm,
                value_range=value_range,
                targeted=config.targeted,
            )
            with torch.no_grad():
                counts.unbounded += int((net(x_adv).argmax(1) == y).sum())
        counts.clean += int(clean.sum())
        counts.images += len(y)
    return counts, False


def masking_check(
    points: tuple[RobustPoint, ...],
    config: RobustnessConfig,
    *,
    images: int,
    zero_gradient_fraction: float,
    unbounded_accuracy: float | None,
) -> MaskingCheck:
    """The sanity check of the module docstring on the raw per-attack accuracies."""
    slack = max(config.tolerance, 2 / max(1, images))
    reasons: list[str] = []
    if zero_gradient_fraction > config.zero_gradient_max:
        reasons.append(
            f"the loss gradient is exactly zero for {zero_gradient_fraction:.0%} of the "
            "images: the attacks see no direction (quantised or non-differentiable input "
            "processing, or a saturated softmax)"
        )
    for point in points:
        fgsm_acc, pgd_acc = point.accuracy_of(FGSM), point.accuracy_of(PGD)
        if pgd_acc > fgsm_acc + slack:
            reasons.append(
                f"at ε = {point.eps:g} PGD leaves more images correct ({pgd_acc:.1%}) than "
                f"one FGSM step ({fgsm_acc:.1%})"
            )
        if config.masking_check:
            strong = point.accuracy_of(PGD_STRONG)
            if strong > pgd_acc + slack:
                reasons.append(
                    f"at ε = {point.eps:g} PGD with more steps and restarts leaves more "
                    f"images correct ({strong:.1%}) than PGD ({pgd_acc:.1%})"
                )
    for name in config.attacks():
        for smaller, larger in pairwise(points):
            before, after = smaller.accuracy_of(name), larger.accuracy_of(name)
            if after > before + slack:
                reasons.append(
                    f"{name} accuracy rises with ε: {before:.1%} at ε = {smaller.eps:g}, "
                    f"{after:.1%} at ε = {larger.eps:g}"
                )
    if unbounded_accuracy is not None and unbounded_accuracy > config.unbounded_max_accuracy:
        reasons.append(
            f"PGD with an unbounded ε (the whole value range) leaves {unbounded_accuracy:.1%} "
            f"of the images correct (expected at most {config.unbounded_max_accuracy:.0%})"
        )
    for reason in reasons:
        log.info("gradient-masking check: %s", reason)
    return MaskingCheck(
        flagged=bool(reasons),
        reasons=tuple(reasons),
        zero_gradient_fraction=zero_gradient_fraction,
        unbounded_accuracy=unbounded_accuracy,
    )
