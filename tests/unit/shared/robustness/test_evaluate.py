"""Robust accuracy against ε: exact on a model whose robustness is known by hand,
non-increasing in ε, independent of the batch size and of where the normalisation lives;
the gradient-masking check fires on models that mask their gradients and stays quiet on
one that does not; the budgets shrink the work and say so."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.errors import InvalidInput
from modelguard.robustness.evaluate import (
    FGSM,
    PGD,
    PGD_STRONG,
    AttackAccuracy,
    RobustnessConfig,
    RobustPoint,
    evaluate_robustness,
    masking_check,
)
from modelguard.spec import InputSpec
from tests.unit.shared.robustness.models import (
    OneFeaturePerClass,
    Quantised,
    Saturated,
    robust_by_hand,
    three_class_data,
)

torch.set_num_threads(1)
SPEC = InputSpec(shape=(1, 1, 3), value_range=(0.0, 1.0))
EPS = (0.02, 0.05, 0.1, 0.15, 0.2)


def test_robust_accuracy_matches_the_hand_computed_curve_and_never_rises() -> None:
    data = three_class_data()
    reports: list[tuple[float, str]] = []
    result = evaluate_robustness(
        OneFeaturePerClass(),
        data,
        SPEC,
        RobustnessConfig(eps=EPS, steps=10),
        progress=lambda fraction, message: reports.append((fraction, message)),
    )
    assert result.images == len(data) and result.clean_accuracy == 1.0
    curve = [p.robust_accuracy for p in result.points]
    assert curve == pytest.approx([robust_by_hand(data, eps) for eps in EPS])
    assert curve == sorted(curve, reverse=True) and curve[0] > curve[-1]
    for name in (FGSM, PGD, PGD_STRONG):  # each attack's own figures too, on this model
        raw = [p.accuracy_of(name) for p in result.points]
        assert raw == sorted(raw, reverse=True)
    assert not result.masking.flagged, result.masking.reasons
    assert result.masking.unbounded_accuracy == 0.0
    assert result.masking.zero_gradient_fraction == 0.0
    assert reports[-1][0] == pytest.approx(1.0) and "ε = 0.2" in reports[-1][1]
    document = json.loads(json.dumps(result.to_dict()))
    assert [p["eps"] for p in document["points"]] == list(EPS)
    assert document["masking"]["flagged"] is False


def test_the_curve_is_non_increasing_even_when_an_attack_alone_is_not() -> None:
    """An image fooled at a smaller ε stays fooled at a larger one: a single weak attack
    (one PGD step, random start) need not be monotone, the reported curve is."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[1].weight.mul_(8)
    data = three_class_data(80, seed=1)
    data = Dataset(data.x, model(data.x).argmax(1).detach())
    eps = tuple(0.05 * k for k in range(1, 16))
    config = RobustnessConfig(eps=eps, steps=1, masking_check=False)
    result = evaluate_robustness(model, data, SPEC, config)
    single = [p.accuracy_of(PGD) for p in result.points]
    assert single != sorted(single, reverse=True)  # the weak attack alone is not monotone
    curve = [p.robust_accuracy for p in result.points]
    assert curve == sorted(curve, reverse=True) and curve[0] > curve[-1]
    for point in result.points:
        assert point.robust_accuracy <= min(a.accuracy for a in point.attacks)


def test_targeted_attacks_count_successes_at_the_target() -> None:
    data = three_class_data()
    config = RobustnessConfig(eps=(0.05, 0.5), targeted=True, steps=20)
    result = evaluate_robustness(OneFeaturePerClass(), data, SPEC, config)
    small, large = result.points
    assert small.robust_accuracy > 0.5
    # ε = 0.5 reaches any target from images in [0.2, 0.8]
    assert {a.attack: a.success_rate for a in large.attacks}[PGD] == 1.0
    assert large.robust_accuracy == 0.0
    assert not result.masking.flagged, result.masking.reasons


@pytest.mark.parametrize("model", [Quantised(), Saturated()], ids=["quantised", "saturated"])
def test_the_masking_check_fires_on_models_that_mask_their_gradients(model: nn.Module) -> None:
    data = three_class_data()
    result = evaluate_robustness(model, data, SPEC, RobustnessConfig(eps=EPS, steps=5))
    assert result.masking.flagged
    assert result.masking.zero_gradient_fraction > 0.9
    assert any("exactly zero" in reason for reason in result.masking.reasons)
    # the honest model's figures show what the blind attacks missed
    honest = evaluate_robustness(OneFeaturePerClass(), data, SPEC, RobustnessConfig(eps=EPS))
    assert result.robust_accuracy(0.2) > honest.robust_accuracy(0.2)


def test_the_quantised_model_also_survives_the_unbounded_attack() -> None:
    result = evaluate_robustness(
        Quantised(), three_class_data(), SPEC, RobustnessConfig(eps=(0.1,), steps=5)
    )
    assert result.masking.unbounded_accuracy is not None
    assert result.masking.unbounded_accuracy > 0.1
    assert any("unbounded" in reason for reason in result.masking.reasons)


