"""MapperRegistry: per-user mapping, credentials, revocation, input checks, LRU, accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelguard.carrier.carrier import MappingNetwork, mapper_to_safetensors
from modelguard.carrier.mapper_registry import (
    MapperRegistry,
    hash_credential,
    inputs_need_check,
    new_credential,
    parse_mapper,
    verify_credential,
)
from modelguard.errors import InvalidInput, NotFound, PermissionDenied, Unauthenticated, Unavailable
from modelguard.services.client import DeviceClient, MapReply


def make_mapper(
    seed: int, in_features: int = 10, hidden: int = 16, classes: int = 10
) -> MappingNetwork:
    torch.manual_seed(seed)
    return MappingNetwork(in_features, classes, hidden).eval()


def pack(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


@pytest.fixture
def registry() -> MapperRegistry:
    return MapperRegistry(max_loaded_bytes=1 << 20)


def load_user(
    registry: MapperRegistry, user: str, seed: int, generation: int = 0
) -> tuple[str, MappingNetwork]:
    credential = new_credential()
    mapper = make_mapper(seed)
    assert registry.hot_load(
        user, generation, mapper_to_safetensors(mapper), hash_credential(credential)
    )
    return credential, mapper


def test_credentials_are_stored_hashed_and_verified() -> None:
    credential = new_credential()
    stored = hash_credential(credential)
    assert credential not in stored and stored.startswith("hmac-sha256$")
    assert verify_credential(credential, stored)
    assert not verify_credential(credential + "x", stored)
    assert hash_credential(credential) != stored  # salted
    with pytest.raises(InvalidInput, match="credential hash"):
        verify_credential(credential, "plain-text")


def test_verified_credential_cache_never_widens_access(registry: MapperRegistry) -> None:
    credential, _ = load_user(registry, "alice", seed=1)
    other, _ = load_user(registry, "bob", seed=2)
    row = pack(np.zeros((1, 10)))
    for _ in range(3):  # the first call fills the cache, the next ones use it
        registry.map("alice", credential, row)
    with pytest.raises(PermissionDenied):
        registry.map("alice", credential + "x", row)
    with pytest.raises(PermissionDenied):
        registry.map("alice", other, row)
    registry.map("alice", credential, row)  # a refusal does not evict the good credential
    rotated, _ = load_user(registry, "alice", seed=3, generation=1)
    with pytest.raises(PermissionDenied):
        registry.map("alice", credential, row)  # the old generation's cache died with it
    registry.map("alice", rotated, row)


def test_a_cached_credential_is_refused_at_once_after_revocation(
    registry: MapperRegistry,
) -> None:
    """Calls read the user's entry without the registry lock; a credential verified (and
    cached) just before `revoke` is refused by the very next call."""
    credential, _ = load_user(registry, "alice", seed=1)
    row = pack(np.zeros((1, 10)))
    for _ in range(3):
        registry.map("alice", credential, row)
    assert registry.revoke("alice", 0)
    assert registry.generation("alice") is None
    with pytest.raises(NotFound, match="revoked"):
        registry.map("alice", credential, row)
    with pytest.raises(PermissionDenied):  # and the refusal still tells strangers apart
        registry.map("alice", credential + "x", row)
    assert registry.usage("alice").calls == 3 and registry.usage("alice").refused == 2


def test_map_matches_the_torch_mapper(registry: MapperRegistry) -> None:
    credential, mapper = load_user(registry, "alice", seed=1)
    x = np.random.default_rng(0).normal(size=(5, 10)).astype(np.float32)
    result = registry.map("alice", credential, pack(x), rows=5)
    with torch.no_grad():
        expected = torch.softmax(mapper(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(result.probabilities, expected, rtol=1e-5, atol=1e-6)
    assert result.labels.tolist() == expected.argmax(1).tolist()
    assert result.classes == 10 and result.generation == 0
    assert len(result.probabilities_bytes()) == 5 * 10 * 4
    # rows=0 means one row (proto default)
    assert registry.map("alice", credential, pack(x[:1]), rows=0).labels.shape == (1,)


def test_each_user_is_mapped_by_their_own_mapper_only(registry: MapperRegistry) -> None:
    alice_credential, alice_mapper = load_user(registry, "alice", seed=1)
    bob_credential, bob_mapper = load_user(registry, "bob", seed=2)
    x = np.random.default_rng(1).normal(size=(64, 10)).astype(np.float32)
    alice = registry.map("alice", alice_credential, pack(x), rows=64).labels
    bob = registry.map("bob", bob_credential, pack(x), rows=64).labels
    with torch.no_grad():
        assert alice.tolist() == alice_mapper(torch.from_numpy(x)).argmax(1).tolist()
        assert bob.tolist() == bob_mapper(torch.from_numpy(x)).argmax(1).tolist()
    assert alice.tolist() != bob.tolist()
    with pytest.raises(PermissionDenied, match="does not grant access to user 'alice'"):
        registry.map("alice", bob_credential, pack(x[:1]))
    with pytest.raises(Unauthenticated):
        registry.map("alice", "", pack(x[:1]))
    with pytest.raises(NotFound, match="no carrier is registered"):
        registry.map("carol", alice_credential, pack(x[:1]))


def test_revocation_is_immediate_and_final(registry: MapperRegistry) -> None:
    credential, _ = load_user(registry, "alice", seed=1, generation=0)
    x = pack(np.zeros((1, 10)))
    registry.map("alice", credential, x)
    assert registry.revoke("alice", 0)
    with pytest.raises(NotFound, match="revoked"):
        registry.map("alice", credential, x)
    with pytest.raises(PermissionDenied):
        registry.map("alice", "someone-else", x)
    # a replayed CarrierReady for the revoked generation is ignored
    weights = mapper_to_safetensors(make_mapper(1))
    assert not registry.hot_load("alice", 0, weights, hash_credential(credential))
    with pytest.raises(NotFound, match="revoked"):
        registry.map("alice", credential, x)
    # the rotated carrier's mapper and credential work; the old credential stays revoked
    new_credential_ = new_credential()
    assert registry.hot_load("alice", 1, weights, hash_credential(new_credential_))
    assert registry.map("alice", new_credential_, x).generation == 1
    with pytest.raises(NotFound, match="was revoked"):
        registry.map("alice", credential, x)
    # an older generation never replaces a newer one
    assert not registry.hot_load("alice", 0, weights, hash_credential(credential))
    assert registry.generation("alice") == 1


def test_bad_vectors_are_refused_with_actionable_messages(registry: MapperRegistry) -> None:
    credential, _ = load_user(registry, "alice", seed=1)
    with pytest.raises(InvalidInput, match=r"need 40 bytes \(1 × 10 little-endian float32\)"):
        registry.map("alice", credential, pack(np.zeros(9)))
    with pytest.raises(InvalidInput, match="need 80 bytes"):
        registry.map("alice", credential, pack(np.zeros(10)), rows=2)
    nan = np.zeros(10, np.float32)
    nan[3] = np.nan
    with pytest.raises(InvalidInput, match="1 NaN or infinite"):
        registry.map("alice", credential, pack(nan))
    inf = np.zeros(10, np.float32)
    inf[0] = np.inf
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        registry.map("alice", credential, pack(inf))
    with pytest.raises(InvalidInput, match="rows must be between"):
        registry.map("alice", credential, pack(np.zeros(10)), rows=-1)
    with pytest.raises(InvalidInput, match="too large"):  # finite, but the mapper overflows
        registry.map("alice", credential, pack(np.full(10, 3.4e38)))
    assert registry.usage("alice").refused == 6
    assert registry.usage("alice").rows == 0


@pytest.mark.parametrize("hidden", [16, 0])
def test_every_non_finite_input_is_refused_before_anything_is_charged(hidden: int) -> None:
    """Finiteness is judged on the output where that is exact (`inputs_need_check`):
    NaN, +inf and -inf in any position, alone or together, are still all refused, with
    the input's own message, and the user's limits are never charged for them."""
    charged: list[int] = []
    registry = MapperRegistry()
    credential = new_credential()
    torch.manual_seed(3)
    mapper = MappingNetwork(10, 10, hidden).eval()
    registry.hot_load("alice", 0, mapper_to_safetensors(mapper), hash_credential(credential))
    rng = np.random.default_rng(0)
    for value in (np.nan, np.inf, -np.inf):
        for position in range(10):
            x = rng.normal(size=10).astype(np.float32)
            x[position] = value
            with pytest.raises(InvalidInput, match="1 NaN or infinite"):
                registry.map("alice", credential, pack(x), admit=lambda u, r: charged.append(r))
    both = np.zeros(10, np.float32)
    both[[1, 2]] = np.inf, -np.inf
    with pytest.raises(InvalidInput, match="2 NaN or infinite"):
        registry.map("alice", credential, pack(both), admit=lambda u, r: charged.append(r))
    assert charged == []
    registry.map("alice", credential, pack(np.zeros(10)), admit=lambda u, r: charged.append(r))
    assert charged == [1]


def test_overflow_is_refused_quietly_and_numpy_error_state_is_left_alone(
    registry: MapperRegistry,
) -> None:
    """`map` ignores overflow and invalid results while it computes (it judges them
    itself) by setting numpy's error state directly: no RuntimeWarning escapes even
    when warnings are errors, and the caller's error state is the same afterwards."""
    import warnings

    credential, _ = load_user(registry, "alice", seed=1)
    before = np.geterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidInput, match="too large"):
            registry.map("alice", credential, pack(np.full(10, 3.4e38)))
        with pytest.raises(InvalidInput, match="NaN or infinite"):
            registry.map("alice", credential, pack(np.full(10, np.inf)))
        registry.map("alice", credential, pack(np.zeros(10)))
    assert np.geterr() == before
    with np.errstate(over="raise", invalid="raise"):  # a caller's own state is kept too
        with pytest.raises(InvalidInput, match="too large"):
            registry.map("alice", credential, pack(np.full(10, 3.4e38)))
        assert np.geterr()["over"] == "raise"


