"""The one trigger renderer (service PNG artifacts and ``modelguard detect --out``)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import torch
from PIL import Image

from modelguard.detection.render import PARTS, image_name, trigger_pngs


def test_every_part_of_every_label_scaled_in_the_value_range() -> None:
    masks = torch.zeros(3, 4, 5)
    masks[1, 0, 0] = 1.0
    patterns = torch.full((3, 1, 4, 5), 255.0)
    result = SimpleNamespace(
        masks=masks,
        patterns=patterns,
        value_range=(0.0, 255.0),
        trigger=lambda label: (masks[label], patterns[label]),
    )
    pngs = trigger_pngs(result, [1, 2], scale=3)  # type: ignore[arg-type]
    assert set(pngs) == {image_name(label, part) for label in (1, 2) for part in PARTS}
    assert image_name(1, "mask") == "label 1 mask"
    trigger = Image.open(io.BytesIO(pngs["label 1 trigger"]))
    assert trigger.size == (15, 12)
    assert trigger.getpixel((0, 0)) == 255 and trigger.getpixel((14, 11)) == 0
    pattern = Image.open(io.BytesIO(pngs["label 2 pattern"]))
    assert pattern.getpixel((7, 7)) == 255  # 255 in a 0..255 range is white
