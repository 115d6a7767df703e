"""result-mapper's query profiles: loaded with the carrier, shared by users of one pooled
carrier, scored one row at a time exactly as `QueryProfile` scores them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modelguard.carrier.carrier import MappingNetwork, mapper_to_safetensors
from modelguard.carrier.mapper_registry import hash_credential, new_credential
from modelguard.carrier.query_profile import QueryProfile
from modelguard.carrier.records import READY, CarrierRecord, CarrierRepository
from modelguard.carrier.serving_profile import ServingProfile
from modelguard.config import PlatformSettings, ResultMapperSettings
from modelguard.services.carrier_trainer.service import ref_dict
from modelguard.services.launcher import build_service
from modelguard.services.result_mapper.service import ResultMapperService


def test_single_rows_score_as_the_batch_formula() -> None:
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(400, 40)).astype(np.float32)
    reference = QueryProfile.fit(samples, rank=8)
    serving = ServingProfile.from_dict(reference.to_dict())
    rows = rng.normal(size=(50, 40)).astype(np.float32) * 3
    single = np.array([serving.scores(row[None])[0] for row in rows])
    np.testing.assert_allclose(single, reference.scores(rows), rtol=1e-4)
    np.testing.assert_array_equal(serving.scores(rows), reference.scores(rows))  # batches
    one = np.array([serving.score_one(row) for row in rows])
    np.testing.assert_allclose(one, reference.scores(rows), rtol=1e-4)
    base = np.array([reference.score_one(row) for row in rows])  # the generic one-row path
    np.testing.assert_allclose(base, reference.scores(rows), rtol=1e-5)


def test_the_detector_counts_single_rows_as_it_counts_batches() -> None:
    """The detector's one-row path (plain floats) keeps the same per-user sums as the
    batch path: outlying rows exactly, the score sum to float32 precision."""
    from modelguard.carrier.extraction import DetectorConfig, ExtractionDetector

    rng = np.random.default_rng(1)
    reference = QueryProfile.fit(rng.normal(size=(400, 40)).astype(np.float32), rank=8)
    serving = ServingProfile.from_dict(reference.to_dict())
    rows = (rng.normal(size=(60, 40)) * np.linspace(0.5, 3, 60)[:, None]).astype(np.float32)
    config = DetectorConfig(max_rows_per_window=10_000, max_rows_per_generation=0)
    single = ExtractionDetector(config, profiles=lambda user, generation: serving)
    batch = ExtractionDetector(config, profiles=lambda user, generation: reference)
    labels = np.zeros(1, np.int32)
    for row in rows:
        single.observe("ann", 1, row[None], labels, 0.0)
    batch.observe("ann", 1, rows, np.zeros(60, np.int32), 0.0)
    one, many = single._state["ann"], batch._state["ann"]
    assert one.rows == many.rows == 60 and 0 < one.outlying == many.outlying < 60
    assert one.score_sum == pytest.approx(many.score_sum, rel=1e-5)


def test_users_of_one_pooled_carrier_share_its_profile(tmp_path: Path) -> None:
    platform = PlatformSettings(store_dir=tmp_path / "store")
    app = build_service(
        "result-mapper", platform, ResultMapperSettings(grpc_port=0, metrics_port=-1)
    )
    service: ResultMapperService = app.components["service"]
    store, signer = app.runtime.store, app.runtime.signer
    torch.manual_seed(0)
    mapper = store.put_blob(mapper_to_safetensors(MappingNetwork(10, 10, 16)))
    rng = np.random.default_rng(0)
    profiles = [
        store.put_blob(json.dumps(QueryProfile.fit(rng.normal(size=(100, 10))).to_dict()).encode())
        for _ in range(2)
    ]
    for user, profile in (("ann", profiles[0]), ("ben", profiles[0]), ("cat", profiles[1])):
        CarrierRepository(store).put(
            CarrierRecord(
                user_id=user,
                generation=1,
                credential_hash=hash_credential(new_credential()),
                state=READY,
                artifacts={"mapper": ref_dict(mapper), "profile": ref_dict(profile)},
                signatures={
                    "mapper": signer.sign(mapper.sha256, "mapper"),
                    "profile": signer.sign(profile.sha256, "profile"),
                },
            )
        )
        service._warm(user)
    loaded = service._profiles
    assert isinstance(loaded[("ann", 1)], ServingProfile)
    assert loaded[("ann", 1)] is loaded[("ben", 1)]
    assert loaded[("cat", 1)] is not loaded[("ann", 1)]
    app.runtime.bus.close()
