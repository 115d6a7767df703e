"""A real local stack, each part its own process: `make up` / `down` / `status` / `logs`.

SeaweedFS (S3), Tansu (Kafka API, durable on SeaweedFS), the six services, and Prometheus
scraping them, on fixed ports (see `StackSettings` and the services' settings), watched by
a supervisor that restarts whatever exits, with backoff. State (ports, pids, restarts)
and logs live under .modelguard/stack/. The same `ServiceProcess` starts services for the
integration tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelguard.config import SERVICE_SETTINGS, SERVICES, StackSettings
from modelguard.localstack import (
    GRPC_OFFSET,
    SeaweedServer,
    TansuBroker,
    free_port,
    port_free,
)
from modelguard.supervisor import BackoffPolicy, Supervisor, UnitStatus

log = logging.getLogger(__name__)


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
        module = f"modelguard.services.{self.name.replace('-', '_')}.main"
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", module],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_healthy(timeout)
        return self

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def poll(self) -> int | None:
        """The exit status once the process has exited; None while it runs."""
        return self.process.poll() if self.process is not None else None

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


# --------------------------------------------------------------------------------------
# the supervised stack: `make up`, `make down`, `make status`, `make logs`
# --------------------------------------------------------------------------------------

#: Exit status of `status` when no stack is up.
EXIT_NOT_UP = 3


class PortInUse(RuntimeError):
    """A fixed port of the stack is taken: it fails rather than move, because a moved port
    leaves every client pointing at the old one."""


@dataclass(frozen=True)
class PortClaim:
    port: int
    what: str  # "gRPC of trigger-reversal"
    setting: str  # the environment variable that moves it


def check_ports(claims: list[PortClaim], host: str = "127.0.0.1") -> None:
    """Raise `PortInUse` naming every claimed port that is taken or claimed twice, with
    the setting that moves it."""
    problems: list[str] = []
    seen: dict[int, PortClaim] = {}
    for claim in claims:
        if claim.port in seen:
            other = seen[claim.port]
            problems.append(
                f"port {claim.port} is set for both {other.what} ({other.setting}) and "
                f"{claim.what} ({claim.setting}); set one of them to another port"
            )
        elif not port_free(claim.port, host):
            problems.append(
                f"port {claim.port} ({claim.what}) is in use by another process; stop that "
                f"process or set {claim.setting} to a free port"
            )
        seen.setdefault(claim.port, claim)
    if problems:
        raise PortInUse("cannot start the stack:\n  " + "\n  ".join(problems))


@dataclass
class ProcessUnit:
    """Adapts a server of the stack to the supervisor's `Unit`."""

    name: str
    start_fn: Callable[[], object]
    stop_fn: Callable[[], object]
    process_fn: Callable[[], subprocess.Popen[bytes] | None]
    log_path: Path

    @property
    def pid(self) -> int | None:
        process = self.process_fn()
        return process.pid if process is not None else None

    def start(self) -> None:
        self.start_fn()

    def stop(self) -> None:
        self.stop_fn()

    def poll(self) -> int | None:
        process = self.process_fn()
        return process.poll() if process is not None else None