def _point(eps: float, fgsm: float, pgd: float, strong: float) -> RobustPoint:
    return RobustPoint(
        eps=eps,
        robust_accuracy=min(fgsm, pgd, strong),
        attacks=tuple(
            AttackAccuracy(name, acc, 1 - acc)
            for name, acc in ((FGSM, fgsm), (PGD, pgd), (PGD_STRONG, strong))
        ),
    )


def test_the_masking_rules_each_fire_and_tolerate_noise() -> None:
    config = RobustnessConfig(eps=(0.1, 0.2))
    check = {"images": 1000, "zero_gradient_fraction": 0.0, "unbounded_accuracy": 0.0}
    sound = (_point(0.1, 0.6, 0.4, 0.39), _point(0.2, 0.3, 0.1, 0.1))
    assert not masking_check(sound, config, **check).flagged
    noisy = (_point(0.1, 0.6, 0.41, 0.42), _point(0.2, 0.3, 0.11, 0.1))  # within 2 points
    assert not masking_check(noisy, config, **check).flagged
    cases = {
        "than one FGSM step": (_point(0.1, 0.4, 0.6, 0.5), _point(0.2, 0.3, 0.1, 0.1)),
        "more steps and restarts": (_point(0.1, 0.6, 0.4, 0.5), _point(0.2, 0.3, 0.1, 0.1)),
        "rises with ε": (_point(0.1, 0.6, 0.1, 0.1), _point(0.2, 0.7, 0.3, 0.3)),
    }
    for words, points in cases.items():
        flagged = masking_check(points, config, **check)
        assert flagged.flagged and any(words in r for r in flagged.reasons), words
    unbounded = masking_check(
        sound, config, images=1000, zero_gradient_fraction=0.0, unbounded_accuracy=0.3
    )
    assert unbounded.flagged and "unbounded" in unbounded.reasons[0]
    # with few images one image is noise: 2 of 20 images differ, under max(2 %, 2 images)
    few = (_point(0.1, 0.5, 0.6, 0.6), _point(0.2, 0.3, 0.1, 0.1))
    assert not masking_check(few, config, **{**check, "images": 20}).flagged


def test_batch_size_and_the_place_of_normalisation_do_not_change_the_figures() -> None:
    data = three_class_data()
    config = RobustnessConfig(eps=EPS, steps=10)
    reference = evaluate_robustness(OneFeaturePerClass(), data, SPEC, config)
    batched = evaluate_robustness(
        OneFeaturePerClass(), data, SPEC, RobustnessConfig(eps=EPS, steps=10, batch_size=7)
    )
    assert batched.batch_size == 7
    assert [p.robust_accuracy for p in batched.points] == [
        p.robust_accuracy for p in reference.points
    ]

    class ExpectsNormalised(nn.Module):
        """`OneFeaturePerClass` for inputs normalised with mean 0.5 and std 0.25."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 4.0 * (x * 0.25 + 0.5).flatten(1)

    normalised = InputSpec(shape=(1, 1, 3), value_range=(0.0, 1.0), mean=(0.5,), std=(0.25,))
    result = evaluate_robustness(ExpectsNormalised(), data, normalised, config)
    assert [p.robust_accuracy for p in result.points] == pytest.approx(
        [p.robust_accuracy for p in reference.points]
    )  # ε is in the data's units, not the normalised ones


def test_the_budgets_shrink_the_work_and_say_so() -> None:
    data = three_class_data(50)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3))
    model.train()
    tiny = RobustnessConfig(eps=(0.1,), steps=2, max_images=30, time_budget_seconds=1e-6)
    result = evaluate_robustness(model, data, SPEC, tiny)
    assert result.images == 1
    assert any("subset of 30" in n for n in result.notes)
    assert any("time budget" in n for n in result.notes)
    assert model.training  # left as it was
    assert result.batch_size >= 1


def test_bad_requests_are_refused() -> None:
    with pytest.raises(InvalidInput, match="positive"):
        RobustnessConfig(eps=())
    with pytest.raises(InvalidInput, match="positive"):
        RobustnessConfig(eps=(0.1, -0.1))
    with pytest.raises(InvalidInput, match="norm"):
        RobustnessConfig(eps=(0.1,), norm="l1")
    assert RobustnessConfig(eps=(0.3, 0.1, 0.3)).eps == (0.1, 0.3)
    data = three_class_data(4)
    with pytest.raises(InvalidInput, match="value range"):
        evaluate_robustness(OneFeaturePerClass(), data, SPEC, RobustnessConfig(eps=(1.5,)))
    with pytest.raises(InvalidInput, match="shape"):
        other = InputSpec(shape=(1, 2, 3), value_range=(0.0, 1.0))
        evaluate_robustness(OneFeaturePerClass(), data, other, RobustnessConfig(eps=(0.1,)))
