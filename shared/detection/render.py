"""Pictures of reversed triggers: the one renderer behind the trigger-reversal service's
PNG artifacts and the files ``modelguard detect --out`` writes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from modelguard.plots import tensor_png

if TYPE_CHECKING:
    from modelguard.datasets import Dataset
    from modelguard.detection.base import DetectionResult

#: What is drawn per label: the mask ``(H, W)`` in [0, 1], the pattern ``(C, H, W)`` mapped
#: from the value range to [0, 1], and the trigger as stamped (``pattern ⊙ mask``).
PARTS = ("mask", "pattern", "trigger")
#: Drawn too when clean images are given: one clean image of another label, and the same
#: image stamped with the label's trigger (``(1 − mask) ⊙ x + mask ⊙ pattern``).
EXAMPLE_PARTS = ("clean", "stamped")


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


def _example(result: DetectionResult, label: int, clean: Dataset) -> dict[str, np.ndarray]:
    """``EXAMPLE_PARTS`` of one label in [0, 1]: the first clean image of another label
    (of any label when all share it) and that image stamped; empty without images."""
    if len(clean) == 0:
        return {}
    others = (clean.y != label).nonzero().flatten()
    image = clean.x[int(others[0]) if len(others) else 0].detach().float()
    low, high = result.value_range
    mask, pattern = (t.detach().float() for t in result.trigger(label))
    stamped = (1 - mask[None]) * image + mask[None] * pattern
    return {
        "clean": ((image - low) / (high - low)).numpy(),
        "stamped": ((stamped - low) / (high - low)).numpy(),
    }


def trigger_pngs(
    result: DetectionResult,
    labels: Iterable[int],
    scale: int = 4,
    clean: Dataset | None = None,
) -> dict[str, bytes]:
    """PNG files of every part of every label in ``labels``, keyed `image_name(label,
    part)`, upscaled ``scale``× (nearest neighbour); with ``clean`` images, the
    ``EXAMPLE_PARTS`` as well."""
    images: dict[str, bytes] = {}
    for label in labels:
        arrays = _arrays(result, label)
        if clean is not None:
            arrays |= _example(result, label, clean)
        for part, array in arrays.items():
            images[image_name(label, part)] = tensor_png(array, scale=scale)
    return images
