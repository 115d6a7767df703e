"""End-to-end trigger reversal: a small infected LeNet-5 must give away its planted target;
inputs are validated against the declared spec; normalised and TorchScript models work."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from modelguard.attacks.backdoor import PatchTrigger, attack_success_rate, train_backdoored
from modelguard.datasets import Dataset, load_mnist
from modelguard.detection.neural_cleanse import (
    INFECTED,
    ReversalConfig,
    ReversalResult,
    reverse_triggers,
    trigger_images,
)
from modelguard.errors import InvalidInput
from modelguard.spec import InputSpec

SPEC = InputSpec(shape=(1, 28, 28), value_range=(0.0, 1.0))
TRIGGER = PatchTrigger(target=3, size=4, position=(-2, -2), pattern="white")


@pytest.fixture(scope="module")
def infected() -> tuple[nn.Module, Dataset]:
    torch.set_num_threads(1)
    train = load_mnist("train").subset(4000, seed=0)
    clean = load_mnist("test").subset(300, seed=0)
    result = train_backdoored(
        "lenet5", (train, clean), TRIGGER, seed=0, rate=0.1, epochs=4, batch_size=32, lr=1e-3
    )
    assert result.clean_accuracy > 0.85
    assert result.attack_success[0] > 0.95
    return result.model, clean


@pytest.fixture(scope="module")
def reversal(infected: tuple[nn.Module, Dataset]) -> ReversalResult:
    model, clean = infected
    calls: list[tuple[float, str]] = []
    result = reverse_triggers(
        model, clean, SPEC, ReversalConfig(seed=0), progress=lambda f, m: calls.append((f, m))
    )
    assert calls and all(0.0 <= f <= 1.0 for f, _ in calls) and calls[-1][0] == 1.0
    return result


def test_planted_target_is_found(reversal: ReversalResult) -> None:
    assert reversal.verdict == INFECTED
    assert TRIGGER.target in reversal.flagged
    label = reversal.labels[TRIGGER.target]
    assert label.anomaly_index > 2.0
    assert label.anomaly_index == max(r.anomaly_index for r in reversal.labels)
    assert label.refined and label.reached_threshold
    assert label.attack_success >= 0.9
    # the smallest trigger of all, by a wide margin (the planted one has 16 pixels)
    others = [r.l1_norm for r in reversal.labels if r.label != TRIGGER.target]
    assert label.l1_norm < 0.5 * min(others)
    assert label.trigger_norm < 40


def test_reversed_trigger_sits_where_the_planted_one_is(reversal: ReversalResult) -> None:
    mask = reversal.masks[TRIGGER.target]
    assert mask.shape == (28, 28)
    top, left, bottom, right = TRIGGER.box(28, 28)
    near = mask[max(0, top - 2) : bottom + 2, max(0, left - 2) : right + 2].sum()
    assert float(near) > 0.6 * float(mask.sum())


def test_result_shapes_and_json(reversal: ReversalResult) -> None:
    assert reversal.masks.shape == (10, 28, 28)
    assert reversal.patterns.shape == (10, 1, 28, 28)
    assert float(reversal.masks.min()) >= 0 and float(reversal.masks.max()) <= 1
    assert float(reversal.patterns.min()) >= 0 and float(reversal.patterns.max()) <= 1
    assert [r.label for r in reversal.labels] == list(range(10))
    data = json.loads(json.dumps(reversal.to_dict(), allow_nan=False))
    assert data["verdict"] == "infected" and 3 in data["flagged"]
    assert "masks" not in data and data["evidence"]["summary"].startswith("infected")
    assert reversal.steps > 0 and reversal.evaluations > 0 and reversal.seconds > 0
    pictures = trigger_images(reversal)
    assert set(pictures) == set(range(10))
    assert pictures[3].dtype.name == "uint8" and pictures[3].shape == (28, 3 * 28 + 4)


def test_model_is_left_as_it_was(infected: tuple[nn.Module, Dataset]) -> None:
    model, clean = infected
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad(set_to_none=True)  # training left gradients behind
    model.train()
    reverse_triggers(model, Dataset(clean.x[:40], clean.y[:40]), SPEC, ReversalConfig(steps=3))
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    model.eval()


# ------------------------------------------------------------------ any model of the spec


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))


def small_data(low: float = 0.0, high: float = 1.0) -> Dataset:
    generator = torch.Generator().manual_seed(2)
    x = low + (high - low) * torch.rand(64, 3, 8, 8, generator=generator)
    return Dataset(x, torch.arange(64) % 4)


FAST = ReversalConfig(steps=30, batch_size=16, seed=3, max_suspects=0, suspect_threshold=99.0)


class Denormalise(nn.Module):
    """A model trained on normalised inputs: it undoes (x - mean) / std itself."""

    def __init__(self, inner: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.mean, self.std = inner, mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner(z * self.std + self.mean)  # type: ignore[no-any-return]


def test_normalised_model_is_scanned_in_raw_input_space() -> None:
    torch.set_num_threads(1)
    inner, data = small_model(), small_data(0.0, 255.0)
    mean, std = torch.tensor([120.0, 110.0, 100.0]), torch.tensor([60.0, 50.0, 70.0])
    raw = reverse_triggers(inner, data, InputSpec((3, 8, 8), (0.0, 255.0)), FAST)
    spec = InputSpec((3, 8, 8), (0.0, 255.0), tuple(mean.tolist()), tuple(std.tolist()))
    normalised = reverse_triggers(Denormalise(inner, mean, std), data, spec, FAST)
    for a, b in zip(raw.labels, normalised.labels, strict=True):
        assert a.reached_threshold == b.reached_threshold
        if a.reached_threshold:
            assert a.l1_norm == pytest.approx(b.l1_norm, rel=1e-3)
    # patterns live in the declared raw range, not the normalised one
    assert float(normalised.patterns.max()) <= 255.0 and float(normalised.patterns.max()) > 1.0
    assert trigger_images(normalised)[0].shape == (8, 3 * 8 + 4, 3)


def test_torchscript_model_gives_the_same_result() -> None:
    torch.set_num_threads(1)
    model, data = small_model(), small_data()
    spec = InputSpec((3, 8, 8))
    scripted = torch.jit.trace(model, data.x[:2])
    eager = reverse_triggers(model, data, spec, FAST)
    script = reverse_triggers(scripted, data, spec, FAST)
    assert [r.l1_norm for r in eager.labels] == pytest.approx(
        [r.l1_norm for r in script.labels], rel=1e-4, nan_ok=True
    )


def test_same_seed_same_result_other_seed_other_start() -> None:
    torch.set_num_threads(1)
    model, data = small_model(), small_data()
    spec = InputSpec((3, 8, 8))
    first = reverse_triggers(model, data, spec, FAST)
    again = reverse_triggers(model, data, spec, FAST)
    assert torch.equal(first.masks, again.masks)
    assert [r.l1_norm for r in first.labels] == pytest.approx(
        [r.l1_norm for r in again.labels], nan_ok=True
    )
    other = reverse_triggers(model, data, spec, ReversalConfig(**{**FAST.to_dict(), "seed": 4}))
    assert not torch.equal(first.masks, other.masks)


def test_restarts_report_min_and_median_index() -> None:
    torch.set_num_threads(1)
    model, data = small_model(), small_data()
    always = ReversalConfig(**{**FAST.to_dict(), "restarts": 3, "restart_margin": math.inf})
    result = reverse_triggers(model, data, InputSpec((3, 8, 8)), always)
    assert [info.seed for info in result.restarts] == [3, 4, 5]
    for label in result.labels:
        if label.reached_threshold:
            assert label.index_min <= label.index_median == label.anomaly_index
    assert result.evidence["screening_runs"] == 3
    never = ReversalConfig(**{**FAST.to_dict(), "restarts": 3, "restart_margin": 0.0})
    assert len(reverse_triggers(model, data, InputSpec((3, 8, 8)), never).restarts) == 1


# ------------------------------------------------------------------ input validation


@pytest.mark.parametrize(
    ("data", "spec", "message"),
    [
        (small_data(), InputSpec((1, 8, 8)), "shape"),
        (small_data(0.0, 255.0), InputSpec((3, 8, 8)), "value range"),
        (Dataset(small_data().x, small_data().y + 10), InputSpec((3, 8, 8)), "labels"),
        (Dataset(small_data().x, small_data().y.float()), InputSpec((3, 8, 8)), "integers"),
        (Dataset(small_data().x[:1], small_data().y[:1]), InputSpec((3, 8, 8)), "two"),
        (
            Dataset(small_data().x * torch.nan, small_data().y),
            InputSpec((3, 8, 8)),
            "NaN",
        ),
    ],
)
def test_inconsistent_data_or_spec_is_refused(data: Dataset, spec: InputSpec, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        reverse_triggers(small_model(), data, spec, FAST)


def test_model_that_does_not_take_the_declared_shape_is_refused() -> None:
    data = Dataset(torch.rand(8, 3, 6, 6), torch.zeros(8, dtype=torch.long))
    with pytest.raises(InvalidInput, match="does not accept"):
        reverse_triggers(small_model(), data, InputSpec((3, 6, 6)), FAST)


def test_missing_spec_is_refused() -> None:
    with pytest.raises(InvalidInput, match="spec"):
        reverse_triggers(small_model(), small_data(), None, FAST)  # type: ignore[arg-type]


def test_attack_success_helper_agrees_on_the_planted_trigger(
    infected: tuple[nn.Module, Dataset],
) -> None:
    model, clean = infected
    assert attack_success_rate(model, clean, TRIGGER) > 0.95
