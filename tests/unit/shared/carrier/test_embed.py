"""Embedding arithmetic of carriers: centre placement, clipping, tanh bounds, natural images."""

from __future__ import annotations

import pytest
import torch

from modelguard.carrier.carrier import (
    Carrier,
    Placement,
    carrier_from_safetensors,
    carrier_image,
    carrier_to_safetensors,
    centre_placement,
    embed,
    placement_for,
)
from modelguard.carrier.natural_images import (
    natural_image,
    natural_image_for_user,
    photograph_count,
    user_image_index,
)
from modelguard.carrier.public_models import from_module
from modelguard.errors import InvalidInput


def test_centre_placement_even_and_odd_margins() -> None:
    assert centre_placement((28, 28), (20, 20)) == Placement(4, 4, 20, 20)
    # odd margin: the extra pixel goes below / right
    assert centre_placement((28, 28), (17, 17)) == Placement(5, 5, 17, 17)
    assert centre_placement((224, 224), (168, 168)) == Placement(28, 28, 168, 168)
    with pytest.raises(InvalidInput, match="must fit"):
        centre_placement((28, 28), (29, 10))


def test_placement_for_keeps_aspect_and_fraction() -> None:
    assert placement_for((1, 28, 28), (28, 28), 0.75) == Placement(3, 3, 21, 21)
    box = placement_for((3, 224, 224), (28, 14), 0.5)
    assert (box.height, box.width) == (112, 56)
    assert (box.top, box.left) == (56, 84)


def test_embed_places_resized_input_at_centre_and_keeps_the_border() -> None:
    carrier = torch.full((1, 8, 8), 0.25)
    x = torch.ones(2, 1, 2, 2)
    out = embed(x, carrier, Placement(3, 3, 2, 2))
    assert out.shape == (2, 1, 8, 8)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[3:5, 3:5] = True
    assert torch.all(out[:, 0][:, inside] == 1.0)
    assert torch.all(out[:, 0][:, ~inside] == 0.25)
    # resizing: a 4×4 input of ones becomes a 2×2 block of ones
    out = embed(torch.ones(1, 1, 4, 4), carrier, Placement(3, 3, 2, 2))
    assert torch.allclose(out[0, 0, 3:5, 3:5], torch.ones(2, 2))


def test_embed_replicates_grey_input_over_rgb_carrier() -> None:
    carrier = torch.zeros(3, 6, 6)
    x = torch.rand(1, 1, 2, 2)
    out = embed(x, carrier, Placement(2, 2, 2, 2))
    for channel in range(3):
        assert torch.allclose(out[0, channel, 2:4, 2:4], x[0, 0])


def test_carrier_is_clipped_and_tanh_bounded() -> None:
    natural = torch.rand(1, 10, 10)
    huge = torch.full((1, 10, 10), 50.0)
    assert torch.all(carrier_image(natural, huge) == 1.0)  # a + tanh(p) > 1 → clipped
    assert torch.all(carrier_image(natural, -huge) == 0.0)
    p = torch.randn(1, 10, 10) * 3
    c = carrier_image(natural, p)
    assert c.min() >= 0 and c.max() <= 1
    # tanh keeps the perturbation strictly inside (-1, 1) before clipping
    assert torch.all((c - natural).abs() < 1.0)
    unclipped = (natural + torch.tanh(p)).clamp(0, 1)
    assert torch.equal(c, unclipped)


def test_covered_pixels_get_no_gradient() -> None:
    natural = torch.full((1, 8, 8), 0.5)
    p = torch.zeros(1, 8, 8, requires_grad=True)
    out = embed(torch.rand(4, 1, 4, 4), carrier_image(natural, p), Placement(2, 2, 4, 4))
    out.sum().backward()
    assert p.grad is not None
    assert torch.all(p.grad[0, 2:6, 2:6] == 0)
    assert torch.all(p.grad[0, :2] != 0)


def test_natural_images_are_deterministic_distinct_and_in_range() -> None:
    shape = (1, 16, 16)
    first = natural_image(0, shape)
    assert torch.equal(first, natural_image(0, shape))
    assert first.shape == shape and first.min() >= 0 and first.max() <= 1
    images = [natural_image(i, shape) for i in range(photograph_count() + 3)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not torch.allclose(images[i], images[j]), (i, j)
    rgb = natural_image(2, (3, 20, 24))
    assert rgb.shape == (3, 20, 24)


def test_user_images_change_on_rotation() -> None:
    for generation in range(5):
        assert user_image_index("alice", generation) != user_image_index("alice", generation + 1)
    assert user_image_index("alice", 0) != user_image_index("bob", 0)
    a = natural_image_for_user("alice", 0, (1, 12, 12))
    assert torch.equal(a, natural_image_for_user("alice", 0, (1, 12, 12)))


def test_carrier_artifact_round_trip() -> None:
    public = from_module(
        "tiny", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5)), (1, 8, 8)
    )
    image = torch.rand(1, 8, 8)
    data = carrier_to_safetensors(image, Placement(2, 2, 4, 4), public, generation=3)
    package = carrier_from_safetensors(data)
    assert torch.equal(package.carrier.image, image)
    assert package.carrier.placement == Placement(2, 2, 4, 4)
    assert (package.public_model, package.generation) == ("tiny", 3)
    assert package.public_model_sha256 == public.weights_sha256
    assert isinstance(package.carrier, Carrier)
    with pytest.raises(InvalidInput):
        carrier_from_safetensors(b"not a carrier")
