"""Settings. One pydantic-settings class per service (its own env prefix) embeds the
platform settings every service shares (prefix ``MODELGUARD_``). Nothing else in the
project reads the environment; Kubernetes ConfigMap keys are exactly these variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class PlatformSettings(BaseSettings):
    """Where jobs travel and artifacts live; shared by all six services."""

    model_config = SettingsConfigDict(env_prefix="MODELGUARD_", extra="forbid")

    bus: Literal["memory", "kafka"] = Field(
        "memory", description="Job bus: in-process (embedded mode) or a Kafka broker."
    )
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated host:port."
    )
    kafka_session_timeout_ms: int = Field(
        6000, description="Consumer-group session timeout; Tansu joins slowly above ~6 s."
    )
    kafka_partitions: int = Field(3, description="Partitions per topic when creating topics.")
    kafka_stuck_poll_seconds: float = Field(
        60.0,
        description="A consumer blocked this long inside one poll (normally 200 ms) is "
        "stuck: the service process exits so that its supervisor restarts it.",
    )
    kafka_max_poll_interval_ms: int = Field(
        1_800_000,
        description="Longest a handler may run before the group gives its work to another "
        "member; audits of big models take minutes.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="How the Kafka clients connect: plaintext, TLS, or SASL over either.",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (with a SASL_* security protocol)."
    )
    kafka_sasl_username: str = Field("", description="SASL user name.")
    kafka_sasl_password_file: str = Field(
        "",
        description="File holding the SASL password (mounted from a Secret; a trailing "
        "newline is ignored).",
    )
    kafka_ssl_cafile: str = Field(
        "", description="CA (PEM) the brokers' certificates chain to (empty: the system's)."
    )
    kafka_ssl_certfile: str = Field(
        "", description="Client certificate (PEM) for brokers that authenticate clients by TLS."
    )
    kafka_ssl_keyfile: str = Field("", description="Private key (PEM) of the client certificate.")
    store: Literal["local", "s3"] = Field(
        "local", description="Artifact store: a local directory or an S3/MinIO bucket."
    )
    store_dir: Path = Field(
        Path(".modelguard/store"), description="Root directory of the local artifact store."
    )
    s3_endpoint: str = Field("127.0.0.1:9000", description="S3 endpoint host:port.")
    s3_access_key: str = Field("modelguard", description="S3 access key id.")
    s3_secret_key: SecretStr = Field(SecretStr("modelguard-secret"), description="S3 secret key.")
    s3_bucket: str = Field("modelguard", description="Bucket holding all artifacts.")
    s3_secure: bool = Field(False, description="Use HTTPS to reach the S3 endpoint.")
    s3_region: str = Field(
        "us-east-1", description="Region of the bucket (AWS signs requests per region)."
    )
    s3_credentials: Literal["static", "aws-chain"] = Field(
        "static",
        description="static: the access and secret keys above. aws-chain: the AWS SDKs' "
        "chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY(/AWS_SESSION_TOKEN), the shared "
        "credentials file, web identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN: EKS "
        "IRSA), then the ECS task role and the EC2 instance profile; temporary credentials "
        "are renewed before they expire.",
    )
    encrypt_artifacts: bool = Field(
        False,
        description="Envelope-encrypt every artifact written (AES-256-GCM with a data key per "
        "object, wrapped by the tenant's key-encryption key); needs the keyring file.",
    )
    encryption_keyring_file: str = Field(
        "",
        description="Keyring JSON mounted from a Secret: per tenant an active key id and its "
        "keys (32 bytes, base64); listed non-active keys still decrypt older objects.",
    )
    signing_key_file: str = Field(
        "",
        description="Ed25519 private key (PKCS#8 PEM, mounted from a Secret) signing reports, "
        "repaired models, carriers, mappers and query profiles; its public half verifies "
        "them (`modelguard public-key`). Empty: the published development key, refused by "
        "services that listen beyond loopback.",
    )
    max_model_bytes: int = Field(512 << 20, description="Largest accepted model file.")
    max_dataset_bytes: int = Field(1 << 30, description="Largest accepted dataset file.")
    job_max_attempts: int = Field(3, description="Handler attempts before dead-lettering.")
    stage_time_limit_seconds: float = Field(
        3600.0,
        description="Longest one audit stage may run; past it the stage fails with the reason "
        "and is not retried (0: no limit).",
    )
    auth_tokens_file: str = Field(
        "",
        description="Tokens file (tenant, role, salted hash per line; mounted from a Secret): "
        "every gRPC API needs a bearer token. Empty: authentication off (a warning is logged).",
    )
    tls_cert_file: str = Field(
        "", description="Server certificate (PEM) for gRPC over TLS (empty: plaintext)."
    )
    tls_key_file: str = Field("", description="Private key (PEM) of the server certificate.")
    tls_client_ca_file: str = Field(
        "",
        description="CA (PEM) that client certificates must chain to; set: mTLS, clients "
        "without a valid certificate are refused.",
    )
    torch_threads: int = Field(
        0, description="torch intra-op threads per process (0: torch default)."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text for people, or one JSON object per line (time, level, "
        "logger, message, service, and the audit_id, stage, tenant and attempt of the job "
        "in hand) for a log pipeline.",
    )


class TracingSettings(BaseSettings):
    """OpenTelemetry tracing, from the standard ``OTEL_*`` variables. Unlike the SDK's
    default (``otlp``), tracing is off unless ``OTEL_TRACES_EXPORTER`` names an exporter.
    The OTLP exporter reads its own standard variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``, …)."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="forbid")
    sdk_disabled: bool = Field(False, description="True: no tracing whatever else is set.")
    traces_exporter: str = Field(
        "none",
        description="Comma-separated exporters: otlp (OTLP over HTTP/protobuf), console "
        "(JSON on stdout), none (tracing off, the default).",
    )
    service_name: str = Field(
        "", description="The service.name resource attribute (empty: the service's own name)."
    )
    traces_sampler: str = Field(
        "parentbased_always_on",
        description="always_on, always_off, traceidratio, parentbased_always_on, "
        "parentbased_always_off or parentbased_traceidratio.",
    )
    traces_sampler_arg: str = Field(
        "", description="The ratio of the traceidratio samplers (0..1; empty: 1.0)."
    )


