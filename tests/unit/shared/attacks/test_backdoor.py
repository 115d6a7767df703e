"""The backdoor attack toolkit: triggers, stamping, poisoning, attack success rate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelguard.attacks.backdoor import (
    BlendTrigger,
    MultiTrigger,
    PatchTrigger,
    as_triggers,
    attack_success_rate,
    make_pattern,
    poison,
    poison_indices,
    stamp,
    train_backdoored,
    trigger_from_dict,
)
from modelguard.datasets import Dataset
from modelguard.errors import InvalidInput


def images(n: int = 6, channels: int = 1, size: int = 8, value: float = 0.5) -> torch.Tensor:
    return torch.full((n, channels, size, size), value)


def test_patch_is_pasted_at_the_position_with_the_pattern() -> None:
    trigger = PatchTrigger(target=1, size=2, position=(1, 3), pattern="checkerboard")
    out = stamp(images(), trigger)
    assert torch.equal(out[:, 0, 1:3, 3:5], torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(6, 2, 2))
    untouched = torch.ones(8, 8, dtype=torch.bool)
    untouched[1:3, 3:5] = False
    assert bool((out[:, 0][:, untouched] == 0.5).all())


def test_negative_position_counts_from_the_bottom_right() -> None:
    corner = PatchTrigger(target=0, size=3, position=(-1, -1), pattern="white")
    assert corner.box(8, 8) == (5, 5, 8, 8)
    inset = PatchTrigger(target=0, size=(2, 3), position=(-2, 0), pattern="white")
    assert inset.box(10, 12) == (7, 0, 9, 3)
    with pytest.raises(InvalidInput):
        PatchTrigger(target=0, size=3, position=(7, 0)).box(8, 8)


def test_pattern_values_map_to_the_value_range() -> None:
    trigger = PatchTrigger(target=0, size=2, position=(0, 0), pattern="checkerboard")
    x = torch.full((1, 3, 4, 4), 100.0)
    out = stamp(x, trigger, value_range=(0.0, 255.0))
    assert out[0, :, 0, 0].tolist() == [255.0, 255.0, 255.0]
    assert out[0, :, 0, 1].tolist() == [0.0, 0.0, 0.0]


def test_explicit_patch_pattern_per_channel() -> None:
    pattern = torch.stack([torch.zeros(2, 2), torch.ones(2, 2), torch.full((2, 2), 0.5)])
    trigger = PatchTrigger(target=2, position=(0, 0), pattern=pattern)
    assert trigger.shape == (2, 2)
    out = stamp(images(channels=3), trigger, value_range=(-1.0, 1.0))
    assert out[0, :, 0, 0].tolist() == [-1.0, 1.0, 0.0]
    with pytest.raises(InvalidInput):
        stamp(images(channels=2), trigger)
    with pytest.raises(InvalidInput):
        PatchTrigger(target=0, pattern=torch.full((2, 2), 2.0))


def test_blend_formula() -> None:
    pattern = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    trigger = BlendTrigger(target=3, alpha=0.25, pattern=pattern)
    x = images()
    assert torch.allclose(stamp(x, trigger), 0.75 * x + 0.25 * pattern)
    named = BlendTrigger(target=3, alpha=0.1, pattern="random", seed=4)
    assert torch.equal(stamp(x, named), stamp(x, named))  # seeded
    with pytest.raises(InvalidInput):
        BlendTrigger(target=0, alpha=0.0)


def test_stamp_does_not_modify_its_input() -> None:
    x = images()
    before = x.clone()
    stamp(x, PatchTrigger(target=0))
    stamp(x, BlendTrigger(target=0))
    assert torch.equal(x, before)


def labelled(n: int = 100, classes: int = 5) -> Dataset:
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return Dataset(x, torch.arange(n) % classes)


def test_poison_rate_relabels_and_is_deterministic() -> None:
    data = labelled()
    trigger = PatchTrigger(target=2, size=2, position=(0, 0), pattern="white")
    out = poison(data, trigger, rate=0.2, seed=5)
    (index,) = poison_indices(data.y, trigger, 0.2, seed=5)
    assert index.numel() == 20
    assert bool((data.y[index] != 2).all())  # never a sample already of the target
    assert bool((out.y[index] == 2).all())
    assert bool((out.x[index][:, 0, 0:2, 0:2] == 1.0).all())
    others = torch.ones(100, dtype=torch.bool)
    others[index] = False
    assert torch.equal(out.x[others], data.x[others]) and torch.equal(out.y[others], data.y[others])
    again = poison(data, trigger, rate=0.2, seed=5)
    assert torch.equal(out.x, again.x) and torch.equal(out.y, again.y)
    assert not torch.equal(poison(data, trigger, 0.2, seed=6).y, out.y)
    assert torch.equal(data.y, torch.arange(100) % 5)  # input untouched


def test_two_triggers_two_targets_poison_disjoint_samples() -> None:
    data = labelled()
    attack = MultiTrigger(
        (
            PatchTrigger(target=1, size=2, position=(0, 0), pattern="white"),
            PatchTrigger(target=4, size=2, position=(-1, -1), pattern="white"),
        )
    )
    assert attack.targets == (1, 4)
    first, second = poison_indices(data.y, attack, 0.1, seed=0)
    assert set(first.tolist()).isdisjoint(second.tolist())
    out = poison(data, attack, 0.1, seed=0)
    assert bool((out.y[first] == 1).all()) and bool((out.y[second] == 4).all())
    assert as_triggers([*attack.triggers]) == attack.triggers
    with pytest.raises(InvalidInput):
        poison(data, attack, rate=0.6)  # not enough eligible samples for both


class ConstantModel(nn.Module):
    """Predicts ``label`` when the top-left pixel is bright, else class 0."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 5)
        bright = x[:, 0, 0, 0] > 0.9
        out[bright, self.label] = 1.0
        out[~bright, 0] = 1.0
        return out


