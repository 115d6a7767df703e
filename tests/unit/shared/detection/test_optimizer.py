"""Pieces of the batched Neural Cleanse optimiser: parametrisation bounds, the λ schedule,
early stopping, and equivalence with the sequential per-label implementation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.neural_cleanse import ReversalConfig, reverse_triggers
from modelguard.detection.neural_cleanse_sequential import reverse_triggers_sequential
from modelguard.detection.optimizer import (
    OptimizerSettings,
    StepStats,
    TriggerOptimizer,
    initial_parameters,
    mask_from_theta,
    pattern_from_theta,
)
from modelguard.errors import InvalidInput
from modelguard.spec import InputSpec


def tiny_model(seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, classes)
    ).eval()


def tiny_data(n: int = 48, classes: int = 3) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    return Dataset(torch.rand(n, 1, 6, 6, generator=generator), torch.arange(n) % classes)


def optimizer(**settings: object) -> TriggerOptimizer:
    data = tiny_data()
    return TriggerOptimizer(
        tiny_model(),
        data.x,
        data.y,
        [0, 1, 2],
        (0.0, 1.0),
        OptimizerSettings(**settings),  # type: ignore[arg-type]
        torch.Generator().manual_seed(0),
    )


def stats(asr: list[float], rows: torch.Tensor | None = None) -> StepStats:
    k = len(asr)
    return StepStats(
        labels=torch.arange(k) if rows is None else rows,
        asr=torch.tensor(asr),
        l1=torch.ones(k),
        ce=torch.zeros(k),
        finite=torch.ones(k, dtype=torch.bool),
    )


# ------------------------------------------------------------------ parametrisation


def test_mask_and_pattern_stay_inside_their_bounds() -> None:
    theta = torch.tensor([-1e6, -50.0, -8.0, -1.0, 0.0, 1.0, 8.0, 50.0, 1e6])
    mask = mask_from_theta(theta)
    assert bool((mask >= 0).all() and (mask <= 1).all())
    assert mask[4] == 0.5
    pattern = pattern_from_theta(theta, (-2.0, 3.0))
    assert bool((pattern >= -2.0).all() and (pattern <= 3.0).all())
    assert pattern[4] == pytest.approx(0.5)


def test_optimised_masks_and_patterns_respect_bounds_whatever_the_lr() -> None:
    opt = optimizer(lr=5.0, batch_size=16)
    opt.optimize(30)
    assert float(opt.theta_mask.abs().max()) <= 8.0
    masks = mask_from_theta(opt.theta_mask)
    assert bool((masks >= 0).all() and (masks <= 1).all())
    assert bool((opt.best_mask >= 0).all() and (opt.best_mask <= 1).all())
    assert bool((opt.best_pattern >= 0).all() and (opt.best_pattern <= 1).all())


# ------------------------------------------------------------------ λ schedule


def test_cost_is_set_after_patience_successes_in_a_row() -> None:
    opt = optimizer(patience=3, init_cost=1e-3, attack_threshold=0.9)
    rows = torch.arange(3)
    opt.update_cost(rows, stats([1.0, 1.0, 0.5]))
    opt.update_cost(rows, stats([1.0, 0.5, 0.5]))  # label 1 fails: its counter restarts
    assert opt.cost.tolist() == [0.0, 0.0, 0.0]
    opt.update_cost(rows, stats([0.95, 1.0, 0.5]))
    assert opt.cost.tolist() == pytest.approx([1e-3, 0.0, 0.0])
    assert opt.cost_set.tolist() == [True, False, False]
    assert not bool(opt.cost_up_flag.any() or opt.cost_down_flag.any())


def test_cost_goes_up_by_2_and_down_by_2_to_the_1_5() -> None:
    opt = optimizer(patience=2, init_cost=1e-3, attack_threshold=0.99)
    rows = torch.arange(3)
    for _ in range(2):
        opt.update_cost(rows, stats([1.0, 1.0, 1.0]))
    assert opt.cost.tolist() == pytest.approx([1e-3] * 3)
    # label 0 keeps succeeding, label 1 fails, label 2 alternates
    for asr in ([1.0, 0.0, 1.0], [1.0, 0.0, 0.0]):
        opt.update_cost(rows, stats(asr))
    assert opt.cost[0] == pytest.approx(2e-3)
    assert opt.cost[1] == pytest.approx(1e-3 / 2**1.5)
    assert opt.cost[2] == pytest.approx(1e-3)
    assert opt.cost_up_flag.tolist() == [True, False, False]
    assert opt.cost_down_flag.tolist() == [False, True, False]
    # counters restart after a change: two more successes are needed for the next raise
    opt.update_cost(rows, stats([1.0, 0.0, 0.0]))
    assert opt.cost[0] == pytest.approx(2e-3)
    opt.update_cost(rows, stats([1.0, 0.0, 0.0]))
    assert opt.cost[0] == pytest.approx(4e-3)
    assert opt.cost[1] == pytest.approx(1e-3 / 2**3)


def test_schedule_only_touches_the_given_rows() -> None:
    opt = optimizer(patience=1)
    opt.update_cost(torch.tensor([2]), stats([1.0], rows=torch.tensor([2])))
    assert opt.cost.tolist() == pytest.approx([0.0, 0.0, 1e-3])


def test_early_stop_needs_both_cost_moves_and_a_stalled_best_norm() -> None:
    opt = optimizer(early_stop_patience=3, early_stop_threshold=0.99)
    rows = torch.arange(3)
    opt.best_norm[:] = torch.tensor([10.0, 10.0, math.inf])
    opt.cost_up_flag[:] = True
    opt.cost_down_flag[:] = torch.tensor([True, False, True])
    decisions = [opt.early_stop(rows).tolist() for _ in range(4)]
    # first call: the stalled counter starts (best did not improve on the +inf record)
    assert decisions[-1] == [True, False, False]  # label 1 never lowered λ; label 2 has no trigger
    assert decisions[1] == [False, False, False]
    # an improvement of more than 1% restarts the count
    opt.stop_counter[:] = 0
    opt.best_norm[0] = 9.0
    assert opt.early_stop(rows)[0].item() is False
    assert int(opt.stop_counter[0]) == 0


def test_early_stop_can_be_disabled() -> None:
    opt = optimizer(early_stop=False)
    opt.best_norm[:] = 1.0
    opt.cost_up_flag[:] = True
    opt.cost_down_flag[:] = True
    opt.stop_counter[:] = 100
    assert not bool(opt.early_stop(torch.arange(3)).any())


def test_best_mask_is_the_smallest_that_reached_the_threshold() -> None:
    opt = optimizer(attack_threshold=0.9)
    rows = torch.arange(3)
    opt.step_mask = torch.full((3, 6, 6), 0.25)
    opt.step_pattern = torch.full((3, 1, 6, 6), 0.75)
    step = StepStats(
        rows,
        asr=torch.tensor([0.95, 0.5, 0.95]),
        l1=torch.tensor([9.0, 1.0, 9.0]),
        ce=torch.zeros(3),
        finite=torch.tensor([True, True, False]),
    )
    opt.record_best(rows, step)
    assert opt.best_norm.tolist() == [9.0, math.inf, math.inf]
    assert bool((opt.best_mask[0] == 0.25).all())
    step.l1 = torch.tensor([12.0, 1.0, 1.0])  # larger: not better
    opt.record_best(rows, step)
    assert opt.best_norm[0] == 9.0


# ------------------------------------------------------------------ batched ≡ sequential


def test_batched_equals_sequential_without_screening() -> None:
    """With the screening batch equal to the full batch and no refinement, the batched run
    is the per-label algorithm side by side: same norms, same masks."""
    torch.set_num_threads(1)
    model, data = tiny_model(), tiny_data()
    spec = InputSpec(shape=(1, 6, 6))
    config = ReversalConfig(
        steps=25,
        batch_size=16,
        screening_batch_size=16,
        max_suspects=0,
        suspect_threshold=99.0,
        blend_probe=False,  # the reversal compared, not the probe beside it
    )
    batched = reverse_triggers(model, data, spec, config)
    sequential = reverse_triggers_sequential(model, data, spec, config)
    assert sum(label.reached_threshold for label in batched.labels) >= 2
    for a, b in zip(batched.labels, sequential.labels, strict=True):
        assert a.reached_threshold == b.reached_threshold
        if a.reached_threshold:
            assert a.l1_norm == pytest.approx(b.l1_norm, rel=1e-4)
    assert torch.allclose(batched.masks, sequential.masks, atol=1e-4)
    assert batched.steps == sequential.steps


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"batch_size": 0},
        {"screening_steps": 0},
        {"lr": 0.0},
        {"lr": math.nan},
        {"beta1": 1.0},
        {"attack_threshold": 1.5},
        {"cost_multiplier_up": 1.0},
        {"anomaly_threshold": -1.0},
        {"restarts": 0},
        {"seed": -1},
        {"max_samples": 1},
        {"steps": 2.5},
        {"early_stop": True, "early_stop_threshold": 0.0},
        {"norm_scale": "sqrt"},
        {"max_norm_ratio": 0.0},
        {"max_norm_ratio": 1.5},
    ],
)
def test_config_is_validated_on_construction(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        ReversalConfig(**bad)  # type: ignore[arg-type]


def test_config_is_frozen_and_explicit() -> None:
    config = ReversalConfig()
    with pytest.raises(AttributeError):
        config.steps = 5  # type: ignore[misc]
    assert config.screening_budget == config.steps
    assert ReversalConfig(screening_steps=40).screening_budget == 40
    assert config.cost_multiplier_down == pytest.approx(2**1.5)


# ------------------------------------------------------------------ starting masks


def test_a_faint_start_covers_about_two_percent_and_differs_per_label() -> None:
    generator = torch.Generator().manual_seed(0)
    theta, _ = initial_parameters(3, (1, 8, 8), generator, "faint")
    masks = mask_from_theta(theta)
    assert float(masks.min()) > 0.01 and float(masks.max()) < 0.04
    assert not torch.equal(masks[0], masks[1])
    # the pattern's start is Neural Cleanse's whatever the mask's
    _, random_pattern = initial_parameters(3, (1, 8, 8), torch.Generator().manual_seed(0))
    _, faint_pattern = initial_parameters(3, (1, 8, 8), torch.Generator().manual_seed(0), "faint")
    assert torch.equal(random_pattern, faint_pattern)


def test_the_paper_rule_starts_half_covering_and_an_unknown_start_is_refused() -> None:
    assert ReversalConfig().mask_start == "faint"
    assert ReversalConfig.paper().mask_start == "random"
    assert ReversalConfig.paper().optimizer_settings(screening=True).mask_start == "random"
    with pytest.raises(InvalidInput, match="mask_start"):
        ReversalConfig(mask_start="zeros")
    with pytest.raises(InvalidInput, match="depart from it"):
        ReversalConfig.paper(mask_start="faint")
