"""Backdoor attack toolkit: trigger definitions, stamping, data poisoning, attack success
rate and the training of infected (and clean twin) models.

Used by tests, benchmarks, the demo and the repair stage. Pure functions: tensors and
datasets in, tensors, datasets and models out; nothing is read or written except that
:func:`train_backdoored` may load a named dataset through :mod:`modelguard.datasets`.

Attacks implemented
-------------------
* BadNets (Gu et al., 2017): a small patch of fixed values pasted at a fixed position,
  samples relabelled to the attacker's target (all-to-one). :class:`PatchTrigger`.
* Blended injection (Chen et al., 2017, "Targeted backdoor attacks ... using data
  poisoning"): ``x' = (1 - alpha) x + alpha p`` with a full-image pattern ``p``.
  :class:`BlendTrigger`.
* Several triggers at once, each with its own target (e.g. two triggers, two targets):
  :class:`MultiTrigger`, or simply a sequence of triggers.

Values
------
Images are float tensors ``(N, C, H, W)`` in a value range ``(low, high)`` (``(0, 1)`` for
the bundled datasets). Trigger *patterns* are given in **relative units in [0, 1]** and
mapped to ``low + v * (high - low)`` when stamped, so one trigger definition means the same
thing for data in [0, 1] or [0, 255]. Patterns are ``(h, w)``, ``(1, h, w)`` (broadcast to
every channel) or ``(C, h, w)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import nn

from modelguard.datasets import Dataset, load_named
from modelguard.errors import InvalidInput
from modelguard.nn.architectures import build
from modelguard.nn.training import TrainConfig, accuracy, predict, train_classifier

__all__ = [
    "NAMED_PATTERNS",
    "BackdoorModel",
    "BlendTrigger",
    "MultiTrigger",
    "PatchTrigger",
    "Trigger",
    "TriggerLike",
    "as_triggers",
    "attack_success_rate",
    "attack_success_rates",
    "make_pattern",
    "poison",
    "poison_indices",
    "stamp",
    "train_backdoored",
    "trigger_from_dict",
]

#: Pattern names understood by :func:`make_pattern`.
NAMED_PATTERNS = ("checkerboard", "white", "black", "random", "cross", "stripes")


def make_pattern(
    name: str, height: int, width: int, channels: int = 1, seed: int = 0
) -> torch.Tensor:
    """A pattern ``(channels, height, width)`` in relative units [0, 1].

    ``checkerboard`` (1 at even ``row + col``), ``white`` (all 1), ``black`` (all 0),
    ``random`` (seeded uniform noise, independent per channel), ``cross`` (an X of 1s on 0),
    ``stripes`` (vertical stripes, 1 on even columns).
    """
    if height < 1 or width < 1 or channels < 1:
        raise InvalidInput(f"pattern size must be positive; got {channels}x{height}x{width}")
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    if name == "checkerboard":
        plane = ((rows + cols) % 2 == 0).float()
    elif name == "white":
        plane = torch.ones(height, width)
    elif name == "black":
        plane = torch.zeros(height, width)
    elif name == "cross":
        r = rows.float() / max(height - 1, 1)
        c = cols.float() / max(width - 1, 1)
        tol = 0.5 / max(height - 1, width - 1, 1)
        plane = (((r - c).abs() <= tol) | ((r + c - 1).abs() <= tol)).float()
    elif name == "stripes":
        plane = (cols % 2 == 0).float().expand(height, width)
    elif name == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(channels, height, width, generator=generator)
    else:
        raise InvalidInput(f"unknown pattern {name!r}; known: {', '.join(NAMED_PATTERNS)}")
    return plane.expand(channels, height, width).clone()


def _as_pattern(value: object, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3 or tensor.numel() == 0:
        raise InvalidInput(f"{what} pattern must be (h, w) or (C, h, w); got {list(tensor.shape)}")
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise InvalidInput(f"{what} pattern values must be finite and in [0, 1] (relative units)")
    return tensor


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    items = tuple(int(v) for v in value)
    if len(items) != 2:
        raise InvalidInput(f"{what} must be an int or a pair (rows, cols); got {value!r}")
    return (items[0], items[1])


def _check_target(target: int) -> None:
    if not isinstance(target, int) or isinstance(target, bool) or target < 0:
        raise InvalidInput(f"trigger target must be a non-negative class index; got {target!r}")


@dataclass(frozen=True, eq=False)
class PatchTrigger:
    """A BadNets patch: ``size`` (rows, cols) pixels at ``position`` replaced by ``pattern``.

    ``position`` is the patch's top-left corner (row, col). Negative values count from the
    bottom/right edge: ``-1`` puts the patch flush against that edge, ``-2`` one pixel in,
    and so on; ``(-1, -1)`` is the bottom-right corner.
    ``pattern`` is a name from :data:`NAMED_PATTERNS` or values in [0, 1] of shape
    ``(h, w)``, ``(1, h, w)`` or ``(C, h, w)`` with ``(h, w) == size`` (``size`` may then be
    omitted: it is taken from the pattern). ``seed`` only matters for ``"random"``.
    """

    target: int
    size: int | tuple[int, int] = 3
    position: tuple[int, int] = (-2, -2)
    pattern: str | torch.Tensor = "checkerboard"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_target(self.target)
        if isinstance(self.pattern, str):
            size = _pair(self.size, "patch size")
            if self.pattern not in NAMED_PATTERNS:
                raise InvalidInput(
                    f"unknown pattern {self.pattern!r}; known: {', '.join(NAMED_PATTERNS)}"
                )
        else:
            pattern = _as_pattern(self.pattern, "patch")
            size = (int(pattern.shape[1]), int(pattern.shape[2]))
            object.__setattr__(self, "pattern", pattern)
        if size[0] < 1 or size[1] < 1:
            raise InvalidInput(f"patch size must be positive; got {size}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "position", _pair(self.position, "patch position"))

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the patch."""
        assert isinstance(self.size, tuple)
        return self.size

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of the patch on an ``height × width`` image."""
        rows, cols = self.shape
        top, left = self.position
        top = height - rows + top + 1 if top < 0 else top
        left = width - cols + left + 1 if left < 0 else left
        if top < 0 or left < 0 or top + rows > height or left + cols > width:
            raise InvalidInput(
                f"a {rows}x{cols} patch at {self.position} does not fit a {height}x{width} image"
            )
        return top, left, top + rows, left + cols

    def values(self, channels: int) -> torch.Tensor:
        """The pattern ``(channels, h, w)`` in relative units."""
        rows, cols = self.shape
        if isinstance(self.pattern, str):
            return make_pattern(self.pattern, rows, cols, channels, self.seed)
        pattern = self.pattern
        if pattern.shape[0] == 1:
            return pattern.expand(channels, rows, cols)
        if pattern.shape[0] != channels:
            raise InvalidInput(
                f"patch pattern has {pattern.shape[0]} channels; the images have {channels}"
            )
        return pattern

    def mask(self, height: int, width: int) -> torch.Tensor:
        """The ground-truth trigger mask ``(height, width)``: 1 on the patch, 0 elsewhere."""
        top, left, bottom, right = self.box(height, width)
        out = torch.zeros(height, width)
        out[top:bottom, left:right] = 1.0
        return out

    def to_dict(self) -> dict[str, Any]:
        pattern: Any = self.pattern if isinstance(self.pattern, str) else self.pattern.tolist()
        return {
            "kind": "patch",
            "target": self.target,
            "size": list(self.shape),
            "position": list(self.position),
            "pattern": pattern,
            "seed": self.seed,
        }


@dataclass(frozen=True, eq=False)
class BlendTrigger:
    """A blended trigger: ``x' = (1 - alpha) * x + alpha * pattern`` over the whole image.

    ``pattern`` is a name (``"random"`` — seeded noise, the usual choice —, or any other
    name of :data:`NAMED_PATTERNS`, drawn full-image) or values in [0, 1] of shape
    ``(H, W)``, ``(1, H, W)`` or ``(C, H, W)`` matching the images.
    """

    target: int
    alpha: float = 0.2
    pattern: str | torch.Tensor = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_target(self.target)
        if not (isinstance(self.alpha, (int, float)) and 0.0 < float(self.alpha) <= 1.0):
            raise InvalidInput(f"blend alpha must be in (0, 1]; got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.pattern, str):
            if self.pattern not in NAMED_PATTERNS:
                raise InvalidInput(
                    f"unknown pattern {self.pattern!r}; known: {', '.join(NAMED_PATTERNS)}"
                )
        else:
            object.__setattr__(self, "pattern", _as_pattern(self.pattern, "blend"))

    def values(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The pattern ``(channels, height, width)`` in relative units."""
        if isinstance(self.pattern, str):
            return make_pattern(self.pattern, height, width, channels, self.seed)
        pattern = self.pattern
        if tuple(pattern.shape[1:]) != (height, width):
            raise InvalidInput(
                f"blend pattern is {list(pattern.shape[1:])}; the images are {height}x{width}"
            )
        if pattern.shape[0] == 1:
            return pattern.expand(channels, height, width)
        if pattern.shape[0] != channels:
            raise InvalidInput(
                f"blend pattern has {pattern.shape[0]} channels; the images have {channels}"
            )
        return pattern

    def to_dict(self) -> dict[str, Any]:
        pattern: Any = self.pattern if isinstance(self.pattern, str) else self.pattern.tolist()
        return {
            "kind": "blend",
            "target": self.target,
            "alpha": self.alpha,
            "pattern": pattern,
            "seed": self.seed,
        }


