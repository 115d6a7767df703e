"""Prometheus rules and the Grafana dashboard: promtool checks and unit-tests the rules,
the PrometheusRule custom resource carries exactly the rule file's groups, and every
metric the rules and the dashboard read is one the services really export.

Regenerate deploy/k8s/monitoring/prometheusrule.yaml after editing the rule file with
``python -m tests.unit.deploy.test_prometheus_rules --write``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.deploy import (
    DASHBOARD,
    FIXTURES,
    MONITORING,
    RULE_TESTS,
    RULES,
    built_services,
    find_tool,
)

PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"

#: Grafana's variables, replaced by values promtool can parse.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__range": "1h",
    "$__interval": "1m",
    "$service": ".*",
}


# --- the PrometheusRule made from the rule file ---------------------------------------------
class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as YAML literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


def render_prometheus_rule(rules_text: str) -> str:
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "modelguard",
            "labels": {"app.kubernetes.io/part-of": "modelguard"},
        },
        "spec": yaml.safe_load(rules_text),
    }
    header = (
        "# Generated from prometheus/modelguard.rules.yml (the source: edit that file, then\n"
        "# run `python -m tests.unit.deploy.test_prometheus_rules --write`).\n"
    )
    body = yaml.dump(resource, Dumper=_LiteralDumper, sort_keys=False, width=100)
    return header + body


def promtool() -> str:
    binary = find_tool("promtool")
    if binary is None:
        pytest.fail("promtool is missing: scripts/setup.sh installs Debian's prometheus package")
    return binary


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)


# --- promtool ---------------------------------------------------------------------------------
def test_promtool_check_rules_passes() -> None:
    result = run(promtool(), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = run(promtool(), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_rule_file() -> None:
    """The check can fail: a rule file with bad PromQL and an unknown field is refused."""
    result = run(promtool(), "check", "rules", str(FIXTURES / "broken.rules.yml"))
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts - fired == set(), "alerts without a test in which they fire"
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        assert rule["labels"]["severity"] in {"page", "ticket", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# --- the PrometheusRule custom resource -----------------------------------------------------
def test_prometheus_rule_resource_matches_the_rule_file() -> None:
    committed = PROMETHEUS_RULE.read_text()
    expected = render_prometheus_rule(RULES.read_text())
    assert yaml.safe_load(committed) == yaml.safe_load(expected), (
        "deploy/k8s/monitoring/prometheusrule.yaml is stale: run "
        "`python -m tests.unit.deploy.test_prometheus_rules --write`"
    )


# --- metric names -----------------------------------------------------------------------------
def _recorded_names() -> set[str]:
    rules = yaml.safe_load(RULES.read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def _exported_names() -> set[str]:
    return {n for service in built_services().values() for n in service.metric_names}


def _check_names(expr: str, exported: set[str], recorded: set[str], where: str) -> list[str]:
    problems = []
    for name in re.findall(r"\b(modelguard_[a-z0-9_]+|modelguard:[a-z0-9_:]+)", expr):
        if name not in exported and name not in recorded:
            problems.append(f"{where}: {name} is neither exported by a service nor recorded")
    for pattern in re.findall(r'__name__=~"([^"]+)"', expr):
        matched = {n for n in exported if re.fullmatch(pattern, n)}
        owners = {s.name for s in built_services().values() if s.metric_names & matched}
        if len(owners) != len(built_services()):
            problems.append(f"{where}: {pattern!r} matches metrics of {sorted(owners)} only")
    return problems


def _rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(r.get("record") or r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def test_rules_read_only_metrics_the_services_export() -> None:
    exported, recorded = _exported_names(), _recorded_names()
    problems = [
        p for name, expr in _rule_exprs() for p in _check_names(expr, exported, recorded, name)
    ]
    assert problems == []


def test_the_name_check_can_fail() -> None:
    exported, recorded = _exported_names(), _recorded_names()
    assert _check_names("rate(modelguard_leak_detector_jobz_total[5m])", exported, recorded, "x")
    assert _check_names('{__name__=~"modelguard_leak_detector_.+_total"}', exported, recorded, "x")


# --- the Grafana dashboard --------------------------------------------------------------------
def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append((panel["title"], target["expr"]))
    for annotation in dashboard["annotations"]["list"]:
        exprs.append((annotation["name"], annotation["expr"]))
    return exprs


def _substitute(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr.replace("$1", ""), f"unknown Grafana variable in {expr!r}"
    return expr


def test_dashboard_shows_the_pipeline() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "modelguard-pipeline"
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("queue lag", "jobs by outcome", "stage duration", "map latency", "verdicts"):
        assert wanted in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (Grafana variables filled in)."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": _substitute(expr)}
                    for i, (_title, expr) in enumerate(_dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run(promtool(), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_reads_only_metrics_the_services_export() -> None:
    exported, recorded = _exported_names(), _recorded_names()
    problems = [
        p
        for title, expr in _dashboard_exprs()
        for p in _check_names(expr, exported, recorded, title)
    ]
    assert problems == []


def main() -> None:
    if sys.argv[1:] == ["--write"]:
        PROMETHEUS_RULE.write_text(render_prometheus_rule(RULES.read_text()))
        print(f"wrote {PROMETHEUS_RULE}")
    else:
        print(__doc__)


if __name__ == "__main__":
    main()
