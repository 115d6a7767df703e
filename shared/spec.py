"""The declared input contract of a model: shape, value range, normalisation.

Detection silently breaks when the defender's idea of the input differs from the
model's, so the spec is always declared with a submission and validated, never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from modelguard.errors import InvalidInput

#: Bounds on a declared input: checked before anything is allocated for it.
MAX_CHANNELS = 16
MAX_SIDE = 1024
MAX_VALUES = 4 << 20  # C × H × W


@dataclass(frozen=True)
class InputSpec:
    """``shape`` is (C, H, W); data values lie in ``value_range``; ``mean``/``std`` (one
    value per channel, or one for all) are applied as ``(x - mean) / std`` before the model.
    """

    shape: tuple[int, int, int]
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(d) <= 0 for d in self.shape):
            raise InvalidInput(
                f"input shape must be three positive sizes C,H,W (e.g. 1,28,28); got {self.shape}"
            )
        channels, height, width = (int(d) for d in self.shape)
        if (
            channels > MAX_CHANNELS
            or height > MAX_SIDE
            or width > MAX_SIDE
            or (channels * height * width > MAX_VALUES)
        ):
            raise InvalidInput(
                f"input shape {list(self.shape)} is larger than supported (at most "
                f"{MAX_CHANNELS} channels, {MAX_SIDE}×{MAX_SIDE} pixels, {MAX_VALUES} values)"
            )
        low, high = self.value_range
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise InvalidInput(f"value range must be finite with min < max; got {low},{high}")
        if len(self.mean) != len(self.std):
            raise InvalidInput("--mean and --std must have the same number of values")
        if self.mean and len(self.mean) not in (1, channels):
            raise InvalidInput(
                f"mean/std need 1 or {channels} values (one per channel); got {len(self.mean)}"
            )
        if any((not math.isfinite(s)) or s <= 0 for s in self.std):
            raise InvalidInput("every std value must be finite and > 0")
        if any(not math.isfinite(m) for m in self.mean):
            raise InvalidInput("every mean value must be finite")

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def normalised(self) -> bool:
        return bool(self.mean)

    def to_dict(self) -> dict[str, object]:
        return {
            "shape": list(self.shape),
            "value_range": list(self.value_range),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> InputSpec:
        shape = tuple(int(v) for v in data["shape"])  # type: ignore[attr-defined]
        value_range = tuple(float(v) for v in data.get("value_range", (0.0, 1.0)))  # type: ignore[attr-defined]
        return cls(
            shape=(shape[0], shape[1], shape[2]) if len(shape) == 3 else shape,  # type: ignore[arg-type]
            value_range=(value_range[0], value_range[1]),
            mean=tuple(float(v) for v in data.get("mean", ())),  # type: ignore[attr-defined]
            std=tuple(float(v) for v in data.get("std", ())),  # type: ignore[attr-defined]
        )

    @classmethod
    def parse(
        cls, shape: str, value_range: str, mean: str | None = None, std: str | None = None
    ) -> InputSpec:
        """Build from CLI strings such as ``"1,28,28"`` and ``"0,1"``."""

        def floats(text: str, what: str) -> tuple[float, ...]:
            try:
                return tuple(float(v) for v in text.split(",") if v.strip())
            except ValueError as err:
                raise InvalidInput(f"{what} must be comma-separated numbers; got {text!r}") from err

        try:
            dims = tuple(int(v) for v in shape.split(","))
        except ValueError as err:
            raise InvalidInput(f"input shape must look like 1,28,28; got {shape!r}") from err
        if len(dims) != 3:
            raise InvalidInput(f"input shape must be C,H,W (three numbers); got {shape!r}")
        bounds = floats(value_range, "value range")
        if len(bounds) != 2:
            raise InvalidInput(f"value range must be MIN,MAX; got {value_range!r}")
        return cls(
            shape=(dims[0], dims[1], dims[2]),
            value_range=(bounds[0], bounds[1]),
            mean=floats(mean, "mean") if mean else (),
            std=floats(std, "std") if std else (),
        )


class Normalized(nn.Module):
    """Wraps a model so that it takes inputs in the declared value range: applies the
    declared ``(x - mean) / std`` first. Algorithms then work in raw input space, where a
    trigger pixel means what it means in the data."""

    def __init__(self, model: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.model = model
        channels = spec.channels
        mean = torch.tensor(spec.mean or (0.0,), dtype=torch.float32)
        std = torch.tensor(spec.std or (1.0,), dtype=torch.float32)
        self.register_buffer("mean", mean.expand(channels).clone().view(1, channels, 1, 1))
        self.register_buffer("std", std.expand(channels).clone().view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        return self.model((x - mean) / std)  # type: ignore[no-any-return]


def wrap(model: nn.Module, spec: InputSpec) -> nn.Module:
    """The model as a function of raw inputs in ``spec.value_range``."""
    return Normalized(model, spec) if spec.normalised else model