class LocalStack:
    """What `make up` runs, on the fixed ports of ``settings``: SeaweedFS, Tansu, the
    services and (when installed and wanted) Prometheus, each its own process."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.dir = settings.dir
        self.seaweed = SeaweedServer(self.dir / "seaweedfs", s3_port=settings.s3_port)
        self.tansu = TansuBroker(self.dir / "tansu", self.seaweed, port=settings.kafka_port)
        self.env = platform_env(
            self.tansu.bootstrap,
            self.seaweed.endpoint,
            self.seaweed.access_key,
            self.seaweed.secret_key,
            settings.bucket,
        )
        self.services: dict[str, ServiceProcess] = {}
        for name in settings.service_names():
            service_settings = SERVICE_SETTINGS[name]()
            self.services[name] = ServiceProcess(
                name,
                self.env,
                self.dir / "logs",
                grpc_port=service_settings.grpc_port,
                metrics_port=service_settings.metrics_port,
            )
        self.prometheus: PrometheusProcess | None = None
        if settings.prometheus and shutil.which("prometheus"):
            self.prometheus = PrometheusProcess(
                self.dir / "prometheus", list(self.services.values()), port=settings.prometheus_port
            )

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def port_claims(self) -> list[PortClaim]:
        claims = [
            PortClaim(self.settings.kafka_port, "Kafka API (Tansu)", "MODELGUARD_STACK_KAFKA_PORT"),
            PortClaim(self.settings.s3_port, "S3 API (SeaweedFS)", "MODELGUARD_STACK_S3_PORT"),
            PortClaim(
                self.settings.s3_port + GRPC_OFFSET,
                "gRPC of SeaweedFS's S3 gateway (S3 port + 10000)",
                "MODELGUARD_STACK_S3_PORT",
            ),
        ]
        for name, service in self.services.items():
            claims.append(
                PortClaim(service.grpc_port, f"gRPC of {name}", service.prefix + "GRPC_PORT")
            )
            if service.metrics_port > 0:
                claims.append(
                    PortClaim(
                        service.metrics_port, f"metrics of {name}", service.prefix + "METRICS_PORT"
                    )
                )
        if self.prometheus is not None:
            claims.append(
                PortClaim(self.prometheus.port, "Prometheus", "MODELGUARD_STACK_PROMETHEUS_PORT")
            )
        return claims

    def units(self) -> list[ProcessUnit]:
        """In start order: the store, the broker that keeps its log there, Prometheus, then
        the services (which the supervisor starts together)."""
        seaweed, tansu = self.seaweed, self.tansu
        units = [
            ProcessUnit(
                "seaweedfs",
                seaweed.start,
                seaweed.stop,
                lambda: seaweed.process.proc,
                seaweed.process.log_path,
            ),
            ProcessUnit(
                "tansu", tansu.start, tansu.stop, lambda: tansu.process.proc, tansu.process.log_path
            ),
        ]
        if (prometheus := self.prometheus) is not None:
            units.append(
                ProcessUnit(
                    "prometheus",
                    prometheus.start,
                    prometheus.stop,
                    lambda: prometheus.process,
                    prometheus.directory / "prometheus.log",
                )
            )
        for service in self.services.values():
            units.append(
                ProcessUnit(
                    service.name,
                    service.start,
                    service.stop,
                    process_of(service),
                    service.log_path,
                )
            )
        return units

    def endpoints(self) -> dict[str, dict[str, Any]]:
        """Per unit: its address, what answers there, and its log file."""
        out: dict[str, dict[str, Any]] = {
            "seaweedfs": {"address": self.seaweed.endpoint, "probe": "tcp"},
            "tansu": {"address": self.tansu.bootstrap, "probe": "tcp"},
        }
        if self.prometheus is not None:
            out["prometheus"] = {"address": f"127.0.0.1:{self.prometheus.port}", "probe": "tcp"}
        for name, service in self.services.items():
            out[name] = {
                "address": service.address,
                "metrics_port": service.metrics_port,
                "probe": "grpc",
            }
        for unit in self.units():
            out[unit.name]["log"] = str(unit.log_path)
        return out

    def write_state(self, statuses: dict[str, UnitStatus], *, ready: bool = False) -> None:
        """The state file `status`, `logs`, `up` and `down` read (replaced atomically)."""
        endpoints = self.endpoints()
        state = {
            "supervisor_pid": os.getpid(),
            "ready": ready,
            "orchestrator": endpoints.get("pruning-orchestrator", {}).get("address", ""),
            "prometheus": self.prometheus.url if self.prometheus is not None else "",
            "env": self.env,
            "units": {
                name: {**endpoints[name], **status.to_json()} for name, status in statuses.items()
            },
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        partial = self.state_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(state, indent=2))
        partial.replace(self.state_path)


def process_of(service: ServiceProcess) -> Callable[[], subprocess.Popen[bytes] | None]:
    return lambda: service.process


def backoff_policy(settings: StackSettings) -> BackoffPolicy:
    return BackoffPolicy(
        initial_seconds=settings.restart_initial_seconds,
        max_seconds=settings.restart_max_seconds,
        reset_after_seconds=settings.restart_reset_after_seconds,
    )


def run(settings: StackSettings) -> int:
    """Start the stack and supervise it in the foreground until SIGTERM or SIGINT."""
    stack = LocalStack(settings)
    try:
        check_ports(stack.port_claims())
    except PortInUse as err:
        print(err, file=sys.stderr)
        return 1
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    ready = threading.Event()
    supervisor = Supervisor(
        stack.units(),
        backoff_policy(settings),
        on_change=lambda statuses: stack.write_state(statuses, ready=ready.is_set()),
    )
    stack.write_state(supervisor.snapshot())
    try:
        supervisor.start(parallel=stack.services)
    except Exception:
        log.exception("the stack did not come up")
        stack.state_path.unlink(missing_ok=True)
        return 1
    ready.set()
    stack.write_state(supervisor.snapshot(), ready=True)
    log.info("stack up; supervising %s", ", ".join(supervisor.units))
    stopping.wait()
    log.info("stopping the stack")
    supervisor.stop()
    stack.state_path.unlink(missing_ok=True)
    return 0


def read_state(settings: StackSettings) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((settings.dir / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_state(settings: StackSettings) -> dict[str, Any] | None:
    """The state of a stack whose supervisor is alive."""
    state = read_state(settings)
    if state is None or not pid_alive(int(state["supervisor_pid"])):
        return None
    return state


def up(settings: StackSettings, timeout: float = 600.0) -> int:
    """Start the supervisor in the background and return once the stack is ready; when it
    is already up, say so and show its status."""
    if running_state(settings) is not None:
        print("the stack is already up\n")
        return status(settings)
    stop_orphans(settings)  # of a supervisor that died without cleaning up
    try:
        check_ports(LocalStack(settings).port_claims())
    except PortInUse as err:
        print(err, file=sys.stderr)
        return 1
    settings.dir.mkdir(parents=True, exist_ok=True)
    supervisor_log = settings.dir / "supervisor.log"
    with supervisor_log.open("ab") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "modelguard.services.stack", "run"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives `make up`; `make down` stops it
        )
    deadline = time.monotonic() + timeout
    while True:
        state = read_state(settings)
        if state is not None and state["supervisor_pid"] == supervisor.pid and state["ready"]:
            break
        if supervisor.poll() is not None or time.monotonic() > deadline:
            if supervisor.poll() is None:
                supervisor.terminate()
            print(f"the stack did not come up; {supervisor_log}:", file=sys.stderr)
            print(tail(supervisor_log, 30), file=sys.stderr)
            return 1
        time.sleep(0.5)  # poll interval of the state file
    status(settings)
    print(
        f"\nstack up. Use it with:\n  export MODELGUARD_CLI_TARGET={state['orchestrator']}\n"
        "  modelguard audit submit …\n"
        f"Prometheus: {state['prometheus'] or 'not started'}\n"
        "`make status`, `make logs SERVICE=name`; stop it with `make down`."
    )
    return 0


def stop_orphans(settings: StackSettings) -> None:
    """Kill the processes a dead supervisor left running, and forget its state."""
    state = read_state(settings)
    if state is None:
        return
    for name, unit in state["units"].items():
        if unit.get("pid"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(unit["pid"]), signal.SIGKILL)
                print(f"killed {name} (pid {unit['pid']}), left by a stopped supervisor")
    (settings.dir / "state.json").unlink(missing_ok=True)


def down(settings: StackSettings, timeout: float = 180.0) -> int:
    state = running_state(settings)
    if state is None:
        stop_orphans(settings)
        print("no stack is up")
        return 0
    pid = int(state["supervisor_pid"])
    os.kill(pid, signal.SIGTERM)  # the supervisor stops the services, then the servers
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        stop_orphans(settings)
    print("stack stopped")
    return 0


def health(unit: dict[str, Any]) -> str:
    """gRPC health for a service, a TCP connect for the servers."""
    if not unit.get("pid"):
        return "-"
    host, port = unit["address"].rsplit(":", 1)
    if unit["probe"] != "grpc":
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return "accepting"
        except OSError:
            return "unreachable"
    with grpc.insecure_channel(unit["address"]) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.RpcError:
            return "unreachable"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def status_rows(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: {**unit, "health": health(unit)} for name, unit in state["units"].items()}


def status(settings: StackSettings, *, as_json: bool = False) -> int:
    state = running_state(settings)
    if state is None:
        print(json.dumps({"up": False}) if as_json else "no stack is up")
        return EXIT_NOT_UP
    rows = status_rows(state)
    if as_json:
        print(json.dumps({"up": True, "ready": state["ready"], "units": rows}, indent=2))
        return 0
    header = ("NAME", "STATE", "PID", "ADDRESS", "METRICS", "UP SINCE", "RESTARTS", "HEALTH")
    lines = [header]
    for name, row in rows.items():
        since = (
            time.strftime("%H:%M:%S", time.localtime(row["up_since"])) if row["up_since"] else "-"
        )
        lines.append(
            (
                name,
                row["state"],
                str(row["pid"] or "-"),
                row["address"],
                str(row.get("metrics_port") or "-"),
                since,
                str(row["restarts"]),
                row["health"],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    for name, row in rows.items():
        if row["last_exit"]:
            print(f"{name}: last exit: {row['last_exit']}")
    return 0


def log_files(settings: StackSettings) -> dict[str, Path]:
    """Every log of the stack by unit name, the supervisor's first."""
    directory = settings.dir
    files = {
        "supervisor": directory / "supervisor.log",
        "seaweedfs": directory / "seaweedfs" / "seaweedfs.log",
        "tansu": directory / "tansu" / "tansu.log",
        "prometheus": directory / "prometheus" / "prometheus.log",
    }
    files.update({name: directory / "logs" / f"{name}.log" for name in SERVICES})
    return files


