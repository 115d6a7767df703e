"""The per-carrier output key: a secret orthogonal matrix the device applies to the public
model's scores, folded exactly into the served mapper, carried in the carrier artifact."""

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
    mapper_to_safetensors,
    random_output_key,
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


@pytest.mark.parametrize("hidden", [0, 16])
def test_keyed_mapper_answers_keyed_scores_exactly_as_the_mapper_answers_plain_ones(
    hidden: int,
) -> None:
    torch.manual_seed(0)
    scores = torch.randn(300, 12) * torch.linspace(0.01, 50.0, 12) + 2.0
    mapper = MappingNetwork(12, 5, hidden)
    mapper.standardise(scores)
    key = random_output_key(12, seed=1)
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


def test_a_mapper_fitted_under_one_key_is_near_chance_under_another() -> None:
    """What a rotation does to a stolen substitute: ten well-separated classes, a mapper
    trained on keyed scores, then fed the same scores under the next generation's key."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=generator) * 3
    y = torch.randint(0, 10, (4000,), generator=generator)
    scores = centres[y] + torch.randn(4000, 32, generator=generator)
    old, new = random_output_key(32, seed=10), random_output_key(32, seed=11)
    torch.manual_seed(0)
    substitute = MappingNetwork(32, 10, 32)
    substitute.standardise(apply_output_key(scores, old))
    optimiser = torch.optim.Adam(substitute.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(substitute(apply_output_key(scores, old)), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        same = (substitute(apply_output_key(scores, old)).argmax(1) == y).float().mean()
        rotated = (substitute(apply_output_key(scores, new)).argmax(1) == y).float().mean()
    assert float(same) > 0.95
    assert float(rotated) < 0.4  # chance is 0.1; a kept key would leave it at `same`


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
    with pytest.raises(InvalidInput, match="square"):
        check_output_key(torch.rand(6, 5))
    with pytest.raises(InvalidInput, match="square"):
        check_output_key(torch.zeros(0, 0))


def test_rotation_weight_needs_an_unkeyed_carrier() -> None:
    with pytest.raises(InvalidInput, match="output_key=False"):
        CarrierConfig(rotation_weight=1.0)
    assert CarrierConfig(rotation_weight=1.0, output_key=False).rotation_weight == 1.0
