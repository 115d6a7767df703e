"""Pictures of reversed triggers: the one renderer behind the trigger-reversal service's
PNG artifacts and the files ``modelguard detect --out`` writes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from modelguard.plots import tensor_png

if TYPE_CHECKING:
    from modelguard.detection.base import DetectionResult

#: What is drawn per label: the mask ``(H, W)`` in [0, 1], the pattern ``(C, H, W)`` mapped
#: from the value range to [0, 1], and the trigger as stamped (``pattern ⊙ mask``).
PARTS = ("mask", "pattern", "trigger")


def image_name(label: int, part: str) -> str:
    """The name an image goes by in summaries and reports: ``"label 7 mask"``."""
    return f"label {label} {part}"


def _arrays(result: DetectionResult, label: int) -> dict[str, np.ndarray]:
    """``PARTS`` of one label as float arrays in [0, 1]."""
    low, high = result.value_range
    mask_tensor, pattern_tensor = result.trigger(label)
    mask = mask_tensor.detach().float().numpy()
    pattern = ((pattern_tensor.detach().float() - low) / (high - low)).numpy()
    return {"mask": mask, "pattern": pattern, "trigger": pattern * mask[None]}


def trigger_pngs(
    result: DetectionResult, labels: Iterable[int], scale: int = 4
) -> dict[str, bytes]:
    """PNG files of every part of every label in ``labels``, keyed `image_name(label,
    part)`, upscaled ``scale``× (nearest neighbour)."""
    images: dict[str, bytes] = {}
    for label in labels:
        for part, array in _arrays(result, label).items():
            images[image_name(label, part)] = tensor_png(array, scale=scale)
    return images