def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def logs(settings: StackSettings, service: str = "", lines: int = 50) -> int:
    """The tail of one unit's log, or of every log there is."""
    files = log_files(settings)
    if service:
        if service not in files:
            print(f"no log named {service!r}; known: {', '.join(files)}", file=sys.stderr)
            return 2
        print(tail(files[service], lines))
        return 0
    for name, path in files.items():
        if path.is_file():
            print(f"==> {name} ({path}) <==\n{tail(path, lines)}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelguard.services.stack", description=__doc__
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("up", help="start the supervised stack in the background")
    sub.add_parser("down", help="stop it")
    sub.add_parser("run", help="start and supervise in the foreground (what `up` runs)")
    status_parser = sub.add_parser("status", help="each process: state, pid, ports, health")
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    logs_parser = sub.add_parser("logs", help="tail of a service's log (all when none given)")
    logs_parser.add_argument("service", nargs="?", default="", help="unit name")
    logs_parser.add_argument("-n", "--lines", type=int, default=50, help="lines per log")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = StackSettings()
    if args.action == "up":
        return up(settings)
    if args.action == "down":
        return down(settings)
    if args.action == "run":
        return run(settings)
    if args.action == "status":
        return status(settings, as_json=args.json)
    return logs(settings, args.service, args.lines)


if __name__ == "__main__":
    sys.exit(main())
