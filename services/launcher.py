"""Build and run services: one per process (`modelguard serve NAME`, Kubernetes) or all
six in one process (embedded mode: one in-memory bus, one local store)."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from modelguard import logs, tracing
from modelguard.bus.base import JobBus
from modelguard.config import (
    SERVICE_SETTINGS,
    SERVICES,
    PlatformSettings,
    ServiceSettings,
    TracingSettings,
)
from modelguard.grpc_server import wait_for_termination
from modelguard.metrics import ServiceMetrics
from modelguard.runtime import Runtime, ServiceApp, build_runtime
from modelguard.store.instrumented import InstrumentedStore
from modelguard.topics import ALL_TOPICS

log = logging.getLogger(__name__)

Builder = Callable[[Any, Runtime, ServiceMetrics], ServiceApp]


def builder(name: str) -> Builder:
    module = importlib.import_module(f"modelguard.services.{name.replace('-', '_')}.main")
    return module.build  # type: ignore[no-any-return]


def configure_logging(platform: PlatformSettings, service: str) -> None:
    """The process's logging from the platform settings (level, text or JSON lines)."""
    logs.configure_logging(platform.log_level, platform.log_format, service)


def configure_tracing(service: str) -> None:
    """The process's tracing from the standard ``OTEL_*`` variables (off unless
    ``OTEL_TRACES_EXPORTER`` names an exporter); before any server is built, since the
    gRPC handlers are wrapped for tracing when they are registered."""
    if tracing.configure_tracing(TracingSettings(), service):
        log.info("tracing on (%s)", service)


def build_service(
    name: str,
    platform: PlatformSettings,
    settings: ServiceSettings | None = None,
    *,
    bus: JobBus | None = None,
    registry: CollectorRegistry | None = None,
    on_stuck: Callable[[str], None] | None = None,
) -> ServiceApp:
    registry = registry or CollectorRegistry()
    settings = settings or SERVICE_SETTINGS[name]()
    runtime = build_runtime(platform, client_id=name, bus=bus, registry=registry, on_stuck=on_stuck)
    metrics = ServiceMetrics(registry, name)
    runtime.store = InstrumentedStore(runtime.store, metrics.store_errors)
    return builder(name)(settings, runtime, metrics)


def run_service(name: str) -> None:
    """Entry point of one service process: runs until SIGTERM, then drains."""
    platform = PlatformSettings()
    configure_logging(platform, name)
    configure_tracing(name)
    app = build_service(name, platform, on_stuck=exit_stuck_process)
    app.runtime.bus.ensure_topics(list(ALL_TOPICS), partitions=platform.kafka_partitions)
    app.start()
    log.info("%s ready: gRPC %s", name, app.address)
    wait_for_termination(app.stop)
    app.runtime.bus.close()


#: Exit status of a service that found one of its Kafka consumers stuck (EX_SOFTWARE).
EXIT_STUCK_CONSUMER = 70


def exit_stuck_process(group: str) -> None:
    """Crash-only recovery of a worker whose consumer hangs inside kafka-python: exit at
    once (no drain: the consumer cannot commit), and let the supervisor (Kubernetes,
    `make up`, the test harness) start a fresh process; the record in hand is redelivered."""
    log.critical("exiting: the consumer of group %s is stuck; a restart recovers it", group)
    logging.shutdown()
    os._exit(EXIT_STUCK_CONSUMER)


@dataclass
class Stack:
    """Several services in one process sharing a bus (embedded mode and tests)."""

    apps: dict[str, ServiceApp] = field(default_factory=dict)
    bus: JobBus | None = None

    def __getitem__(self, name: str) -> ServiceApp:
        return self.apps[name]

    @property
    def orchestrator_address(self) -> str:
        return self.apps["pruning-orchestrator"].address

    def stop(self) -> None:
        for app in reversed(list(self.apps.values())):
            app.stop(grace=1.0)
        if self.bus is not None:
            self.bus.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_stack(
    platform: PlatformSettings,
    names: tuple[str, ...] = SERVICES,
    *,
    bus: JobBus | None = None,
    ephemeral_ports: bool = True,
    workers: bool = True,
) -> Stack:
    """Start ``names`` in this process. With the memory bus all share one instance, and
    unfinished audits from an earlier run are requested again."""
    if bus is None and platform.bus == "memory":
        from modelguard.bus.memory import MemoryBus

        bus = MemoryBus()
    stack = Stack(bus=bus)
    try:
        for name in names:
            settings = SERVICE_SETTINGS[name]()
            if ephemeral_ports:
                settings = settings.model_copy(update={"grpc_port": 0, "metrics_port": 0})
            if not workers:
                settings = settings.model_copy(update={"worker": False})
            app = build_service(name, platform, settings, bus=bus)
            if bus is None:
                app.runtime.bus.ensure_topics(list(ALL_TOPICS), platform.kafka_partitions)
            app.start()
            stack.apps[name] = app
    except BaseException:
        stack.stop()
        raise
    if workers and platform.bus == "memory" and "pruning-orchestrator" in stack.apps:
        resumed = stack["pruning-orchestrator"].components["orchestrator"].resume_unfinished()
        if resumed:
            log.info("resumed %d unfinished audit(s)", resumed)
    return stack
