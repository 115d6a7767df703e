"""FGSM and PGD against hand-computed expectations on linear models; PGD stays in its
ball and in the value range; the L2 projection; targeted attacks reach their targets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelguard.errors import InvalidInput
from modelguard.robustness.attacks import (
    PgdConfig,
    check_norm,
    fgsm,
    pgd,
    project,
    random_start,
)
from tests.unit.shared.robustness.models import OneFeaturePerClass, binary_linear

torch.set_num_threads(1)
# the binary model's margin z0 − z1 at x is (2, −3, 0)·x + 0.8
DIRECTION = torch.tensor([2.0, -3.0, 0.0])


def _margin(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) @ DIRECTION + 0.8


def test_fgsm_takes_the_hand_computed_sign_step_and_flips_what_it_should() -> None:
    model = binary_linear()
    x = torch.full((1, 1, 1, 3), 0.5)  # margin 0.3: class 0
    label = torch.tensor([0])
    # ∇ₓ CE(class 0) = p1 · (w1 − w0) = p1 · (−2, 3, 0): sign (−1, 1, 0)
    adv = fgsm(model, x, label, 0.1)
    assert torch.allclose(adv.flatten(), torch.tensor([0.4, 0.6, 0.5]))
    assert float(_margin(adv)) == pytest.approx(0.3 - 5 * 0.1, abs=1e-6)
    assert int(model(adv).argmax(1)) == 1  # 5ε = 0.5 > 0.3: flipped
    weak = fgsm(model, x, label, 0.05)
    assert float(_margin(weak)) == pytest.approx(0.3 - 5 * 0.05, abs=1e-6)
    assert int(model(weak).argmax(1)) == 0  # 5ε = 0.25 < 0.3: holds
    # near the bounds the step is clamped into the value range
    edge = torch.tensor([0.05, 0.98, 0.5]).view(1, 1, 1, 3)
    assert torch.allclose(fgsm(model, edge, label, 0.1).flatten(), torch.tensor([0.0, 1.0, 0.5]))


def test_fgsm_l2_steps_along_the_normalised_gradient() -> None:
    model = binary_linear()
    x = torch.full((1, 1, 1, 3), 0.5)
    adv = fgsm(model, x, torch.tensor([0]), 0.1, norm="l2")
    expected = 0.5 + 0.1 * torch.tensor([-2.0, 3.0, 0.0]) / math.sqrt(13)
    assert torch.allclose(adv.flatten(), expected, atol=1e-6)
    assert float((adv - x).norm()) == pytest.approx(0.1, abs=1e-6)


def test_targeted_fgsm_moves_towards_the_target() -> None:
    model = binary_linear()
    x = torch.full((1, 1, 1, 3), 0.5)
    # towards class 1 is away from class 0 on a binary model: the same step
    adv = fgsm(model, x, torch.tensor([1]), 0.1, targeted=True)
    assert torch.allclose(adv.flatten(), torch.tensor([0.4, 0.6, 0.5]))


@pytest.mark.parametrize(("norm", "dual"), [("linf", 5.0), ("l2", math.sqrt(13))])
def test_pgd_fools_exactly_the_images_within_reach_on_a_linear_model(
    norm: str, dual: float
) -> None:
    """On a linear binary model an image is fooled at ε exactly when its margin is below
    ε times the dual norm of the weight difference (L∞: ‖·‖₁ = 5, L2: ‖·‖₂ = √13)."""
    model = binary_linear()
    generator = torch.Generator().manual_seed(3)
    x = 0.3 + 0.4 * torch.rand(200, 1, 1, 3, generator=generator)  # far from the bounds
    x = x[_margin(x) > 0][:80]  # class-0 images only
    labels = torch.zeros(len(x), dtype=torch.int64)
    eps = 0.04
    adv = pgd(model, x, labels, eps, PgdConfig(steps=10), norm=check_norm(norm))
    fooled = model(adv).argmax(1) == 1
    expected = _margin(x) < dual * eps
    assert 0 < int(expected.sum()) < len(x)  # both kinds present
    assert torch.equal(fooled, expected)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 2.0)])
def test_pgd_stays_in_the_ball_and_the_value_range(
    norm: str, value_range: tuple[float, float]
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).eval()
    low, high = value_range
    x = low + (high - low) * torch.rand(16, 1, 4, 4)
    labels = model(x).argmax(1)
    eps = 0.3 if norm == "linf" else 1.0
    config = PgdConfig(steps=5, restarts=2)
    adv = pgd(model, x, labels, eps, config, norm=check_norm(norm), value_range=value_range)
    delta = (adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps + 1e-5).all())
    assert float(adv.min()) >= low and float(adv.max()) <= high
    assert bool((model(adv).argmax(1) != labels).any())  # it does attack
    assert all(p.grad is None for p in model.parameters())  # the model is untouched


def test_l2_projection_scales_onto_the_sphere_and_keeps_what_is_inside() -> None:
    x = torch.full((2, 1, 1, 4), 0.5)
    outside = x.clone()
    outside[0, 0, 0] += torch.tensor([0.3, 0.4, 0.0, 0.0])  # length 0.5
    outside[1, 0, 0] += torch.tensor([0.03, 0.04, 0.0, 0.0])  # length 0.05: inside
    projected = project(outside, x, 0.1, "l2", (0.0, 1.0))
    assert torch.allclose(projected[0].flatten(), torch.tensor([0.56, 0.58, 0.5, 0.5]))
    assert torch.allclose(projected[1], outside[1])
    linf = project(outside, x, 0.1, "linf", (0.0, 1.0))
    assert torch.allclose(linf[0].flatten(), torch.tensor([0.6, 0.6, 0.5, 0.5]))


def test_random_starts_lie_in_the_ball() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.full((500, 1, 2, 2), 0.5)
    l2 = random_start(x, 0.2, "l2", (0.0, 1.0), generator) - x
    lengths = l2.flatten(1).norm(dim=1)
    assert float(lengths.max()) <= 0.2 + 1e-6 and float(lengths.mean()) > 0.1
    linf = random_start(x, 0.2, "linf", (0.0, 1.0), generator) - x
    assert float(linf.abs().max()) <= 0.2 + 1e-6 and float(linf.abs().mean()) > 0.05


def test_targeted_pgd_reaches_the_target_exactly_when_it_is_within_reach() -> None:
    """Class-c images with x_c = 0.9 and 0.1 elsewhere reach target t once
    0.1 + ε > 0.9 − ε, i.e. at ε > 0.4."""
    model = OneFeaturePerClass()
    x = torch.full((3, 1, 1, 3), 0.1)
    for c in range(3):
        x[c, 0, 0, c] = 0.9
    targets = torch.tensor([1, 2, 0])
    for eps, reached in ((0.35, False), (0.45, True)):
        adv = pgd(model, x, targets, eps, PgdConfig(steps=20), targeted=True)
        assert bool((model(adv).argmax(1) == targets).all()) is reached, eps
    # untargeted at 0.45 also fools every image, towards whichever class
    adv = pgd(model, x, torch.arange(3), 0.45, PgdConfig(steps=20))
    assert bool((model(adv).argmax(1) != torch.arange(3)).all())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(InvalidInput):
        check_norm("l1")
    with pytest.raises(InvalidInput):
        PgdConfig(steps=0)
    with pytest.raises(InvalidInput):
        PgdConfig(restarts=0)
    assert PgdConfig(steps=10).step_size_fraction == pytest.approx(0.25)