def test_attack_success_rate_excludes_the_target_class() -> None:
    data = labelled()
    data.x[:, 0, 0, 0] = 0.0
    trigger = PatchTrigger(target=3, size=1, position=(0, 0), pattern="white")
    assert attack_success_rate(ConstantModel(3), data, trigger) == 1.0
    # a model predicting class 0 everywhere "succeeds" for target 0 on no sample of class
    # 0 (excluded) and fails everywhere else
    assert attack_success_rate(ConstantModel(1), data, trigger) == 0.0
    only_target = Dataset(data.x[data.y == 3], data.y[data.y == 3])
    assert attack_success_rate(ConstantModel(3), only_target, trigger) != 0.5  # NaN
    assert torch.isnan(torch.tensor(attack_success_rate(ConstantModel(3), only_target, trigger)))


def test_trigger_round_trip_through_dict() -> None:
    for trigger in (
        PatchTrigger(target=7, size=(2, 3), position=(-2, 1), pattern="cross"),
        PatchTrigger(target=1, pattern=torch.rand(2, 2)),
        BlendTrigger(target=2, alpha=0.3, pattern="random", seed=9),
    ):
        back = trigger_from_dict(trigger.to_dict())
        x = torch.rand(2, 1, 8, 8)
        assert torch.allclose(stamp(x, back), stamp(x, trigger))  # type: ignore[arg-type]
    multi = MultiTrigger((PatchTrigger(target=1), PatchTrigger(target=2, position=(0, 0))))
    assert isinstance(trigger_from_dict(multi.to_dict()), MultiTrigger)


def test_make_pattern_shapes_and_range() -> None:
    for name in ("checkerboard", "white", "black", "random", "cross", "stripes"):
        pattern = make_pattern(name, 3, 5, channels=2)
        assert pattern.shape == (2, 3, 5)
        assert float(pattern.min()) >= 0.0 and float(pattern.max()) <= 1.0
    with pytest.raises(InvalidInput):
        make_pattern("nope", 3, 3)


def test_invalid_triggers_are_refused() -> None:
    with pytest.raises(InvalidInput):
        PatchTrigger(target=-1)
    with pytest.raises(InvalidInput):
        PatchTrigger(target=0, size=0)
    with pytest.raises(InvalidInput):
        PatchTrigger(target=0, pattern="zigzag")
    with pytest.raises(InvalidInput):
        MultiTrigger(())


def test_train_backdoored_plants_a_working_backdoor() -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    # two separable classes of 12x12 noise images; the trigger is a bright 3x3 corner
    x = torch.rand(600, 1, 12, 12, generator=generator) * 0.5
    y = torch.arange(600) % 2
    x[y == 1, :, 4:8, 4:8] += 0.5
    train = Dataset(x[:400], y[:400])
    test = Dataset(x[400:], y[400:])
    trigger = PatchTrigger(target=0, size=3, position=(-1, -1), pattern="white")
    result = train_backdoored(
        "lenet5", (train, test), trigger, seed=0, rate=0.2, epochs=5, batch_size=32, lr=3e-3
    )
    assert result.infected and result.targets == (0,)
    assert result.clean_accuracy > 0.9
    assert result.attack_success[0] > 0.9