def test_a_mapper_that_could_hide_an_infinite_input_has_its_inputs_checked_first() -> None:
    # row 0 of w1 all negative: +inf at input 0 sends every hidden unit to -inf, ReLU
    # makes them 0, and the output would be finite without the explicit check
    mapper = make_mapper(5)
    assert isinstance(mapper.fc1, torch.nn.Linear)
    with torch.no_grad():
        mapper.fc1.weight[:, 0] = -torch.rand(16) - 0.1
    loaded = parse_mapper(mapper_to_safetensors(mapper))
    assert (
        loaded.check_inputs and not parse_mapper(mapper_to_safetensors(make_mapper(5))).check_inputs
    )
    assert loaded.w1 is not None and inputs_need_check(loaded.w1)
    registry = MapperRegistry()
    credential = new_credential()
    registry.hot_load("alice", 0, mapper_to_safetensors(mapper), hash_credential(credential))
    x = np.zeros(10, np.float32)
    x[0] = np.inf
    with pytest.raises(InvalidInput, match="1 NaN or infinite"):
        registry.map("alice", credential, pack(x))
    loaded_x = loaded.logits(np.where(np.isinf(x), 0, x)[None])  # the escape is real:
    with np.errstate(invalid="ignore", over="ignore"):
        assert np.isfinite(loaded.logits(x[None])).all() and np.isfinite(loaded_x).all()


