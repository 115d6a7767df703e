"""A real local stack, each part its own process: `make up` / `make down`.

SeaweedFS (S3), Tansu (Kafka API, durable on SeaweedFS), the six services, and Prometheus
scraping them. State (ports, pids, logs) lives under .modelguard/stack/. The same
`ServiceProcess` starts services for the integration tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelguard.config import SERVICES
from modelguard.localstack import free_port

STACK_DIR = Path(".modelguard/stack")


@dataclass
class ServiceProcess:
    """One service in its own process, configured only through its environment."""

    name: str
    env: dict[str, str]
    log_dir: Path
    grpc_port: int = 0
    metrics_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()

    @property
    def prefix(self) -> str:
        return "MODELGUARD_" + self.name.upper().replace("-", "_") + "_"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        env = {
            **os.environ,
            **self.env,
            self.prefix + "GRPC_PORT": str(self.grpc_port),
            self.prefix + "METRICS_PORT": str(self.metrics_port),
        }
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{self.name}.log").open("ab")
        module = f"modelguard.services.{self.name.replace('-', '_')}.main"
        self.process = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        """Readiness = the gRPC health service answers SERVING (no sleeps)."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.process.returncode}; "
                        f"see {self.log_dir / (self.name + '.log')}"
                    )
                try:
                    reply = stub.Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1.0, wait_for_ready=True
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
        raise TimeoutError(f"{self.name} not healthy after {timeout} s")

    def kill(self) -> None:
        """SIGKILL: no chance to commit or clean up (a crash)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait for the graceful drain; SIGKILL after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def platform_env(
    bootstrap: str, s3_endpoint: str, access_key: str, secret_key: str, bucket: str
) -> dict[str, str]:
    return {
        "MODELGUARD_BUS": "kafka",
        "MODELGUARD_KAFKA_BOOTSTRAP": bootstrap,
        "MODELGUARD_STORE": "s3",
        "MODELGUARD_S3_ENDPOINT": s3_endpoint,
        "MODELGUARD_S3_ACCESS_KEY": access_key,
        "MODELGUARD_S3_SECRET_KEY": secret_key,
        "MODELGUARD_S3_BUCKET": bucket,
        "MODELGUARD_TORCH_THREADS": "1",
    }


def up() -> None:
    from modelguard.localstack import start_seaweedfs, start_tansu

    if (STACK_DIR / "state.json").exists():
        print("a stack is already up; `make down` first", file=sys.stderr)
        sys.exit(1)
    STACK_DIR.mkdir(parents=True, exist_ok=True)
    seaweed = start_seaweedfs(STACK_DIR / "seaweedfs")
    tansu = start_tansu(STACK_DIR / "tansu", s3=seaweed)
    env = platform_env(
        tansu.bootstrap, seaweed.endpoint, seaweed.access_key, seaweed.secret_key, "modelguard"
    )
    services = []
    for name in SERVICES:
        services.append(ServiceProcess(name, env, STACK_DIR / "logs").start())
        print(f"{name:>22}: gRPC {services[-1].address}, metrics :{services[-1].metrics_port}")
    pids = {
        "seaweedfs": seaweed.process.pid,
        "tansu": tansu.process.pid,
        **{s.name: s.process.pid for s in services if s.process},
    }
    prometheus = start_prometheus(services)
    if prometheus:
        pids["prometheus"] = prometheus[0]
    state = {
        "pids": pids,
        "env": env,
        "orchestrator": services[0].address,
        "prometheus": prometheus[1] if prometheus else "",
    }
    (STACK_DIR / "state.json").write_text(json.dumps(state, indent=2))
    print(
        f"\nstack up. Use it with:\n  export MODELGUARD_CLI_TARGET={services[0].address}\n"
        f"  modelguard audit submit …\nPrometheus: {state['prometheus'] or 'not started'}\n"
        "Stop it with `make down`."
    )


#: The recording and alerting rules (deploy/k8s/monitoring/prometheus/), loaded by the
#: local Prometheus as by the cluster's (there as a PrometheusRule).
RULES_DIR = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "monitoring" / "prometheus"


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.rules.yml"))


@dataclass
class PrometheusProcess:
    """A real Prometheus (Debian package) scraping ``services`` with the project's rules,
    on 127.0.0.1, storing its data under ``directory``. Ready when ``/-/ready`` answers."""

    directory: Path
    services: list[ServiceProcess]
    port: int = 0
    scrape_interval: str = "5s"
    evaluation_interval: str = "5s"
    rules: list[Path] = field(default_factory=rule_files)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> PrometheusProcess:
        from shutil import which

        binary = which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (Debian package prometheus)")
        self.port = self.port or free_port()
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "prometheus.yml"
        config.write_text(
            scrape_config(self.services, self.scrape_interval, self.rules, self.evaluation_interval)
        )
        log = (self.directory / "prometheus.log").open("ab")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=2d",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll ``/-/ready`` (no sleeps beyond the poll interval)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self.process.returncode}; "
                    f"see {self.directory / 'prometheus.log'}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout} s")

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; returns ``data`` of a successful answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10.0) as reply:
            body = json.loads(reply.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the vector's samples (``metric`` labels, ``value``)."""
        return list(self.api("query", query=expr)["result"])

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_prometheus(services: list[ServiceProcess]) -> tuple[int, str] | None:
    """Prometheus (Debian package) scraping the services with the project's rules, when it
    is installed; returns its pid and URL."""
    try:
        prometheus = PrometheusProcess(STACK_DIR / "prometheus", services).start()
    except FileNotFoundError:
        return None
    assert prometheus.process is not None
    return prometheus.process.pid, prometheus.url


def scrape_config(
    services: list[ServiceProcess],
    interval: str = "5s",
    rules: list[Path] | None = None,
    evaluation_interval: str = "",
) -> str:
    """A prometheus.yml: one job per service named after it (as the ServiceMonitors name
    theirs in the cluster, which the rules rely on) and the rule files."""
    lines = [
        "global:",
        f"  scrape_interval: {interval}",
        f"  evaluation_interval: {evaluation_interval or interval}",
    ]
    if rules:
        lines.append("rule_files:")
        lines += [f"  - {json.dumps(str(path))}" for path in rules]
    lines.append("scrape_configs:")
    for service in services:
        lines += [
            f"  - job_name: {service.name}",
            "    static_configs:",
            f"      - targets: ['127.0.0.1:{service.metrics_port}']",
        ]
    return "\n".join(lines) + "\n"


def down() -> None:
    state_file = STACK_DIR / "state.json"
    if not state_file.exists():
        print("no stack is up", file=sys.stderr)
        return
    state = json.loads(state_file.read_text())
    # services first (they drain), then the broker and the store
    for name, pid in reversed(list(state["pids"].items())):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
        print(f"stopped {name}")
    state_file.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    args = parser.parse_args()
    up() if args.action == "up" else down()


if __name__ == "__main__":
    main()