Trigger: TypeAlias = PatchTrigger | BlendTrigger


@dataclass(frozen=True)
class MultiTrigger:
    """Several triggers planted together, each with its own target (e.g. two triggers and
    two targets). Each trigger poisons its own share of the training set."""

    triggers: tuple[Trigger, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "triggers", tuple(self.triggers))
        if not self.triggers:
            raise InvalidInput("a multi-trigger attack needs at least one trigger")
        for trigger in self.triggers:
            if not isinstance(trigger, (PatchTrigger, BlendTrigger)):
                raise InvalidInput(f"not a trigger: {trigger!r}")

    @property
    def targets(self) -> tuple[int, ...]:
        return tuple(t.target for t in self.triggers)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "multi", "triggers": [t.to_dict() for t in self.triggers]}


#: Anything the poisoning functions accept: one trigger, a MultiTrigger, or a sequence.
TriggerLike: TypeAlias = PatchTrigger | BlendTrigger | MultiTrigger | Sequence[Trigger]


def as_triggers(triggers: TriggerLike) -> tuple[Trigger, ...]:
    """Normalise a :data:`TriggerLike` to a tuple of single triggers."""
    if isinstance(triggers, (PatchTrigger, BlendTrigger)):
        return (triggers,)
    if isinstance(triggers, MultiTrigger):
        return triggers.triggers
    out = tuple(triggers)
    for trigger in out:
        if not isinstance(trigger, (PatchTrigger, BlendTrigger)):
            raise InvalidInput(f"not a trigger: {trigger!r}")
    return out


