"""Tamper-proof carrier artifacts (issue 8, part 4): a carrier record pointed at other
bytes in the store — valid under content addressing, but never signed by this
deployment — is refused at load, with an error naming the artifact; the service stays
healthy and other users are served. The query profile the extraction detector scores
every Map request against is held to the same rule (issue 15): a swapped, unsigned or
missing profile is refused unless profile scoring is switched off."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from modelguard.bus.memory import MemoryBus
from modelguard.carrier.carrier import MappingNetwork, mapper_to_safetensors
from modelguard.carrier.public_models import from_module
from modelguard.carrier.query_profile import QueryProfile
from modelguard.carrier.records import READY, CarrierRepository
from modelguard.config import CarrierTrainerSettings, PlatformSettings, ResultMapperSettings
from modelguard.convert import ref_to_proto
from modelguard.datasets import Dataset
from modelguard.errors import IntegrityError
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.services.carrier_trainer.service import CarrierService, ref_from_dict
from modelguard.services.launcher import build_service
from modelguard.services.result_mapper.service import ResultMapperService
from modelguard.topics import CARRIER_READY
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


# --- the query profile (issue 15) -----------------------------------------------------------
def _lenient_profile() -> bytes:
    """A profile that accepts anything: what a swap would use to silence the detector."""
    rng = np.random.default_rng(5)
    profile = QueryProfile.fit(rng.normal(size=(200, IN_FEATURES)) * 1e6, rank=4)
    return json.dumps(profile.to_dict()).encode()


def _edit_record(
    world: World, user: str, drop_artifact: str = "", drop_signature: str = ""
) -> None:
    repository = CarrierRepository(world.trainer.runtime.store)
    record = repository.get(user)
    record.artifacts.pop(drop_artifact, None)
    record.signatures.pop(drop_signature, None)
    repository.put(record)


def _refused_at_map(world: World, user: str, match: str) -> None:
    """``user``'s Map is refused naming the profile; alice's carrier is still served."""
    with world.client(world.tokens.acme) as client:
        with pytest.raises(IntegrityError, match=match) as refused:
            client.map(user, world.credentials[user], pseudo(), 1)
        assert refused.value.code == grpc.StatusCode.DATA_LOSS
        assert client.map("alice", world.credentials["alice"], pseudo(), 1).generation == 1
    assert world.mapper_service.registry.generation(user) is None  # its mapper never loaded


def test_a_substituted_profile_is_refused_at_load(carrier_world: World) -> None:
    _point_at(carrier_world, "bob", "profile", _lenient_profile())
    _refused_at_map(carrier_world, "bob", r"profile .* invalid signature")


def test_an_unsigned_profile_is_refused_at_load(carrier_world: World) -> None:
    _edit_record(carrier_world, "bob", drop_signature="profile")
    _refused_at_map(carrier_world, "bob", r"profile .* invalid signature")


def test_a_missing_profile_is_refused_at_load(carrier_world: World) -> None:
    _edit_record(carrier_world, "bob", drop_artifact="profile")
    _refused_at_map(carrier_world, "bob", r"'bob' .* has no query profile")


def test_a_carrier_ready_event_with_a_substituted_profile_loads_nothing(
    carrier_world: World,
) -> None:
    _point_at(carrier_world, "bob", "profile", _lenient_profile())
    record = CarrierRepository(carrier_world.trainer.runtime.store).get("bob")
    ready = jobs_pb2.CarrierReady(
        user_id="bob",
        generation=record.generation,
        credential_hash=record.credential_hash,
        mapper=ref_to_proto(ref_from_dict(record.artifacts["mapper"])),
    )
    service = carrier_world.mapper_service
    with pytest.raises(IntegrityError, match=r"profile .* invalid signature"):
        service.on_event(CARRIER_READY, ready.SerializeToString())
    assert service.registry.generation("bob") is None
    assert ("bob", record.generation) not in service._profiles


def test_without_profile_scoring_a_carrier_without_profile_is_served(tmp_path: Path) -> None:
    with carrier_world(tmp_path, profile_scoring=False) as world:
        _edit_record(world, "bob", drop_artifact="profile")
        _point_at(world, "alice", "profile", _lenient_profile())  # not even read
        with world.client(world.tokens.acme) as client:
            for user in ("alice", "bob"):
                assert client.map(user, world.credentials[user], pseudo(), 1).generation == 1
        assert world.mapper_service._profiles == {}


def _tiny_task(n: int, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset(torch.rand(n, 1, 6, 6, generator=generator), torch.arange(n) % 4)


def test_carrier_trainer_signs_the_profile_that_result_mapper_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real (tiny, few-step) training: the profile carrier-trainer writes is signed,
    and result-mapper loads it from the carrier-ready event."""
    torch.manual_seed(0)
    public = from_module(
        "tiny", nn.Sequential(nn.Flatten(), nn.Linear(144, IN_FEATURES)), (1, 12, 12)
    )
    monkeypatch.setattr("modelguard.carrier.public_models.load_public_model", lambda name: public)
    monkeypatch.setattr(
        "modelguard.services.carrier_trainer.service.load_named",
        lambda name, split="train": _tiny_task(1100 if split == "train" else 200, len(split)),
    )
    bus = MemoryBus()
    platform = PlatformSettings(store_dir=tmp_path / "store")
    trainer_settings = CarrierTrainerSettings(grpc_port=0, metrics_port=-1, worker=False)
    mapper_settings = ResultMapperSettings(grpc_port=0, metrics_port=-1, worker=False)
    trainer = build_service("carrier-trainer", platform, trainer_settings, bus=bus)
    mapper = build_service("result-mapper", platform, mapper_settings, bus=bus)
    try:
        carriers: CarrierService = trainer.components["service"]
        generation, _credential = carriers.request(
            "ann", jobs_pb2.CarrierOptions(steps=5, hidden=8)
        )
        carriers.train(
            jobs_pb2.CarrierRequested(
                user_id="ann", generation=generation, options=jobs_pb2.CarrierOptions(steps=5)
            )
        )
        record = carriers.repository.get("ann")
        assert record.state == READY, record.error
        trainer.runtime.signer.verify(
            str(record.artifacts["profile"]["sha256"]), record.signatures["profile"], "profile"
        )
        service: ResultMapperService = mapper.components["service"]
        (ready,) = bus.records(CARRIER_READY)
        service.on_event(CARRIER_READY, ready.value)
        assert service.registry.generation("ann") == generation
        assert ("ann", generation) in service._profiles
    finally:
        bus.close()


def test_a_device_checks_its_downloaded_carrier_with_the_public_key_only(
    carrier_world: World,
) -> None:
    """GetCarrier hands out the signatures of what a device downloads (issue 19): checked
    with the deployment's public key, the carrier verifies and one changed byte does not."""
    from modelguard.signing import Verifier

    alice = carrier_world.credentials["alice"]
    verifier = Verifier.from_pem(carrier_world.trainer.runtime.signer.public_key_pem.encode())
    with carrier_world.client(carrier_world.tokens.acme) as client:
        info = client.info("alice", alice)
        carrier = client.download("alice", alice, "carrier")
    assert set(info.signatures) == {info.carrier.sha256, info.manifest.sha256}
    signature = info.signatures[info.carrier.sha256]
    digest = hashlib.sha256(carrier).hexdigest()
    assert verifier.check(digest, signature, "carrier").sha256 == info.carrier.sha256
    changed = bytes([carrier[0] ^ 1]) + carrier[1:]
    with pytest.raises(IntegrityError, match="the file changed"):
        verifier.check(hashlib.sha256(changed).hexdigest(), signature, "carrier")
    with pytest.raises(IntegrityError, match="it signs a carrier, not a manifest"):
        verifier.check(digest, signature, "manifest")
