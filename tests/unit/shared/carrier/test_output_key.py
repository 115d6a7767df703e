"""The per-carrier output key: a secret orthogonal matrix and offset the device applies to
the public model's scores, folded exactly into the served mapper, carried in the carrier
artifact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from modelguard.carrier.carrier import (
    Carrier,
    CarrierConfig,
    MappingNetwork,
    Placement,
    apply_output_key,
    carrier_from_safetensors,
    carrier_to_safetensors,
    check_output_key,
    key_description,
    key_parts,
    mapper_to_safetensors,
    random_output_key,
    score_spread,
)
from modelguard.carrier.mapper_registry import parse_mapper
from modelguard.carrier.public_models import from_module
from modelguard.errors import InvalidInput


def test_key_is_orthogonal_and_secret_by_default() -> None:
    key = random_output_key(40)
    assert key.shape == (40, 40) and key.dtype == torch.float64
    torch.testing.assert_close(key.T @ key, torch.eye(40, dtype=torch.float64))
    # no seed: drawn from the OS's secure source, so two carriers never share a key
    assert not torch.equal(key, random_output_key(40))
    # a seed reproduces (benchmarks and tests only)
    assert torch.equal(random_output_key(8, seed=3), random_output_key(8, seed=3))
    with pytest.raises(InvalidInput):
        random_output_key(0)


def test_an_offset_key_is_the_rotation_over_an_offset_row_of_the_asked_norm() -> None:
    key = random_output_key(40, seed=1, offset_norm=250.0)
    assert key.shape == (41, 40)
    rotation, offset = key_parts(key)
    assert offset is not None
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(40, dtype=torch.float64))
    assert float(offset.norm()) == pytest.approx(250.0)
    check_output_key(key)
    assert key_description(key) == "orthogonal + offset"
    assert key_description(rotation) == "orthogonal" and key_description(None) is None
    scores = torch.randn(7, 40, dtype=torch.float64)
    torch.testing.assert_close(apply_output_key(scores, key), scores @ rotation + offset)
    with pytest.raises(InvalidInput, match="offset norm"):
        random_output_key(4, offset_norm=-1.0)
    with pytest.raises(InvalidInput, match="output_offset"):
        CarrierConfig(output_offset=float("nan"))


def test_score_spread_is_the_mean_distance_from_the_mean() -> None:
    scores = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0], [1.0, -3.0]]) + 100.0
    # mean (101, 100): distances 1, 1, 3, 3
    assert score_spread(scores) == pytest.approx(2.0)


@pytest.mark.parametrize("hidden", [0, 16])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_keyed_mapper_answers_keyed_scores_exactly_as_the_mapper_answers_plain_ones(
    hidden: int, offset: float
) -> None:
    torch.manual_seed(0)
    scores = torch.randn(300, 12) * torch.linspace(0.01, 50.0, 12) + 2.0
    mapper = MappingNetwork(12, 5, hidden)
    mapper.standardise(scores)
    # the offset as carrier-trainer draws it: far from the scores, in their own units
    key = random_output_key(12, seed=1, offset_norm=offset * score_spread(scores))
    keyed = mapper.keyed(key)
    with torch.no_grad():
        plain = mapper(scores)
        through_key = keyed(apply_output_key(scores, key))
    torch.testing.assert_close(through_key, plain, rtol=1e-4, atol=1e-3)
    # the served (numpy) form of the keyed mapper gives the same logits
    served = parse_mapper(mapper_to_safetensors(keyed.eval()))
    keyed_scores = apply_output_key(scores, key).numpy()
    np.testing.assert_allclose(served.logits(keyed_scores), plain.numpy(), rtol=1e-4, atol=1e-3)
    # the original is untouched; the keyed copy reads raw (standardised-in) inputs
    assert not torch.equal(mapper.input_std, torch.ones(12))
    assert torch.equal(keyed.input_std, torch.ones(12))
    with pytest.raises(InvalidInput, match="reads 12 scores"):
        mapper.keyed(random_output_key(11, seed=0))


def _clustered_scores() -> tuple[torch.Tensor, torch.Tensor]:
    """Ten well-separated classes of 32 scores."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=generator) * 3
    y = torch.randint(0, 10, (4000,), generator=generator)
    return centres[y] + torch.randn(4000, 32, generator=generator), y


