"""Test helpers for carrier serving: carrier-trainer and result-mapper servers in-process
with authentication on (tokens of tests.unit.authkit), alice and bob each with a ready
carrier (no training)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelguard.bus.memory import MemoryBus
from modelguard.carrier.carrier import MappingNetwork, mapper_to_safetensors
from modelguard.carrier.mapper_registry import hash_credential, new_credential
from modelguard.carrier.query_profile import QueryProfile
from modelguard.carrier.records import READY, CarrierRecord, CarrierRepository
from modelguard.config import CarrierTrainerSettings, PlatformSettings, ResultMapperSettings
from modelguard.runtime import ServiceApp
from modelguard.services.carrier_client import CarrierClient
from modelguard.services.launcher import build_service
from modelguard.services.result_mapper.service import ResultMapperService
from tests.unit.authkit import Tokens, write_tokens

IN_FEATURES = 10


@dataclass
class World:
    trainer: ServiceApp
    mapper: ServiceApp
    tokens: Tokens
    credentials: dict[str, str]  # user -> credential

    def client(self, token: str) -> CarrierClient:
        return CarrierClient(self.trainer.address, self.mapper.address, timeout=10, token=token)

    @property
    def mapper_service(self) -> ResultMapperService:
        return self.mapper.components["service"]  # type: ignore[no-any-return]


def ready_carrier(app: ServiceApp, user: str, seed: int) -> str:
    """A carrier record as carrier-trainer leaves it after training, without training."""
    runtime = app.runtime
    torch.manual_seed(seed)
    mapper = mapper_to_safetensors(MappingNetwork(IN_FEATURES, 10, 16).eval())
    # fitted on what `pseudo` sends: legitimate traffic, as far as the detector can tell
    legitimate = np.random.default_rng(seed).random((200, IN_FEATURES))
    profile = json.dumps(QueryProfile.fit(legitimate, rank=4).to_dict()).encode()
    refs = {
        "mapper": runtime.store.put_blob(mapper, "application/vnd.modelguard.mapper"),
        "profile": runtime.store.put_blob(profile, "application/json"),
        "carrier": runtime.store.put_blob(f"carrier of {user}".encode()),
        "manifest": runtime.store.put_blob(b"{}", "application/json"),
    }
    credential = new_credential()
    CarrierRepository(runtime.store).put(
        CarrierRecord(
            user_id=user,
            generation=1,
            credential_hash=hash_credential(credential),
            state=READY,
            artifacts={
                name: {"sha256": r.sha256, "key": r.key, "size": r.size, "media_type": "x"}
                for name, r in refs.items()
            },
            signatures={name: runtime.signer.sign(r.sha256, name) for name, r in refs.items()},
        )
    )
    return credential


@contextmanager
def carrier_world(
    tmp_path: Path, *, keyring_file: Path | None = None, **mapper_settings: Any
) -> Iterator[World]:
    """``keyring_file`` given: the artifact store encrypts everything with it."""
    tokens = write_tokens(tmp_path)
    bus = MemoryBus()
    platform = PlatformSettings(
        store_dir=tmp_path / "store",
        auth_tokens_file=str(tokens.file),
        encrypt_artifacts=keyring_file is not None,
        encryption_keyring_file=str(keyring_file or ""),
    )
    # no carrier-trainer worker: nothing is trained; result-mapper consumes carrier events
    trainer = build_service(
        "carrier-trainer",
        platform,
        CarrierTrainerSettings(grpc_port=0, metrics_port=-1, worker=False),
        bus=bus,
    )
    mapper = build_service(
        "result-mapper",
        platform,
        ResultMapperSettings(
            **{"grpc_port": 0, "metrics_port": -1, "auto_revoke": False, **mapper_settings}
        ),
        bus=bus,
    )
    credentials = {user: ready_carrier(trainer, user, i) for i, user in enumerate(("alice", "bob"))}
    trainer.start()
    mapper.start()
    try:
        yield World(trainer, mapper, tokens, credentials)
    finally:
        mapper.stop(0.5)
        trainer.stop(0.5)
        bus.close()


def pseudo(rows: int = 1) -> bytes:
    return np.random.default_rng(0).random((rows, IN_FEATURES), dtype=np.float32).tobytes()
