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


def test_a_clean_image_of_another_label_beside_it_stamped() -> None:
    from modelguard.datasets import Dataset
    from modelguard.detection.render import EXAMPLE_PARTS

    masks = torch.zeros(2, 4, 4)
    masks[1, 0, 0] = 1.0  # label 1's trigger: one white pixel in the corner
    patterns = torch.ones(2, 1, 4, 4)
    result = SimpleNamespace(
        masks=masks,
        patterns=patterns,
        value_range=(0.0, 1.0),
        trigger=lambda label: (masks[label], patterns[label]),
    )
    clean = Dataset(
        torch.stack([torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.5)]), torch.tensor([1, 0])
    )
    pngs = trigger_pngs(result, [1], scale=1, clean=clean)  # type: ignore[arg-type]
    assert {image_name(1, part) for part in EXAMPLE_PARTS} <= set(pngs)
    clean_image = Image.open(io.BytesIO(pngs["label 1 clean"]))
    stamped = Image.open(io.BytesIO(pngs["label 1 stamped"]))
    # the image shown is the one of another label (grey), stamped only where the mask is
    assert clean_image.getpixel((0, 0)) == 128 and clean_image.getpixel((3, 3)) == 128
    assert stamped.getpixel((0, 0)) == 255 and stamped.getpixel((3, 3)) == 128
