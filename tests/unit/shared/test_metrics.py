"""Local metric families (updated on serving paths, read at scrape time) export exactly what
prometheus_client's Counter and Histogram export."""

from __future__ import annotations

import re
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from modelguard.metrics import LocalCounter, LocalHistogram, ServiceMetrics


def _without_created(text: str) -> str:
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1", text)


def test_local_families_export_what_prometheus_client_exports() -> None:
    expositions = []
    for counter, histogram in ((Counter, Histogram), (LocalCounter, LocalHistogram)):
        registry = CollectorRegistry()
        requests = counter("x_requests_total", "Requests.", ["method", "code"], registry=registry)
        requests.labels("Map", "OK").inc()
        requests.labels("Map", "OK").inc(2.5)
        requests.labels("Map", "NOT_FOUND").inc()
        seconds = histogram(
            "x_seconds", "Latency.", ["method"], registry=registry, buckets=(0.001, 0.01, 1)
        )
        for value in (0.0005, 0.001, 0.005, 0.01, 2.0):  # on the bounds too ("le")
            seconds.labels("Map").observe(value)
        rows = counter("x_rows", "Rows.", registry=registry)
        rows.inc(7)
        single = histogram("x_one_seconds", "One.", registry=registry, buckets=(0.5,))
        single.observe(0.25)
        expositions.append(generate_latest(registry).decode())
    assert _without_created(expositions[1]) == _without_created(expositions[0])
    assert "x_requests_created" in expositions[1]


def test_scrapes_see_exact_counts_under_concurrent_updates() -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry, "result-mapper")
    counter = metrics.local_counter("mapped_rows_total", "Rows.")
    seconds = metrics.local_histogram("map_seconds", "Latency.", (0.001, 0.01))
    ok = metrics.grpc_requests.labels("Map", "OK")

    def work() -> None:
        for i in range(5000):
            counter.inc()
            ok.inc()
            seconds.observe(0.002 if i % 2 else 0.0001)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    value = registry.get_sample_value
    assert value("modelguard_result_mapper_mapped_rows_total") == 40_000
    labels = {"method": "Map", "code": "OK"}
    assert value("modelguard_result_mapper_grpc_requests_total", labels) == 40_000
    assert value("modelguard_result_mapper_map_seconds_count") == 40_000
    assert value("modelguard_result_mapper_map_seconds_bucket", {"le": "0.001"}) == 20_000
    assert value("modelguard_result_mapper_map_seconds_sum") == pytest.approx(20_000 * 0.0021)


def test_local_families_refuse_what_prometheus_client_refuses() -> None:
    registry = CollectorRegistry()
    counter = LocalCounter("y_total", "Y.", ["kind"], registry=registry)
    with pytest.raises(ValueError):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("y_total", "Y again.", registry=registry)
