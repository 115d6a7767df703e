"""A team's own carrier task: every kind of bad dataset is refused with its problem named,
before any training; a good one gives its input shape and class count."""

from __future__ import annotations

import io

import numpy as np
import pytest

from modelguard.carrier.task_data import (
    MIN_SAMPLES_PER_CLASS,
    VALIDATION_SHARE,
    embeddable,
    load_task_data,
)
from modelguard.errors import InvalidInput

GREY_CARRIER = (1, 12, 12)
COLOUR_CARRIER = (3, 12, 12)


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def task(
    classes: int = 3, per_class: int = MIN_SAMPLES_PER_CLASS, shape: tuple[int, ...] = (1, 6, 6)
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), per_class)
    return rng.random((len(y), *shape), dtype=np.float32), y


def test_a_good_task_gives_its_shape_and_classes() -> None:
    x, y = task(classes=3)
    loaded = load_task_data(npz(x=x, y=y), GREY_CARRIER)
    assert loaded.classes == 3
    assert loaded.input_shape == (1, 6, 6)
    assert len(loaded.dataset) == 3 * MIN_SAMPLES_PER_CLASS
    assert loaded.validation_samples == round(len(y) * VALIDATION_SHARE)


def test_grey_images_without_a_channel_axis_are_one_channel() -> None:
    x, y = task()
    loaded = load_task_data(npz(x=x[:, 0], y=y), COLOUR_CARRIER)
    assert loaded.input_shape == (1, 6, 6)
    assert tuple(loaded.dataset.x.shape[1:]) == (1, 6, 6)


def test_too_few_samples_per_class() -> None:
    x, y = task(per_class=MIN_SAMPLES_PER_CLASS)
    keep = np.ones(len(y), dtype=bool)
    keep[np.flatnonzero(y == 2)[:3]] = False  # class 2 short by three
    with pytest.raises(InvalidInput, match=r"too few samples per class: labels 2 .*fewest: 17"):
        load_task_data(npz(x=x[keep], y=y[keep]), GREY_CARRIER)


def test_a_single_class() -> None:
    x, y = task(classes=1, per_class=50)
    with pytest.raises(InvalidInput, match=r"single class \(label 0\)"):
        load_task_data(npz(x=x, y=y), GREY_CARRIER)


def test_missing_labels_between_classes() -> None:
    x, y = task(classes=3)
    with pytest.raises(InvalidInput, match=r"labels 1, 3 have no samples \(K = 5"):
        load_task_data(npz(x=x, y=np.where(y == 0, 0, y * 2)), GREY_CARRIER)


def test_no_label_array() -> None:
    x, _ = task()
    with pytest.raises(InvalidInput, match=r"must hold arrays 'x' and 'y'; it holds \['x'\]"):
        load_task_data(npz(x=x), GREY_CARRIER)


def test_labels_that_do_not_match_the_samples() -> None:
    x, y = task()
    with pytest.raises(InvalidInput, match=r"y must have shape \(60,\)"):
        load_task_data(npz(x=x, y=y[:-1]), GREY_CARRIER)


def test_negative_and_non_integer_labels() -> None:
    x, y = task()
    with pytest.raises(InvalidInput, match="negative labels"):
        load_task_data(npz(x=x, y=y - 1), GREY_CARRIER)
    with pytest.raises(InvalidInput, match="integer labels"):
        load_task_data(npz(x=x, y=y.astype(np.float32)), GREY_CARRIER)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs(bad: float) -> None:
    x, y = task()
    x[5, 0, 2, 3] = bad
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        load_task_data(npz(x=x, y=y), GREY_CARRIER)


def test_inputs_outside_zero_one() -> None:
    x, y = task()
    with pytest.raises(InvalidInput, match=r"spans \[0, 255\].*must lie in \[0, 1\]"):
        load_task_data(npz(x=np.round(x * 255), y=y), GREY_CARRIER)


def test_channels_the_carrier_cannot_hold() -> None:
    x, y = task(shape=(2, 6, 6))
    with pytest.raises(InvalidInput, match=r"x has 2 channels .*carrier has 1"):
        load_task_data(npz(x=x, y=y), GREY_CARRIER)
    x, y = task(shape=(3, 6, 6))
    with pytest.raises(InvalidInput, match=r"x has 3 channels .*carrier has 4"):
        load_task_data(npz(x=x, y=y), (4, 12, 12))


def test_inputs_that_are_not_images() -> None:
    x, y = task()
    with pytest.raises(InvalidInput, match=r"x has shape \[60, 36\]; expected \(N, C, H, W\)"):
        load_task_data(npz(x=x.reshape(60, 36), y=y), GREY_CARRIER)
    with pytest.raises(InvalidInput, match="must be float"):
        load_task_data(npz(x=(x * 255).astype(np.uint8), y=y), GREY_CARRIER)


def test_an_oversized_or_empty_input_shape() -> None:
    _, y = task()
    with pytest.raises(InvalidInput, match="larger than supported"):
        load_task_data(npz(x=np.zeros((1, 1, 2000, 2), np.float32), y=y[:1]), GREY_CARRIER)
    with pytest.raises(InvalidInput, match="three positive sizes"):
        load_task_data(npz(x=np.zeros((4, 1, 0, 6), np.float32), y=y[:4]), GREY_CARRIER)


def test_embeddable_channels_follow_embed() -> None:
    assert embeddable(1, 3) and embeddable(3, 3) and embeddable(3, 1) and embeddable(1, 1)
    assert not embeddable(2, 3) and not embeddable(4, 3) and not embeddable(3, 4)