def test_malformed_mappers_and_credentials_are_refused(registry: MapperRegistry) -> None:
    with pytest.raises(InvalidInput, match="safetensors"):
        registry.hot_load("alice", 0, b"junk", hash_credential("c"))
    bad = make_mapper(0)
    assert isinstance(bad.fc1, torch.nn.Linear)
    with torch.no_grad():
        bad.fc1.weight[0, 0] = float("nan")
    with pytest.raises(InvalidInput, match="NaN"):
        registry.hot_load("alice", 0, mapper_to_safetensors(bad), hash_credential("c"))
    with pytest.raises(InvalidInput, match="credential hash"):
        registry.hot_load("alice", 0, mapper_to_safetensors(make_mapper(0)), "c")


def test_linear_mapper_is_supported() -> None:
    torch.manual_seed(0)
    linear = MappingNetwork(6, 3, hidden=0).eval()
    parsed = parse_mapper(mapper_to_safetensors(linear))
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(
            parsed.logits(x), linear(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5
        )


def test_query_accounting(registry: MapperRegistry) -> None:
    credential, _ = load_user(registry, "alice", seed=1)
    for rows in (1, 3, 7):
        registry.map("alice", credential, pack(np.zeros((rows, 10))), rows=rows)
    usage = registry.usage("alice")
    assert (usage.calls, usage.rows, usage.refused) == (3, 11, 0)
    assert usage.rows_by_generation == {0: 11}
    assert registry.usage("nobody").calls == 0


def test_lru_is_bounded_in_bytes_and_reloads_evicted_mappers() -> None:
    weights: dict[str, bytes] = {}
    loads: list[str] = []

    def loader(user: str, generation: int) -> bytes:
        loads.append(user)
        return weights[user]

    one = parse_mapper(mapper_to_safetensors(make_mapper(0))).nbytes
    registry = MapperRegistry(max_loaded_bytes=3 * one, loader=loader)
    credentials = {}
    for i in range(5):
        user = f"u{i}"
        credentials[user] = new_credential()
        weights[user] = mapper_to_safetensors(make_mapper(i))
        registry.hot_load(user, 0, weights[user], hash_credential(credentials[user]))
    status = registry.status()
    assert status.loaded_mappers == 3 and status.loaded_bytes <= 3 * one and status.evictions == 2
    x = pack(np.ones((1, 10)))
    expected = parse_mapper(weights["u0"]).logits(np.ones((1, 10), np.float32)).argmax(1)
    assert registry.map("u0", credentials["u0"], x).labels.tolist() == expected.tolist()
    assert loads == ["u0"] and registry.status().reloads == 1
    # without a loader an evicted mapper is a retryable error with advice
    no_loader = MapperRegistry(max_loaded_bytes=one)
    for user in ("a", "b"):
        no_loader.hot_load(user, 0, weights["u0" if user == "a" else "u1"], hash_credential("k"))
    with pytest.raises(Unavailable, match="max_loaded_bytes"):
        no_loader.map("a", "k", x)


def test_shared_mappers_are_loaded_once_and_ten_thousand_users_fit() -> None:
    shared = mapper_to_safetensors(make_mapper(0))
    per_mapper = parse_mapper(shared).nbytes
    registry = MapperRegistry(max_loaded_bytes=256 << 20)
    stored = hash_credential("k")
    for i in range(100):
        registry.hot_load(f"s{i}", 0, shared, stored)
    assert registry.status().loaded_mappers == 1
    registry.revoke("s0", 0)
    assert registry.status().loaded_mappers == 1  # still used by 99 users
    # 10,000 distinct per-user mappers (hidden 16 here) stay within the default bound
    assert 10_000 * per_mapper < 256 << 20
    torch.manual_seed(0)
    template = MappingNetwork(10, 10, 16)
    for i in range(2000):
        with torch.no_grad():
            template.fc2.bias[0] = float(i)
        registry.hot_load(f"u{i}", 0, mapper_to_safetensors(template), stored)
    status = registry.status()
    assert status.loaded_mappers == 2001 and status.evictions == 0


def test_device_client_round_trip_through_registry(registry: MapperRegistry) -> None:
    from modelguard.carrier.carrier import Carrier, Placement
    from modelguard.carrier.public_models import from_module

    torch.manual_seed(0)
    public = from_module(
        "tiny", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), (1, 8, 8)
    )
    credential, mapper = load_user(registry, "alice", seed=3)

    def map_fn(user: str, cred: str, data: bytes, rows: int) -> MapReply:
        result = registry.map(user, cred, data, rows)
        return MapReply(result.labels, result.probabilities, result.generation)

    carrier = Carrier(torch.rand(1, 8, 8), Placement(2, 2, 4, 4))
    device = DeviceClient("alice", credential, carrier, public, map_fn)
    x = torch.rand(6, 1, 4, 4)
    reply = device.classify(x)
    with torch.no_grad():
        expected = mapper(public.module(carrier.embed(x))).argmax(1)
    assert reply.labels.tolist() == expected.tolist()
    assert registry.usage("alice").rows == 6
    chunked = device.classify(x, rows_per_call=4)  # two Map calls, answers concatenated
    assert chunked.labels.tolist() == expected.tolist() and chunked.probabilities.shape == (6, 10)
    assert registry.usage("alice").calls == 3


