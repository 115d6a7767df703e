"""What a service is built from (bus, store, signer, metrics) and the app shell that runs
its gRPC server and Kafka workers. Services wire their parts through constructors."""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from modelguard.auth import TokenStore, load_token_store
from modelguard.bus.base import Handler, JobBus, RetryPolicy, Subscription
from modelguard.config import PlatformSettings, ServiceSettings
from modelguard.errors import InvalidInput
from modelguard.grpc_server import GrpcServer, ServerTls
from modelguard.metrics import ServiceMetrics
from modelguard.signing import Signer
from modelguard.store.base import ArtifactStore

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Collaborators shared by the services of one process."""

    platform: PlatformSettings
    bus: JobBus
    store: ArtifactStore
    signer: Signer


def build_store(platform: PlatformSettings) -> ArtifactStore:
    from modelguard.store import make_store

    keyring_file = ""
    if platform.encrypt_artifacts:
        if not platform.encryption_keyring_file:
            raise InvalidInput(
                "MODELGUARD_ENCRYPT_ARTIFACTS is on but MODELGUARD_ENCRYPTION_KEYRING_FILE is "
                "empty: mount the keyring Secret and name its file"
            )
        keyring_file = platform.encryption_keyring_file
    if platform.store == "s3":
        return make_store(
            "s3",
            endpoint=platform.s3_endpoint,
            access_key=platform.s3_access_key,
            secret_key=platform.s3_secret_key.get_secret_value(),
            bucket=platform.s3_bucket,
            secure=platform.s3_secure,
            region=platform.s3_region,
            credentials=platform.s3_credentials,
            keyring_file=keyring_file,
        )
    return make_store("local", root=platform.store_dir, keyring_file=keyring_file)


def build_runtime(
    platform: PlatformSettings,
    client_id: str = "modelguard",
    bus: JobBus | None = None,
    registry: CollectorRegistry | None = None,
    on_stuck: Callable[[str], None] | None = None,
) -> Runtime:
    """Build bus and store from settings (``bus`` given: embedded mode shares one).
    ``on_stuck(group)`` is called when a Kafka consumer is found stuck (see `KafkaBus`)."""
    from modelguard.bus import make_bus
    from modelguard.bus.metrics import BusMetrics
    from modelguard.bus.security import KafkaSecurity

    if platform.torch_threads > 0:
        torch.set_num_threads(platform.torch_threads)
    if bus is None:
        metrics = BusMetrics(registry, client_id) if registry is not None else None
        kafka_options = (
            {
                "session_timeout_ms": platform.kafka_session_timeout_ms,
                "max_poll_interval_ms": platform.kafka_max_poll_interval_ms,
                "partitions": platform.kafka_partitions,
                "stuck_poll_s": platform.kafka_stuck_poll_seconds,
                "on_stuck": on_stuck,
                "security": KafkaSecurity.from_settings(platform),
            }
            if platform.bus == "kafka"
            else {}
        )
        bus = make_bus(
            platform.bus,
            bootstrap_servers=platform.kafka_bootstrap,
            client_id=client_id,
            metrics=metrics,
            **kafka_options,
        )
    return Runtime(
        platform=platform,
        bus=bus,
        store=build_store(platform),
        signer=load_signer(platform),
    )


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine only."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or "" (all interfaces): assume others can reach it
        return False


_warned_default_key = False


def load_signer(platform: PlatformSettings) -> Signer:
    """The deployment's Ed25519 key from MODELGUARD_SIGNING_KEY_FILE; unset: the
    published development key (see `modelguard.signing`)."""
    if platform.signing_key_file:
        return Signer.from_file(platform.signing_key_file)
    return Signer.development()


def check_signing_key(platform: PlatformSettings, host: str, service: str) -> None:
    """Refuse the published development key on a server others can reach: whoever read
    the source could sign reports, carriers, mappers and query profiles that this
    deployment (and its users, with its public key) would trust. On loopback (the embedded
    demo, the CLI, the tests) it is only a WARNING, logged once per process. Judged by
    the key itself: a key file holding the development key is refused too."""
    if not load_signer(platform).is_development_key:
        return
    if not is_loopback(host):
        raise InvalidInput(
            f"{service} would listen on {host} with the development signing key: set "
            "MODELGUARD_SIGNING_KEY_FILE to an Ed25519 private key of this deployment "
            "(`openssl genpkey -algorithm ed25519 -out signing-key.pem`) to serve beyond "
            "loopback"
        )
    global _warned_default_key
    if not _warned_default_key:
        _warned_default_key = True
        log.warning(
            "MODELGUARD_SIGNING_KEY_FILE is not set: the published development key signs, "
            "so anything signed can be forged; acceptable on loopback only (services on %s)",
            host,
        )


@dataclass
class WorkerSpec:
    topics: list[str]
    handler: Handler
    group: str


@dataclass
class ServiceApp:
    """A service's gRPC server plus its Kafka workers, started and stopped together."""

    name: str
    settings: ServiceSettings
    runtime: Runtime
    metrics: ServiceMetrics
    grpc: GrpcServer = field(init=False)
    #: the bearer tokens every API of the service checks (None: authentication is off)
    tokens: TokenStore | None = field(init=False)
    workers: list[WorkerSpec] = field(default_factory=list)
    #: started after the gRPC server (e.g. another face of the same API)
    on_start: list[Callable[[], None]] = field(default_factory=list)
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    #: the service's domain objects, for embedded mode and tests (e.g. "orchestrator").
    components: dict[str, Any] = field(default_factory=dict)
    _subscriptions: list[Subscription] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        platform = self.runtime.platform
        # at build time, so that a refused key never gets as far as binding a port
        check_signing_key(platform, self.settings.host, self.name)
        self.tokens = load_token_store(platform.auth_tokens_file, self.name, self.settings.host)
        self.grpc = GrpcServer(
            self.metrics,
            host=self.settings.host,
            port=self.settings.grpc_port,
            workers=self.settings.grpc_workers,
            metrics_port=self.settings.metrics_port,
            tokens=self.tokens,
            tls=ServerTls.of(
                platform.tls_cert_file, platform.tls_key_file, platform.tls_client_ca_file
            ),
        )

    def add_servicer(
        self,
        add_to_server: Callable[[Any, Any], None],
        servicer: Any,
        full_name: str,
        *,
        trace_ratio: float | None = None,
    ) -> None:
        self.grpc.register(add_to_server, servicer, full_name, trace_ratio=trace_ratio)

    def add_worker(self, topics: list[str], handler: Handler, group: str = "") -> None:
        self.workers.append(WorkerSpec(topics, handler, group or self.settings.group or self.name))

    def start(self) -> None:
        self.grpc.start()
        for callback in self.on_start:
            callback()
        if self.settings.worker:
            retry = RetryPolicy(max_attempts=self.runtime.platform.job_max_attempts)
            for worker in self.workers:
                self._subscriptions.append(
                    self.runtime.bus.subscribe(
                        worker.topics, worker.group, worker.handler, retry=retry
                    )
                )

    def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.grace_seconds if grace is None else grace
        self.grpc.set_serving(False)
        for subscription in self._subscriptions:
            subscription.stop(timeout=grace)
        for callback in self.on_stop:
            callback()
        self.grpc.stop(grace)

    @property
    def address(self) -> str:
        return self.grpc.address
