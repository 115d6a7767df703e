"""The GetStatus answer every service gives, from its metrics."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import common_pb2


def package_version() -> str:
    try:
        return version("modelguard")
    except PackageNotFoundError:
        return "dev"


def service_status(metrics: ServiceMetrics) -> common_pb2.ServiceStatus:
    in_flight = metrics.registry.get_sample_value(f"{metrics.prefix}_jobs_in_flight") or 0
    return common_pb2.ServiceStatus(
        service=metrics.service,
        version=package_version(),
        jobs_processed=metrics.job_count("succeeded") + metrics.job_count("skipped"),
        jobs_failed=metrics.job_count("failed"),
        jobs_in_flight=int(in_flight),
    )