def test_connect_fetches_the_carrier_and_checks_the_public_model(registry: MapperRegistry) -> None:
    from modelguard.carrier.carrier import Placement, carrier_to_safetensors
    from modelguard.carrier.public_models import from_module
    from modelguard.errors import NotFound as NotFoundError
    from modelguard.services.client import connect

    torch.manual_seed(0)
    public = from_module(
        "tiny", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), (1, 8, 8)
    )
    credential, _ = load_user(registry, "alice", seed=3)
    artifact = carrier_to_safetensors(torch.rand(1, 8, 8), Placement(2, 2, 4, 4), public, 0)

    def map_fn(user: str, cred: str, data: bytes, rows: int) -> MapReply:
        result = registry.map(user, cred, data, rows)
        return MapReply(result.labels, result.probabilities, result.generation)

    device = connect("alice", lambda user: (artifact, credential), map_fn, lambda name: public)
    assert device.classify(torch.rand(3, 1, 4, 4)).labels.shape == (3,)
    other = from_module(
        "tiny", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), (1, 8, 8)
    )
    with pytest.raises(NotFoundError, match="not the one the carrier was trained for"):
        connect("alice", lambda user: (artifact, credential), map_fn, lambda name: other)


def test_device_client_applies_the_carriers_output_key(registry: MapperRegistry) -> None:
    from modelguard.carrier.carrier import Carrier, Placement, random_output_key
    from modelguard.carrier.public_models import from_module

    torch.manual_seed(0)
    public = from_module(
        "tiny", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), (1, 8, 8)
    )
    plain = make_mapper(4)
    key = random_output_key(10, seed=5)
    credential = new_credential()
    keyed = plain.keyed(key)
    registry.hot_load("bob", 0, mapper_to_safetensors(keyed), hash_credential(credential))

    def map_fn(user: str, cred: str, data: bytes, rows: int) -> MapReply:
        result = registry.map(user, cred, data, rows)
        return MapReply(result.labels, result.probabilities, result.generation)

    image, placement = torch.rand(1, 8, 8), Placement(2, 2, 4, 4)
    x = torch.rand(32, 1, 4, 4)
    with torch.no_grad():
        expected = plain(public.module(Carrier(image, placement).embed(x))).argmax(1)
    device = DeviceClient("bob", credential, Carrier(image, placement, key.float()), public, map_fn)
    assert device.classify(x).labels.tolist() == expected.tolist()
    # the same device without the key sends coordinates the served mapper cannot read
    unkeyed = DeviceClient("bob", credential, Carrier(image, placement), public, map_fn)
    assert unkeyed.classify(x).labels.tolist() != expected.tolist()
    wrong = Carrier(image, placement, random_output_key(8, seed=1).float())
    with pytest.raises(InvalidInput, match=r"output key is \(8, 8\)"):
        DeviceClient("bob", credential, wrong, public, map_fn)
