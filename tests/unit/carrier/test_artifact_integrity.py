"""Tamper-proof carrier artifacts (issue 8, part 4): a carrier record pointed at other
bytes in the store — valid under content addressing, but never signed by this
deployment — is refused at load, with an error naming the artifact; the service stays
healthy and other users are served."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from services.carrier_trainer.core.carrier import MappingNetwork, mapper_to_safetensors
from services.carrier_trainer.state import CarrierRepository
from shared.errors import IntegrityError
from tests.unit.carrierkit import IN_FEATURES, World, carrier_world, pseudo


@pytest.fixture(name="carrier_world")
def _carrier_world(tmp_path: Path) -> Iterator[World]:
    with carrier_world(tmp_path) as world:
        yield world


def _point_at(world: World, user: str, artifact: str, data: bytes) -> None:
    """What an attacker with write access to the bucket could do: store other bytes and
    point the user's record at them (the old signature stays)."""
    store = world.trainer.runtime.store
    ref = store.put_blob(data, "application/octet-stream")
    repository = CarrierRepository(store)
    record = repository.get(user)
    record.artifacts[artifact] = {
        "sha256": ref.sha256, "key": ref.key, "size": ref.size, "media_type": "x"
    }  # fmt: skip
    repository.put(record)


def test_a_substituted_mapper_is_refused_at_load(carrier_world: World) -> None:
    torch.manual_seed(99)
    attacker = mapper_to_safetensors(MappingNetwork(IN_FEATURES, 10, 16).eval())
    _point_at(carrier_world, "bob", "mapper", attacker)
    bob = carrier_world.credentials["bob"]
    with carrier_world.client(carrier_world.tokens.acme) as client:
        with pytest.raises(IntegrityError, match=r"mapper .* invalid signature") as refused:
            client.map("bob", bob, pseudo(), 1)
        assert refused.value.code == grpc.StatusCode.DATA_LOSS
        # nothing else is affected: alice is served, and bob's call was not a crash
        alice = carrier_world.credentials["alice"]
        assert client.map("alice", alice, pseudo(), 1).generation == 1
    assert carrier_world.mapper_service.registry.generation("bob") is None  # never loaded


def test_a_substituted_carrier_image_is_refused_at_download(carrier_world: World) -> None:
    _point_at(carrier_world, "alice", "carrier", b"an image the server never produced")
    alice = carrier_world.credentials["alice"]
    with carrier_world.client(carrier_world.tokens.acme) as client:
        with pytest.raises(IntegrityError, match=r"carrier .* invalid signature"):
            client.download("alice", alice, "carrier")
        assert client.download("bob", carrier_world.credentials["bob"], "carrier") == (
            b"carrier of bob"
        )