def trigger_from_dict(data: dict[str, Any]) -> Trigger | MultiTrigger:
    """Inverse of ``to_dict`` (used for the zoo's ground truth)."""
    kind = data.get("kind")
    if kind == "multi":
        return MultiTrigger(tuple(_single_from_dict(d) for d in data["triggers"]))
    return _single_from_dict(data)


def _single_from_dict(data: dict[str, Any]) -> Trigger:
    pattern = data.get("pattern", "checkerboard")
    if not isinstance(pattern, str):
        pattern = torch.tensor(pattern, dtype=torch.float32)
    if data.get("kind") == "patch":
        return PatchTrigger(
            target=int(data["target"]),
            size=_pair(data["size"], "patch size"),
            position=_pair(data["position"], "patch position"),
            pattern=pattern,
            seed=int(data.get("seed", 0)),
        )
    if data.get("kind") == "blend":
        return BlendTrigger(
            target=int(data["target"]),
            alpha=float(data["alpha"]),
            pattern=pattern,
            seed=int(data.get("seed", 0)),
        )
    raise InvalidInput(f"unknown trigger kind {data.get('kind')!r}")


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise InvalidInput(f"images must be (N, C, H, W); got {list(x.shape)}")


def stamp(
    x: torch.Tensor, trigger: Trigger, value_range: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """A copy of images ``x`` ``(N, C, H, W)`` with ``trigger`` applied; same dtype/shape.

    Patch: the patch pixels are replaced by ``low + pattern * (high - low)``.
    Blend: ``(1 - alpha) x + alpha (low + pattern * (high - low))``.
    """
    _check_images(x)
    low, high = value_range
    if not high > low:
        raise InvalidInput(f"value range must have min < max; got {value_range}")
    _, channels, height, width = x.shape
    out = x.clone()
    if isinstance(trigger, PatchTrigger):
        top, left, bottom, right = trigger.box(height, width)
        values = low + trigger.values(channels).to(x) * (high - low)
        out[:, :, top:bottom, left:right] = values
        return out
    if isinstance(trigger, BlendTrigger):
        values = low + trigger.values(channels, height, width).to(x) * (high - low)
        return (1.0 - trigger.alpha) * out + trigger.alpha * values
    raise InvalidInput(f"not a single trigger: {trigger!r} (stamp each trigger separately)")


def poison_indices(
    labels: torch.Tensor, triggers: TriggerLike, rate: float, seed: int = 0
) -> list[torch.Tensor]:
    """Which samples each trigger poisons: for trigger i, ``round(rate * N)`` indices drawn
    (seeded) among samples whose label is not that trigger's target, disjoint across
    triggers."""
    items = as_triggers(triggers)
    if not 0.0 <= rate <= 1.0:
        raise InvalidInput(f"poison rate must be in [0, 1]; got {rate}")
    n = int(labels.shape[0])
    count = round(rate * n)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    taken = torch.zeros(n, dtype=torch.bool)
    out: list[torch.Tensor] = []
    for trigger in items:
        eligible = order[(labels[order] != trigger.target) & ~taken[order]]
        if eligible.numel() < count:
            raise InvalidInput(
                f"cannot poison {count} samples for target {trigger.target}: only "
                f"{eligible.numel()} eligible (lower the rate or use fewer triggers)"
            )
        chosen = eligible[:count]
        taken[chosen] = True
        out.append(chosen)
    return out


def poison(
    dataset: Dataset,
    triggers: TriggerLike,
    rate: float = 0.1,
    seed: int = 0,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Dataset:
    """A poisoned copy of ``dataset`` (same size): for each trigger, a ``rate`` share of
    the samples (not already of its target; disjoint across triggers; seeded) is stamped
    and relabelled to the target. The input dataset is not modified."""
    items = as_triggers(triggers)
    x, y = dataset.x.clone(), dataset.y.clone()
    for trigger, index in zip(items, poison_indices(y, items, rate, seed), strict=True):
        if index.numel():
            x[index] = stamp(x[index], trigger, value_range)
            y[index] = trigger.target
    return Dataset(x, y)


def attack_success_rate(
    model: nn.Module,
    clean_data: Dataset,
    trigger: Trigger,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 1000,
) -> float:
    """Share of clean samples, *excluding those already of the target class*, that the
    model classifies as the target once the trigger is stamped. ``model`` takes inputs in
    ``value_range`` (wrap it with :func:`modelguard.spec.wrap` if it expects normalised data).
    Returns NaN when no sample qualifies."""
    keep = clean_data.y != trigger.target
    if not bool(keep.any()):
        return math.nan
    x = clean_data.x[keep]
    hits = 0
    for start in range(0, len(x), batch_size):
        stamped = stamp(x[start : start + batch_size], trigger, value_range)
        hits += int((predict(model, stamped, batch_size) == trigger.target).sum())
    return hits / len(x)


def attack_success_rates(
    model: nn.Module,
    clean_data: Dataset,
    triggers: TriggerLike,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> list[float]:
    """:func:`attack_success_rate` of each trigger, in order."""
    return [
        attack_success_rate(model, clean_data, t, value_range=value_range)
        for t in as_triggers(triggers)
    ]


@dataclass
class BackdoorModel:
    """A trained model and its measured figures. ``attack_success`` has one entry per
    trigger (empty for a clean model)."""

    model: nn.Module
    arch: str
    triggers: tuple[Trigger, ...]
    clean_accuracy: float
    attack_success: list[float]
    seed: int

    @property
    def infected(self) -> bool:
        return bool(self.triggers)

    @property
    def targets(self) -> tuple[int, ...]:
        return tuple(t.target for t in self.triggers)


def train_backdoored(
    arch: str,
    dataset: str | tuple[Dataset, Dataset],
    triggers: TriggerLike = (),
    seed: int = 0,
    *,
    rate: float = 0.1,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 1e-3,
    train_size: int | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    anneal_epochs: int = 0,
) -> BackdoorModel:
    """Train ``arch`` on ``dataset`` poisoned with ``triggers`` (none: the clean twin).

    ``dataset`` is a name (``"mnist"``, ``"fashion-mnist"``, loaded via
    :func:`modelguard.datasets.load_named`) or a ``(train, test)`` pair. ``train_size`` trains
    on a seeded subset. ``anneal_epochs`` more epochs at ``lr / 10`` follow (they settle
    the final accuracy, so an infected model and its clean twin compare fairly). Clean
    accuracy and ASR are measured on the clean test set. Deterministic for a given seed
    (single-threaded CPU).
    """
    items = as_triggers(triggers)
    if isinstance(dataset, str):
        train, test = load_named(dataset, "train"), load_named(dataset, "test")
    else:
        train, test = dataset
    if train_size is not None and train_size < len(train):
        train = train.subset(train_size, seed=seed)
    channels, height, width = (int(d) for d in train.x.shape[1:])
    num_classes = int(max(int(train.y.max()), int(test.y.max()))) + 1
    for trigger in items:
        if trigger.target >= num_classes:
            raise InvalidInput(f"trigger target {trigger.target} >= {num_classes} classes")
    poisoned = poison(train, items, rate, seed, value_range=value_range) if items else train
    torch.manual_seed(seed)
    model = build(arch, in_channels=channels, num_classes=num_classes, hw=(height, width))
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    train_classifier(model, poisoned, config)
    if anneal_epochs > 0:
        anneal = TrainConfig(epochs=anneal_epochs, batch_size=batch_size, lr=lr / 10, seed=seed + 1)
        train_classifier(model, poisoned, anneal)
    model.eval()
    return BackdoorModel(
        model=model,
        arch=arch,
        triggers=items,
        clean_accuracy=accuracy(model, test),
        attack_success=attack_success_rates(model, test, items, value_range=value_range),
        seed=seed,
    )
