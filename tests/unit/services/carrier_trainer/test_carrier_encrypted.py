"""Carrier serving with artifacts encrypted at rest: the store holds ciphertext only, and
what a device downloads (and what result-mapper loads) is the plaintext that was signed."""

from __future__ import annotations

from pathlib import Path

from modelguard.carrier.records import CarrierRepository
from modelguard.store.base import digest
from tests.unit.carrierkit import carrier_world, pseudo
from tests.unit.shared.store.keyrings import new_key, write_keyring


def test_devices_download_the_signed_plaintext_of_an_encrypted_carrier(tmp_path: Path) -> None:
    keyring = write_keyring(tmp_path / "keyring.json", {"platform": ("p1", {"p1": new_key()})})
    with carrier_world(tmp_path, keyring_file=keyring) as world:
        alice = world.credentials["alice"]
        record = CarrierRepository(world.trainer.runtime.store).find("alice")
        assert record is not None
        carrier = record.artifacts["carrier"]
        at_rest = (tmp_path / "store" / carrier["key"]).read_bytes()
        assert b"carrier of alice" not in at_rest
        with world.client(world.tokens.acme) as client:
            downloaded = client.download("alice", alice, "carrier")
            assert downloaded == b"carrier of alice"
            assert digest(downloaded) == carrier["sha256"]
            world.trainer.runtime.signer.verify(
                digest(downloaded), record.signatures["carrier"], "carrier"
            )
            assert client.map("alice", alice, pseudo(), 1).generation == 1  # mapper decrypted
