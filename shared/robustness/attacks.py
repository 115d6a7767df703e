"""Evasion attacks on a classifier: FGSM and PGD under an L∞ or an L2 budget.

Papers: Goodfellow, Shlens and Szegedy, "Explaining and Harnessing Adversarial Examples",
ICLR 2015 (FGSM; its L2 form is the "fast gradient method"); Madry et al., "Towards Deep
Learning Models Resistant to Adversarial Attacks", ICLR 2018 (PGD with a random start).

Every attack works in the input's own value range: ``model`` takes raw inputs (wrap a
model that normalises with `modelguard.spec.wrap` first), ``eps`` is measured in the
units of the data (0.3 on MNIST in [0, 1] is Madry's budget) and every adversarial
image is clamped into ``value_range``. Tensors are ``(N, C, H, W)`` images and ``(N,)``
int64 labels. Untargeted attacks ascend the cross-entropy of the true label; targeted
ones descend the cross-entropy of the ``target`` label. The model is never changed (its
parameters get no gradient and its train/eval mode is left as it was).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from modelguard.errors import InvalidInput

Norm = Literal["linf", "l2"]
NORMS: tuple[Norm, ...] = ("linf", "l2")
#: Guards the L2 divisions; far below any gradient that is not exactly zero (a saturated
#: softmax still leaves gradients of 1e-20 and less, whose direction is all that counts).
_TINY = 1e-30


def check_norm(norm: str) -> Norm:
    """``norm`` if it is one of `NORMS`, else `InvalidInput`."""
    if norm not in NORMS:
        raise InvalidInput(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    return norm


def _per_image_l2(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each image, shaped ``(N, 1, 1, 1)`` to broadcast."""
    lengths: torch.Tensor = torch.linalg.vector_norm(t.flatten(1), dim=1)
    return lengths.view(-1, *([1] * (t.dim() - 1)))


def loss_gradient(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, targeted: bool = False
) -> torch.Tensor:
    """The gradient of the attack's objective with respect to ``x``: of the cross-entropy
    of ``labels`` (summed, so an image's gradient does not depend on the batch), negated
    when ``targeted`` (the attack then moves towards ``labels``). Shape of ``x``."""
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x).float(), labels, reduction="sum")
    (grad,) = torch.autograd.grad(-loss if targeted else loss, [x])
    return grad.detach()


def steepest_step(grad: torch.Tensor, size: float, norm: Norm) -> torch.Tensor:
    """The step of length ``size`` (in ``norm``) along which ``grad`` rises fastest:
    ``size · sign(grad)`` for L∞, ``size · grad / ‖grad‖₂`` for L2 (zero where the
    gradient is zero)."""
    if norm == "linf":
        return size * grad.sign()
    wide = grad.double()  # the squares of a saturated softmax's tiny gradients underflow
    length = _per_image_l2(wide)
    return (size * wide / length.clamp_min(_TINY) * (length > 0)).to(grad.dtype)


def project(
    x_adv: torch.Tensor,
    x: torch.Tensor,
    eps: float,
    norm: Norm,
    value_range: tuple[float, float],
) -> torch.Tensor:
    """``x_adv`` moved into the ``eps``-ball around ``x`` (in ``norm``), then into
    ``value_range``. Clamping after the projection keeps the ball: ``x`` is in range, so
    clamping only moves a coordinate towards it."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        length = _per_image_l2(delta)
        delta = delta * (eps / length.clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta).clamp(*value_range)


def random_start(
    x: torch.Tensor,
    eps: float,
    norm: Norm,
    value_range: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """A point drawn uniformly from the ``eps``-ball around each image (L∞: a uniform
    cube; L2: a Gaussian direction, radius ``eps · u^(1/d)``), clamped into range."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
        delta = eps * noise
    else:
        direction = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        direction = direction / _per_image_l2(direction).clamp_min(_TINY)
        dims = x[0].numel()
        radius = torch.rand((x.shape[0],), generator=generator, dtype=x.dtype) ** (1 / dims)
        delta = eps * direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return (x + delta.to(x.device)).clamp(*value_range)


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    *,
    norm: Norm = "linf",
    value_range: tuple[float, float] = (0.0, 1.0),
    targeted: bool = False,
) -> torch.Tensor:
    """One gradient step of length ``eps``: ``x + eps · sign(∇ loss)`` for L∞ (Goodfellow
    et al.), ``x + eps · ∇/‖∇‖₂`` for L2, clamped into ``value_range``. ``labels`` are the
    true labels, or the targets when ``targeted``."""
    step = steepest_step(loss_gradient(model, x, labels, targeted=targeted), eps, norm)
    return (x + step).clamp(*value_range).detach()


@dataclass(frozen=True)
class PgdConfig:
    """Projected gradient descent (Madry et al. 2018).

    ``steps`` iterations of a steepest step of ``step_fraction · eps`` each, projected
    back into the ball and the value range, from a random point of the ball when
    ``random_start``; ``restarts`` independent runs, an image counting as fooled when any
    run fools it. The default step, 2.5 · eps / steps, is the one Madry et al. use: it lets
    a run cross the ball and still refine."""

    steps: int = 20
    restarts: int = 1
    step_fraction: float = 0.0  # 0: 2.5 / steps
    random_start: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise InvalidInput(f"PGD needs at least one step; got {self.steps}")
        if not (isinstance(self.restarts, int) and self.restarts >= 1):
            raise InvalidInput(f"PGD needs at least one run (restarts >= 1); got {self.restarts}")
        if not (math.isfinite(self.step_fraction) and self.step_fraction >= 0):
            raise InvalidInput(f"step fraction must be >= 0; got {self.step_fraction}")

    @property
    def step_size_fraction(self) -> float:
        return self.step_fraction or 2.5 / self.steps


def succeeded(
    logits: torch.Tensor, labels: torch.Tensor, *, targeted: bool = False
) -> torch.Tensor:
    """Per image, whether an attack reached its goal: the prediction differs from the true
    ``labels`` (untargeted) or equals the target ``labels`` (targeted). ``(N,)`` bool."""
    predicted = logits.argmax(1)
    return predicted == labels if targeted else predicted != labels


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    config: PgdConfig = PgdConfig(),
    *,
    norm: Norm = "linf",
    value_range: tuple[float, float] = (0.0, 1.0),
    targeted: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD's adversarial images, shape of ``x``: per image, the first run's result that
    reaches the goal (see `succeeded`), else the last run's. ``labels`` are the true
    labels, or the targets when ``targeted``. Seeded by ``generator`` (default: seed 0)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    step = config.step_size_fraction * eps
    best = x.detach().clone()
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _run in range(config.restarts):
        x_adv = random_start(x, eps, norm, value_range, generator) if config.random_start else x
        for _ in range(config.steps):
            grad = loss_gradient(model, x_adv, labels, targeted=targeted)
            x_adv = project(x_adv + steepest_step(grad, step, norm), x, eps, norm, value_range)
        with torch.no_grad():
            reached = succeeded(model(x_adv), labels, targeted=targeted)
        take = ~done
        best[take] = x_adv[take].detach()
        done |= reached
        if bool(done.all()):
            break
    return best
