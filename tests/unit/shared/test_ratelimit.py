"""result-mapper's per-user resource limits: request rate (token bucket) and query budget
(rows per period), refused with RESOURCE_EXHAUSTED, a clear message and a retry hint;
separate from the extraction detector, and the service stays healthy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelguard.errors import InvalidInput, PermissionDenied, ResourceExhausted
from modelguard.proto.modelguard.v1 import result_mapper_pb2, result_mapper_pb2_grpc
from modelguard.ratelimit import LimitsConfig, UserLimits
from tests.unit.carrierkit import World, carrier_world, pseudo


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_is_a_token_bucket_with_a_retry_hint() -> None:
    clock = Clock()
    limits = UserLimits(LimitsConfig(rate_per_second=2, burst=3, budget_rows=0), clock)
    for _ in range(3):
        limits.admit("alice", 1)
    with pytest.raises(ResourceExhausted, match=r"2 Map calls per second.*retry in 0.50 s") as err:
        limits.admit("alice", 1)
    assert err.value.retry_after == pytest.approx(0.5)
    limits.admit("bob", 1)  # per user: bob is not slowed down by alice
    clock.now += 0.5
    limits.admit("alice", 1)  # one token back after 1/rate seconds
    with pytest.raises(ResourceExhausted):
        limits.admit("alice", 1)
    clock.now += 100
    for _ in range(3):  # the bucket refills up to the burst, no more
        limits.admit("alice", 1)
    with pytest.raises(ResourceExhausted):
        limits.admit("alice", 1)


def test_the_query_budget_counts_rows_per_period_and_renews() -> None:
    clock = Clock()
    limits = UserLimits(
        LimitsConfig(rate_per_second=0, budget_rows=100, budget_period_s=3600), clock
    )
    limits.admit("alice", 60)
    limits.admit("alice", 40)
    clock.now += 600
    with pytest.raises(ResourceExhausted, match=r"100 of 100 rows .* renews in 3000 s") as err:
        limits.admit("alice", 1)
    assert err.value.retry_after == pytest.approx(3000)
    assert limits.usage("alice")[1] == 100  # a refused call charges nothing
    clock.now += 3000
    limits.admit("alice", 100)


def test_limits_are_validated_and_can_be_switched_off() -> None:
    off = UserLimits(LimitsConfig(rate_per_second=0, budget_rows=0))
    assert not off.enabled
    for _ in range(10_000):
        off.admit("alice", 4096)
    with pytest.raises(InvalidInput):
        LimitsConfig(rate_per_second=-1)
    with pytest.raises(InvalidInput):
        LimitsConfig(budget_period_s=0)


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    with carrier_world(
        tmp_path,
        rate_per_second=0.001,  # no refill within the test
        rate_burst=3,
        query_budget_rows=1000,
    ) as world:
        yield world


def test_a_user_over_the_rate_gets_resource_exhausted_with_retry_after(world: World) -> None:
    alice = world.credentials["alice"]
    with world.client(world.tokens.acme) as client:
        # a stranger with a wrong credential cannot spend alice's rate
        for _ in range(5):
            with pytest.raises(PermissionDenied):
                client.map("alice", "wrong-credential", pseudo(), 1)
        for _ in range(3):
            client.map("alice", alice, pseudo(), 1)
        with pytest.raises(ResourceExhausted, match="rate limit: user 'alice'") as err:
            client.map("alice", alice, pseudo(), 1)
        assert err.value.retry_after is not None and err.value.retry_after > 100
        assert client.map("bob", world.credentials["bob"], pseudo(), 1).generation == 1
    refusals = world.mapper.metrics.registry.get_sample_value(
        "modelguard_result_mapper_refusals_total", {"code": "RESOURCE_EXHAUSTED"}
    )
    assert refusals == 1.0
    with grpc.insecure_channel(world.mapper.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_user_whose_budget_is_spent_gets_resource_exhausted(world: World) -> None:
    bob = world.credentials["bob"]
    with world.client(world.tokens.acme) as client:
        client.map("bob", bob, pseudo(600), 600)
        with pytest.raises(InvalidInput):  # a malformed call costs nothing
            client.map("bob", bob, pseudo(1), 500)
        with pytest.raises(ResourceExhausted, match=r"mapped 600 of 1000 rows"):
            client.map("bob", bob, pseudo(500), 500)
        client.map("bob", bob, pseudo(400), 400)  # what is left of the budget
    # the extraction detector did not act: the carrier still works for the next period
    assert world.mapper_service.registry.generation("bob") == 1


def test_map_stream_ends_with_the_refusal_in_order(world: World) -> None:
    alice = world.credentials["alice"]
    with grpc.insecure_channel(world.mapper.address) as channel:
        stub = result_mapper_pb2_grpc.ResultMapperStub(channel)
        request = result_mapper_pb2.MapRequest(
            user_id="alice", credential=alice, pseudo_output=pseudo(), rows=1
        )
        replies = stub.MapStream(
            iter([request] * 5), metadata=(("authorization", f"Bearer {world.tokens.acme}"),)
        )
        answered = 0
        with pytest.raises(grpc.RpcError) as err:
            for _ in replies:
                answered += 1
        assert answered == 3
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hints = [m.value for m in err.value.trailing_metadata() if m.key == "retry-after"]
        assert hints and float(hints[0]) > 100