class ServiceSettings(BaseSettings):
    """Fields every service has; subclasses set the env prefix and defaults."""

    model_config = SettingsConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address the gRPC and metrics servers bind.")
    grpc_port: int = Field(0, description="gRPC port (0: any free port).")
    metrics_port: int = Field(
        0, description="Prometheus /metrics port (0: any free port; -1: off)."
    )
    grpc_workers: int = Field(8, description="gRPC thread-pool size.")
    grace_seconds: float = Field(10.0, description="Graceful shutdown period on SIGTERM.")
    worker: bool = Field(True, description="Run the Kafka worker (consume jobs) in this process.")
    group: str = Field("", description="Consumer group (default: the service name).")


class TriggerReversalSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELGUARD_TRIGGER_REVERSAL_", extra="forbid")
    grpc_port: int = 50052
    metrics_port: int = 9102
    steps: int = Field(0, description="Optimisation steps per label (0: algorithm default).")
    clean_samples: int = Field(1000, description="Clean images used for reversal at most.")
    memory_budget_mb: int = Field(
        4096,
        ge=1024,
        description="Peak memory a reversal plans for (label batches are sized from it).",
    )
    time_budget_seconds: float = Field(
        480.0,
        gt=0,
        description="Wall time a reversal may take; past it the verdict is inconclusive.",
    )
    robustness_images: int = Field(
        500, ge=1, description="Images the robustness stage attacks at most (a seeded subset)."
    )
    robustness_time_budget_seconds: float = Field(
        480.0,
        gt=0,
        description="Wall time the robustness stage's attacks may take; fewer images are "
        "attacked to fit (the memory budget is the reversal's).",
    )


class NeuronScoringSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELGUARD_NEURON_SCORING_", extra="forbid")
    grpc_port: int = 50053
    metrics_port: int = 9103
    shapley: bool = Field(True, description="Also estimate Shapley values (costs evaluations).")


class PruningOrchestratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELGUARD_PRUNING_ORCHESTRATOR_", extra="forbid")
    grpc_port: int = 50051
    metrics_port: int = 9101
    max_upload_bytes: int = Field(1 << 30, description="Largest artifact accepted by upload.")
    watch_poll_seconds: float = Field(
        0.5, description="How often WatchAudit re-reads state written by other replicas."
    )
    http_port: int = Field(
        -1,
        description="HTTP/JSON face of the audit API, same tokens (0: any free port; -1: off).",
    )


class LeakDetectorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELGUARD_LEAK_DETECTOR_", extra="forbid")
    grpc_port: int = 50054
    metrics_port: int = 9104


class CarrierTrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELGUARD_CARRIER_TRAINER_", extra="forbid")
    grpc_port: int = 50055
    metrics_port: int = 9105
    steps: int = Field(
        6000,
        description="Training steps per carrier; the learning rates decay to zero over them "
        "(0: the algorithm's default budget).",
    )
    public_model: str = Field(
        "lenet5-fashion-conv",
        description="Registered public model carriers are trained for.",
    )
    task: str = Field("mnist", description="Dataset the mapping networks classify.")
    train_samples: int = Field(20000, description="Task samples used to train one carrier.")
    hidden: int = Field(64, description="Hidden width of the mapping network (0: linear).")
    time_budget_seconds: float = Field(600.0, description="Wall-time budget of one carrier.")


class ResultMapperSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELGUARD_RESULT_MAPPER_", extra="forbid")
    grpc_port: int = 50056
    metrics_port: int = 9106
    grpc_workers: int = Field(
        4,
        description="gRPC thread-pool size. Map calls are short and hold the GIL: 4 threads "
        "answer more calls per core, with a lower p99, than 8 (bench.bench_serving).",
    )
    batch_scheduling: bool = Field(
        True,
        description="Run the process under Linux's SCHED_BATCH policy: a thread that wakes "
        "(gRPC's poll thread on each network event, a worker handed a call) no longer "
        "preempts the worker mid-call; it runs when that worker blocks. Involuntary "
        "context switches fell from ~1 to ~0.03 per call, throughput rose (bench_serving). "
        "No privilege is needed; ignored where the policy does not exist.",
    )
    max_loaded_bytes: int = Field(
        256 << 20, description="Memory bound of the loaded-mapper LRU cache."
    )
    trace_ratio: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="When tracing is on, the share of Map and ModelInfer calls traced (the "
        "hot path); a call whose caller's trace is sampled is always traced.",
    )
    max_rows_per_window: int = Field(
        5000, description="Rows one user may map per hour before extraction is suspected."
    )
    max_rows_per_generation: int = Field(
        20000, description="Rows one carrier generation may map before it is rotated (0: off)."
    )
    auto_revoke: bool = Field(
        True, description="Revoke a carrier at once when its queries look like extraction."
    )
    profile_scoring: bool = Field(
        True,
        description="Score every Map request against the carrier's query profile, which "
        "must be signed by this deployment: a carrier whose profile is missing or not "
        "signed is refused. Off: profiles are not loaded; only the row-count rules apply.",
    )
    rate_per_second: float = Field(
        100.0, description="Map calls per second one user may sustain (0: no rate limit)."
    )
    rate_burst: int = Field(200, description="Map calls one user may make at once above the rate.")
    query_budget_rows: int = Field(
        200_000, description="Rows one user may map per budget period (0: no budget)."
    )
    query_budget_period_seconds: float = Field(
        86_400.0, description="Length of the query-budget period (a day by default)."
    )


SERVICE_SETTINGS: dict[str, type[ServiceSettings]] = {
    "pruning-orchestrator": PruningOrchestratorSettings,
    "trigger-reversal": TriggerReversalSettings,
    "neuron-scoring": NeuronScoringSettings,
    "leak-detector": LeakDetectorSettings,
    "carrier-trainer": CarrierTrainerSettings,
    "result-mapper": ResultMapperSettings,
}
SERVICES = tuple(SERVICE_SETTINGS)


class StackSettings(BaseSettings):
    """The local stack of `make up`: its fixed ports (the platform settings' defaults, so a
    client without settings finds it), what it runs and how it restarts what exits. The
    services' own ports are their settings' (``MODELGUARD_<SERVICE>_GRPC_PORT``, ...)."""

    model_config = SettingsConfigDict(env_prefix="MODELGUARD_STACK_", extra="forbid")

    dir: Path = Field(Path(".modelguard/stack"), description="State, data and logs.")
    kafka_port: int = Field(9092, description="Port of the Kafka API (Tansu).")
    s3_port: int = Field(
        9000, description="Port of the S3 API (SeaweedFS); its gRPC takes this port + 10000."
    )
    bucket: str = Field("modelguard", description="Artifact bucket.")
    prometheus: bool = Field(True, description="Run Prometheus when it is installed.")
    prometheus_port: int = Field(9090, description="Port of Prometheus's web UI and API.")
    services: str = Field("", description="Comma-separated services to run (empty: all six).")
    restart_initial_seconds: float = Field(
        1.0, description="Delay before restarting a process that exited; doubles each time."
    )
    restart_max_seconds: float = Field(60.0, description="Longest delay between restarts.")
    restart_reset_after_seconds: float = Field(
        60.0, description="A process up this long restarts with the initial delay again."
    )

    def service_names(self) -> tuple[str, ...]:
        if not self.services.strip():
            return SERVICES
        names = tuple(name.strip() for name in self.services.split(",") if name.strip())
        unknown = sorted(set(names) - set(SERVICES))
        if unknown:
            raise ValueError(
                f"MODELGUARD_STACK_SERVICES names unknown services {unknown}; "
                f"known: {', '.join(SERVICES)}"
            )
        return tuple(name for name in SERVICES if name in names)