def _substitute(scores: torch.Tensor, y: torch.Tensor, key: torch.Tensor) -> MappingNetwork:
    """A thief's substitute: a mapper fitted to one generation's keyed scores."""
    torch.manual_seed(0)
    substitute = MappingNetwork(32, 10, 32)
    substitute.standardise(apply_output_key(scores, key))
    optimiser = torch.optim.Adam(substitute.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(substitute(apply_output_key(scores, key)), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return substitute.eval()


def test_a_mapper_fitted_under_one_key_is_near_chance_under_another() -> None:
    """What a rotation does to a stolen substitute: a mapper trained on keyed scores, then
    fed the same scores under the next generation's key."""
    scores, y = _clustered_scores()
    old, new = random_output_key(32, seed=10), random_output_key(32, seed=11)
    substitute = _substitute(scores, y, old)
    with torch.no_grad():
        same = (substitute(apply_output_key(scores, old)).argmax(1) == y).float().mean()
        rotated = (substitute(apply_output_key(scores, new)).argmax(1) == y).float().mean()
    assert float(same) > 0.95
    assert float(rotated) < 0.4  # chance is 0.1; a kept key would leave it at `same`


def test_under_a_fresh_offset_key_a_stale_substitute_answers_one_class_for_everything() -> None:
    """The offset's purpose: a rotation alone leaves the substitute reading class structure
    (at chance on average, above it on some draws); far from every input it was fitted on,
    it answers one class for all inputs, which is right for that class's share only."""
    scores, y = _clustered_scores()
    spread = score_spread(scores)
    old = random_output_key(32, seed=10, offset_norm=1000.0 * spread)
    substitute = _substitute(scores, y, old)
    shares = np.bincount(y.numpy(), minlength=10) / len(y)
    with torch.no_grad():
        fitted = substitute(apply_output_key(scores, old)).argmax(1)
        assert float((fitted == y).float().mean()) > 0.95
        for draw in range(20):
            new = random_output_key(32, seed=100 + draw, offset_norm=1000.0 * spread)
            predicted = substitute(apply_output_key(scores, new)).argmax(1)
            top = np.bincount(predicted.numpy(), minlength=10).argmax()
            assert float((predicted == int(top)).float().mean()) > 0.9, draw
            accuracy = float((predicted == y).float().mean())
            assert accuracy <= shares.max() + 0.02, draw


def test_carrier_artifact_carries_the_key_and_refuses_a_bad_one() -> None:
    torch.manual_seed(0)
    public = from_module("tiny", nn.Sequential(nn.Flatten(), nn.Linear(64, 6)), (1, 8, 8))
    image, placement = torch.rand(1, 8, 8), Placement(2, 2, 4, 4)
    key = random_output_key(6, seed=2).to(torch.float32)
    package = carrier_from_safetensors(carrier_to_safetensors(image, placement, public, 3, key))
    assert package.generation == 3
    assert package.carrier.output_key is not None
    torch.testing.assert_close(package.carrier.output_key, key)
    x = torch.rand(5, 1, 4, 4)
    with torch.no_grad():
        expected = public.module(Carrier(image, placement).embed(x)) @ key
    torch.testing.assert_close(package.carrier.outputs(public, x), expected)
    # an unkeyed carrier still round-trips (carriers issued before keys existed)
    plain = carrier_from_safetensors(carrier_to_safetensors(image, placement, public))
    assert plain.carrier.output_key is None
    with pytest.raises(InvalidInput, match="gives 6 scores"):
        carrier_to_safetensors(image, placement, public, 0, random_output_key(5, seed=0))
    from safetensors.torch import save

    metadata = {
        "format": "modelguard-carrier-v1",
        "public_model": "tiny",
        "public_model_sha256": public.weights_sha256,
        "generation": "0",
        **{k: str(v) for k, v in placement.to_dict().items()},
    }
    bad = save({"carrier": image, "output_key": torch.rand(6, 6)}, metadata=metadata)
    with pytest.raises(InvalidInput, match="not orthogonal"):
        carrier_from_safetensors(bad)
    with pytest.raises(InvalidInput, match=r"\(K \+ 1, K\)"):
        check_output_key(torch.rand(6, 4))
    with pytest.raises(InvalidInput, match=r"\(K \+ 1, K\)"):
        check_output_key(torch.zeros(0, 0))
    with pytest.raises(InvalidInput, match="not orthogonal"):
        check_output_key(torch.rand(7, 6))  # an offset row under a matrix that is no rotation
    # an affine key (rotation over an offset row) round-trips and is applied on the device
    affine = random_output_key(6, seed=4, offset_norm=300.0).to(torch.float32)
    keyed = carrier_from_safetensors(carrier_to_safetensors(image, placement, public, 1, affine))
    assert keyed.carrier.output_key is not None
    torch.testing.assert_close(keyed.carrier.output_key, affine)
    with torch.no_grad():
        raw = public.module(Carrier(image, placement).embed(x))
    torch.testing.assert_close(keyed.carrier.outputs(public, x), raw @ affine[:6] + affine[6])


def test_rotation_weight_needs_an_unkeyed_carrier() -> None:
    with pytest.raises(InvalidInput, match="output_key=False"):
        CarrierConfig(rotation_weight=1.0)
    assert CarrierConfig(rotation_weight=1.0, output_key=False).rotation_weight == 1.0
