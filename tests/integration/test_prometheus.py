"""The six services, each in its own process on real Kafka (Tansu) and S3 (SeaweedFS), and
a real Prometheus (Debian package) scraping them with the project's rules, as `make up`
runs it. Everything is asserted through Prometheus's HTTP API: every service is `up`, the
rules load and evaluate, gRPC calls move each service's request counter, and a malformed
Kafka record moves the workers' bus counters and fires the dead-letter alert."""

from __future__ import annotations

import importlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest

from modelguard.bus.kafka import KafkaBus
from modelguard.config import SERVICES
from modelguard.proto.modelguard.v1 import common_pb2
from modelguard.services.stack import PrometheusProcess, ServiceProcess, platform_env
from modelguard.topics import AUDIT_REQUESTED
from tests.requirements import require_binary

pytestmark = pytest.mark.integration

T = TypeVar("T")
#: The workers that consume audit requests, hence dead-letter a malformed one.
AUDIT_REQUEST_CONSUMERS = ("leak-detector", "trigger-reversal")


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``check`` until it returns something truthy (readiness by polling)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)  # the poll interval, not a wait for readiness
    raise TimeoutError(f"{what} not seen within {timeout} s (last: {last!r})")


@pytest.fixture(scope="module")
def services(
    tansu: Any, seaweed: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServiceProcess]]:
    env = platform_env(
        tansu.bootstrap,
        seaweed.endpoint,
        seaweed.access_key,
        seaweed.secret_key,
        "prometheus-" + uuid.uuid4().hex[:8],
    )
    logs = tmp_path_factory.mktemp("prometheus-service-logs")
    processes = {name: ServiceProcess(name, env, logs) for name in SERVICES}
    try:
        for process in processes.values():
            process.start(timeout=180)
        yield processes
    finally:
        for process in processes.values():
            process.stop()


@pytest.fixture(scope="module")
def prometheus(
    services: dict[str, ServiceProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusProcess]:
    require_binary(
        "prometheus", "Prometheus", "scripts/setup.sh installs it (Debian package prometheus)"
    )
    server = PrometheusProcess(
        tmp_path_factory.mktemp("prometheus"),
        list(services.values()),
        scrape_interval="1s",
        evaluation_interval="1s",
    )
    try:
        server.start(timeout=60)
        yield server
    finally:
        server.stop()


def every_service(metric: str, **labels: str) -> str:
    """A selector of ``modelguard_<service>_<metric>`` for all services at once."""
    matchers = [f'__name__=~"modelguard_.+_{metric}"'] + [f'{k}="{v}"' for k, v in labels.items()]
    return "{" + ", ".join(matchers) + "}"


def by_job(prometheus: PrometheusProcess, expr: str) -> dict[str, float]:
    return {s["metric"].get("job", ""): float(s["value"][1]) for s in prometheus.query(expr)}


def grpc_service_name(service: str) -> str:
    """The full proto name of a service's API, from its generated module."""
    module = importlib.import_module(
        f"modelguard.proto.modelguard.v1.{service.replace('-', '_')}_pb2"
    )
    (descriptor,) = module.DESCRIPTOR.services_by_name.values()
    return str(descriptor.full_name)


def test_every_service_is_up(prometheus: PrometheusProcess) -> None:
    def all_up() -> dict[str, float] | None:
        up = by_job(prometheus, "up")
        return up if up == dict.fromkeys(SERVICES, 1.0) else None

    wait_for(all_up, 60, "all six services up")


def test_rules_load_and_evaluate(prometheus: PrometheusProcess) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else None

    rules = wait_for(evaluated, 60, "every rule evaluated with health ok")
    names = {rule["name"] for rule in rules}
    assert {
        "modelguard:bus_consumed:rate5m",
        "ModelGuardWorkerNotConsuming",
        "ModelGuardDeadLetters",
        "ModelGuardResultMapperLatencyHigh",
    } <= names
    assert not [
        a
        for a in prometheus.api("alerts")["alerts"]
        if a["labels"]["alertname"] == "ModelGuardServiceDown"
    ]


def call_get_status(services: dict[str, ServiceProcess], calls: int) -> None:
    for name, process in services.items():
        with grpc.insecure_channel(process.address) as channel:
            get_status = channel.unary_unary(
                f"/{grpc_service_name(name)}/GetStatus",
                request_serializer=common_pb2.StatusRequest.SerializeToString,
                response_deserializer=common_pb2.ServiceStatus.FromString,
            )
            for _ in range(calls):
                get_status(common_pb2.StatusRequest(), timeout=10)


def test_grpc_calls_move_each_services_request_counter(
    services: dict[str, ServiceProcess], prometheus: PrometheusProcess
) -> None:
    counted = f"sum by (job) ({every_service('grpc_requests_total', method='GetStatus')})"

    def counted_at_least(expected: dict[str, float]) -> Callable[[], dict[str, float] | None]:
        def check() -> dict[str, float] | None:
            now = by_job(prometheus, counted)
            return now if all(now.get(n, 0) >= expected[n] for n in SERVICES) else None

        return check

    before = by_job(prometheus, counted)
    # twice: a counter's series appears with its first request, and a rate needs the
    # series to grow after Prometheus first saw it
    call_get_status(services, 1)
    first = wait_for(
        counted_at_least({n: before.get(n, 0) + 1 for n in SERVICES}),
        60,
        "the first GetStatus counted for every service",
    )
    call_get_status(services, 3)
    wait_for(
        counted_at_least({n: first[n] + 3 for n in SERVICES}),
        60,
        "three more GetStatus counted for every service",
    )
    # and the recording rule sees the rate, per service
    wait_for(
        lambda: (
            set(SERVICES)
            <= set(by_job(prometheus, 'modelguard:grpc_requests:rate5m{method="GetStatus"} > 0'))
        ),
        60,
        "modelguard:grpc_requests:rate5m for every service",
    )


def test_a_dead_lettered_record_moves_bus_metrics_and_fires_the_alert(
    tansu: Any, services: dict[str, ServiceProcess], prometheus: PrometheusProcess
) -> None:
    dead = every_service("bus_dead_lettered_total", topic=AUDIT_REQUESTED)
    before = by_job(prometheus, f"sum by (job) ({dead})")
    bus = KafkaBus(tansu.bootstrap, client_id="test-prometheus")
    try:
        bus.publish(AUDIT_REQUESTED, b"\xff\x00 not a protobuf", key=b"prometheus-test")
    finally:
        bus.close()

    def dead_lettered() -> dict[str, float] | None:
        after = by_job(prometheus, f"sum by (job) ({dead})")
        done = all(after.get(n, 0) >= before.get(n, 0) + 1 for n in AUDIT_REQUEST_CONSUMERS)
        return after if done else None

    wait_for(dead_lettered, 180, "the malformed record dead-lettered by both workers")
    consumed = by_job(
        prometheus, f"sum by (job) ({every_service('bus_consumed_total', topic=AUDIT_REQUESTED)})"
    )
    assert all(consumed.get(n, 0) >= 1 for n in AUDIT_REQUEST_CONSUMERS), consumed

    def firing() -> set[str] | None:
        alerts = prometheus.api("alerts")["alerts"]
        jobs = {
            a["labels"].get("job", "")
            for a in alerts
            if a["labels"]["alertname"] == "ModelGuardDeadLetters" and a["state"] == "firing"
        }
        return jobs if jobs >= set(AUDIT_REQUEST_CONSUMERS) else None

    wait_for(firing, 60, "ModelGuardDeadLetters firing for both workers")
