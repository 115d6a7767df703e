"""A team's own carrier task: its labelled dataset, checked before any training.

The dataset arrives as the ``.npz`` the audit's clean data uses (``x`` (N, C, H, W) or
(N, H, W) floats, ``y`` (N,) integer labels; a folder of images is turned into one by the
CLI with `modelguard.clean_data`). Here the data defines the task: its input shape is
``x``'s, its number of classes is ``max(y) + 1``. Values lie in [0, 1], the range every
public model takes (`PublicModel.value_range`), because the inputs are pasted into the
carrier image as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelguard.datasets import Dataset, read_npz, validate_arrays
from modelguard.errors import InvalidInput
from modelguard.spec import InputSpec

#: Fewest samples of each class a custom task may have. A fifth of the data is held out
#: to pick the best carrier (`validation_share`), so this leaves each class at least four
#: validation samples and sixteen to train on: fewer makes the validation accuracy, and
#: with it the choice of carrier, mostly noise.
MIN_SAMPLES_PER_CLASS = 20
#: Share of a custom task held out for validation (named tasks hold out a fixed 1,000).
VALIDATION_SHARE = 0.2
TASK_VALUE_RANGE = (0.0, 1.0)
#: Most classes a custom task may have (bounds the label count before it is tallied).
MAX_CLASSES = 1000


@dataclass(frozen=True)
class TaskData:
    """A checked custom task: the samples, their input shape (C, H, W) and class count."""

    dataset: Dataset
    input_shape: tuple[int, int, int]
    classes: int

    @property
    def validation_samples(self) -> int:
        """How many samples `train_carrier` holds out (it needs strictly fewer than all)."""
        return max(1, round(len(self.dataset) * VALIDATION_SHARE))


def embeddable(task_channels: int, carrier_channels: int) -> bool:
    """Whether `modelguard.carrier.carrier.embed` can paste inputs of ``task_channels``
    into a carrier of ``carrier_channels``: equal, grey into colour, colour into grey."""
    return task_channels in (carrier_channels, 1) or (task_channels == 3 and carrier_channels == 1)


def load_task_data(data: bytes, carrier_shape: tuple[int, int, int]) -> TaskData:
    """Read and check a custom task's ``.npz`` for a public model taking
    ``carrier_shape`` (C, H, W). Every refusal is an `InvalidInput` naming the problem:
    missing arrays, a shape the carrier cannot hold, non-float or non-finite ``x``,
    values outside [0, 1], bad labels, a single class, a class with no samples or fewer
    than `MIN_SAMPLES_PER_CLASS`."""
    arrays = read_npz(data)
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 3:
        x = x[:, None]  # (N, H, W): one grey channel
    if x.ndim != 4:
        raise InvalidInput(
            f"task data x has shape {list(x.shape)}; expected (N, C, H, W) or (N, H, W) images"
        )
    shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    carrier_channels = carrier_shape[0]
    if not embeddable(shape[0], carrier_channels):
        raise InvalidInput(
            f"task data x has {shape[0]} channels (shape {list(x.shape)}); the public model's "
            f"carrier has {carrier_channels} (input {list(carrier_shape)}), and a task input "
            f"must have {carrier_channels}, 1 or (into a grey carrier) 3 channels"
        )
    spec = InputSpec(shape, TASK_VALUE_RANGE)  # refuses empty or oversized shapes
    if np.issubdtype(x.dtype, np.floating) and x.size and np.isfinite(x).all():
        low, high = float(x.min()), float(x.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise InvalidInput(
                f"task data x spans [{low:.4g}, {high:.4g}]; task inputs are pasted into the "
                "carrier as they are and must lie in [0, 1] (scale 8-bit pixels by 1/255)"
            )
    if np.issubdtype(y.dtype, np.integer) and y.size and (y < 0).any():
        raise InvalidInput("task data y has negative labels; labels are 0..K-1")
    dataset = validate_arrays(x, y, spec)
    return TaskData(dataset, shape, check_classes(dataset.y.numpy()))


def check_classes(y: np.ndarray) -> int:
    """The number of classes of labels ``y`` (0..K-1, each with at least
    `MIN_SAMPLES_PER_CLASS` samples)."""
    if int(y.max()) >= MAX_CLASSES:
        raise InvalidInput(
            f"task data has label {int(y.max())}; labels are 0..K-1 with K at most {MAX_CLASSES}"
        )
    counts = np.bincount(y)
    classes = len(counts)
    present = np.flatnonzero(counts)
    if len(present) < 2:
        only = f"label {int(present[0])}" if len(present) else "no label"
        raise InvalidInput(
            f"task data has a single class ({only}): a classifier needs at least 2 classes"
        )
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        raise InvalidInput(
            f"task data labels must be 0..K-1 with every class present; labels "
            f"{_listed(missing)} have no samples (K = {classes} from the largest label)"
        )
    scarce = np.flatnonzero(counts < MIN_SAMPLES_PER_CLASS)
    if len(scarce):
        fewest = int(counts[scarce].min())
        raise InvalidInput(
            f"task data has too few samples per class: labels {_listed(scarce)} have fewer "
            f"than {MIN_SAMPLES_PER_CLASS} (the fewest: {fewest}); give each class at least "
            f"{MIN_SAMPLES_PER_CLASS}"
        )
    return classes


def _listed(labels: np.ndarray, shown: int = 10) -> str:
    names = ", ".join(str(int(label)) for label in labels[:shown])
    return names if len(labels) <= shown else f"{names} and {len(labels) - shown} more"
