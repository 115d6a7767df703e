"""The compiled single-row kernels agree with the numpy (batch) path they stand in for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelguard.carrier.carrier import MappingNetwork, mapper_to_safetensors
from modelguard.carrier.kernels import map_row, profile_score, warm_up
from modelguard.carrier.mapper_registry import (
    MapperRegistry,
    hash_credential,
    new_credential,
    parse_mapper,
)
from modelguard.carrier.query_profile import QueryProfile
from modelguard.carrier.serving_profile import ServingProfile
from modelguard.errors import InvalidInput


def numpy_probabilities(x: np.ndarray, mapper: MappingNetwork) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(mapper(torch.from_numpy(x)), dim=1).numpy()


@pytest.mark.parametrize(
    ("in_features", "hidden", "classes"), [(10, 16, 10), (214, 256, 10), (7, 0, 3)]
)
def test_a_row_maps_as_the_torch_mapper_does(in_features: int, hidden: int, classes: int) -> None:
    torch.manual_seed(in_features + hidden)
    mapper = MappingNetwork(in_features, classes, hidden).eval()
    loaded = parse_mapper(mapper_to_safetensors(mapper))
    rows = np.random.default_rng(0).normal(size=(50, in_features)).astype(np.float32)
    expected = numpy_probabilities(rows, mapper)
    for row, want in zip(rows, expected, strict=True):
        read_only = np.frombuffer(row.tobytes(), dtype="<f4")  # as the registry decodes it
        for x in (row, read_only):
            probabilities, label = map_row(x, loaded.w1, loaded.b1, loaded.w2, loaded.b2)
            assert probabilities.shape == (1, classes) and probabilities.dtype == np.float32
            np.testing.assert_allclose(probabilities[0], want, rtol=1e-4, atol=1e-6)
            assert label == int(probabilities[0].argmax()) == int(want.argmax())


def test_a_row_and_the_same_row_in_a_batch_get_the_same_answer() -> None:
    """The registry maps one row with the kernel and several with numpy: same result."""
    registry = MapperRegistry()
    credential = new_credential()
    torch.manual_seed(4)
    mapper = MappingNetwork(12, 5, 32).eval()
    registry.hot_load("ann", 0, mapper_to_safetensors(mapper), hash_credential(credential))
    rows = np.random.default_rng(1).normal(size=(40, 12)).astype(np.float32)
    batch = registry.map("ann", credential, rows.tobytes(), rows=40)
    for i, row in enumerate(rows):
        single = registry.map("ann", credential, row.tobytes())
        np.testing.assert_allclose(
            single.probabilities[0], batch.probabilities[i], rtol=1e-4, atol=1e-7
        )
        assert single.labels.tolist() == [batch.labels[i]]
        assert single.labels.dtype == np.int32


def test_non_finite_logits_give_no_label() -> None:
    w1 = np.ones((3, 4), np.float32)
    b1 = np.zeros(4, np.float32)
    w2 = np.ones((4, 2), np.float32)
    b2 = np.array([0.0, 1.0], np.float32)
    for bad in (np.nan, np.inf):
        _, label = map_row(np.array([1.0, bad, 0.0], np.float32), w1, b1, w2, b2)
        assert label == -1
    _, label = map_row(np.full(3, 3e38, np.float32), w1, b1, w2, b2)  # float32 overflow
    assert label == -1
    # -inf sends every hidden unit to -inf; ReLU makes them 0 (finite, as numpy does)
    probabilities, label = map_row(np.array([-np.inf, 0, 0], np.float32), w1, b1, w2, b2)
    assert label == 1 and np.isfinite(probabilities).all()


def test_ties_go_to_the_first_class_as_argmax_does() -> None:
    w2 = np.zeros((3, 4), np.float32)
    probabilities, label = map_row(np.ones(3, np.float32), None, None, w2, np.zeros(4, np.float32))
    assert label == 0
    np.testing.assert_allclose(probabilities, np.full((1, 4), 0.25))


@pytest.mark.parametrize("rank", [4, 20])  # 20 == K: no residual term
def test_profile_score_of_a_row_is_the_batch_formula(rank: int) -> None:
    rng = np.random.default_rng(2)
    legitimate = rng.normal(size=(500, 20)) @ rng.normal(size=(20, 20))
    profile = QueryProfile.fit(legitimate, rank=rank)
    assert (profile.residual_scale == 0) == (rank == 20)
    queries = np.concatenate([legitimate[:20], rng.normal(scale=5, size=(20, 20))]).astype(
        np.float32
    )
    expected = profile.scores(queries)
    serving = ServingProfile.from_dict(profile.to_dict())
    for query, want in zip(queries, expected, strict=True):
        got = profile_score(
            query, profile.mean, profile.components, profile.scales, profile.residual_scale
        )
        assert got == pytest.approx(float(want), rel=1e-3, abs=1e-3)
        assert serving.score_one(query) == pytest.approx(float(want), rel=1e-3, abs=1e-3)
        assert serving.score_one(query.astype(np.float64)) == pytest.approx(got, rel=1e-6)


def test_kernels_refuse_wrong_shapes_instead_of_reading_past_arrays() -> None:
    """numba does not check bounds; the wrappers check the shapes."""
    w1, b1 = np.ones((3, 4), np.float32), np.zeros(4, np.float32)
    w2, b2 = np.ones((4, 2), np.float32), np.zeros(2, np.float32)
    for x in (np.ones(2, np.float32), np.ones(4, np.float32), np.ones((1, 3), np.float32)):
        with pytest.raises(ValueError, match="row of 3 values"):
            map_row(x, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="row of 3 values"):
        components = np.eye(3, 2, dtype=np.float32)
        profile_score(np.ones(5, np.float32), np.zeros(3, np.float32), components, np.ones(2), 1.0)
    profile = QueryProfile.fit(np.random.default_rng(3).normal(size=(50, 6)), rank=2).to_dict()
    profile["scales"] = [1.0, 2.0, 3.0]  # three scales for two components
    with pytest.raises(InvalidInput, match="shapes disagree"):
        ServingProfile.from_dict(profile)


def test_warm_up_compiles_every_kernel() -> None:
    from modelguard.carrier import kernels

    warm_up()
    for kernel in (kernels._map_hidden, kernels._map_linear, kernels._profile_score):
        # writable and read-only rows: both signatures the Map path uses
        assert len(kernel.signatures) >= 2
