"""Carrier serving with authentication on, through real in-process carrier-trainer and
result-mapper servers: a user's credential reaches only that user's carrier and mapper,
enrolment and credential-less rotation or revocation are admin operations, and every call
needs a bearer token besides."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelguard.carrier.records import CarrierRepository
from modelguard.errors import ModelGuardError, NotFound, PermissionDenied, Unauthenticated
from tests.unit.carrierkit import World, carrier_world, pseudo


@pytest.fixture(name="carrier_world")
def _carrier_world(tmp_path: Path) -> Iterator[World]:
    with carrier_world(tmp_path) as world:
        yield world


def _eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        # pytest.raises' "DID NOT RAISE" is pytest.fail.Exception, not an AssertionError: a
        # revocation still on its way must be retried too, not fail the first look
        except (AssertionError, pytest.fail.Exception):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_credential_reaches_only_its_own_users_carrier_and_mapper(carrier_world: World) -> None:
    alice = carrier_world.credentials["alice"]
    with carrier_world.client(carrier_world.tokens.acme) as client:
        assert client.map("alice", alice, pseudo(), 1).generation == 1
        assert client.info("alice", alice).user_id == "alice"
        assert client.download("alice", alice, "carrier") == b"carrier of alice"
        # alice's credential, bob's user id: refused everywhere
        refusals: list[Callable[[], Any]] = [
            lambda: client.map("bob", alice, pseudo(), 1),
            lambda: client.request("bob", alice),  # rotate
            lambda: client.revoke("bob", alice),
            lambda: client.info("bob", alice),
            lambda: client.download("bob", alice, "carrier"),
            lambda: client.download("bob", alice, "manifest"),
        ]
        for refusal in refusals:
            with pytest.raises(PermissionDenied, match="bob"):
                refusal()
        # bob's mapper still answers bob, and was never rotated by the attempts above
        reply = client.map("bob", carrier_world.credentials["bob"], pseudo(), 1)
        assert reply.generation == 1


def test_enrolling_a_new_user_needs_an_admin_token(carrier_world: World) -> None:
    with (
        carrier_world.client(carrier_world.tokens.acme) as tenant,
        pytest.raises(PermissionDenied, match="admin token"),
    ):
        tenant.request("carol")
    with carrier_world.client(carrier_world.tokens.admin) as admin:
        generation, credential = admin.request("carol")
    assert generation == 1 and credential
    record = CarrierRepository(carrier_world.trainer.runtime.store).get("carol")
    assert credential not in record.to_json().decode()  # stored hashed


def test_rotating_or_revoking_without_the_users_credential_needs_an_admin_token(
    carrier_world: World,
) -> None:
    bob = carrier_world.credentials["bob"]
    with carrier_world.client(carrier_world.tokens.acme) as tenant:
        with pytest.raises(Unauthenticated, match="admin token"):
            tenant.request("bob")
        with pytest.raises(Unauthenticated, match="admin token"):
            tenant.revoke("bob")
        assert tenant.map("bob", bob, pseudo(), 1).generation == 1
    with carrier_world.client(carrier_world.tokens.admin) as admin:
        info = admin.revoke("bob", reason="device reported stolen")
        assert "device reported stolen (by admin ops)" in info.error.message
        assert admin.info("bob", "").generation == 1  # an admin reads the state...
        with pytest.raises(Unauthenticated):
            admin.download("bob", "", "carrier")  # ...never the carrier itself
        generation, _ = admin.request("alice")  # rotation without alice's credential
        assert generation == 2
    with carrier_world.client(carrier_world.tokens.acme) as tenant:

        def revoked() -> None:
            with pytest.raises(NotFound, match="revoked"):
                tenant.map("bob", carrier_world.credentials["bob"], pseudo(), 1)
            with pytest.raises(NotFound):  # generation 2 is not trained (no worker here)
                tenant.map("alice", carrier_world.credentials["alice"], pseudo(), 1)

        _eventually(revoked)  # on every replica, through carrier.revoked


def test_a_user_revokes_its_own_carrier_with_its_credential(carrier_world: World) -> None:
    alice = carrier_world.credentials["alice"]
    with carrier_world.client(carrier_world.tokens.globex) as client:
        assert client.map("alice", alice, pseudo(), 1).generation == 1  # loaded
        client.revoke("alice", alice, reason="lost phone")

        def refused() -> None:
            with pytest.raises(NotFound, match="revoked"):
                client.map("alice", alice, pseudo(), 1)

        _eventually(refused)
        # the revoked generation's credential still proves the user, to rotate
        generation, fresh = client.request("alice", alice)
        assert generation == 2 and fresh != alice


def test_every_carrier_call_needs_a_bearer_token(carrier_world: World) -> None:
    alice = carrier_world.credentials["alice"]
    with carrier_world.client("") as anonymous:
        for call in (
            lambda: anonymous.map("alice", alice, pseudo(), 1),
            lambda: anonymous.info("alice", alice),
            lambda: anonymous.download("alice", alice, "carrier"),
            lambda: anonymous.request("dave"),
            lambda: anonymous.revoke("alice", alice),
        ):
            with pytest.raises(Unauthenticated, match="no token"):
                call()
    with carrier_world.client("mg1.0000.forged") as forged, pytest.raises(ModelGuardError):
        forged.map("alice", alice, pseudo(), 1)
