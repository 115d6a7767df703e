"""TLS and SASL settings reach every kafka-python client the bus builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.net.sasl import SASL_MECHANISMS

from modelguard.bus import kafka as kafka_bus
from modelguard.bus.base import Message, RetryPolicy
from modelguard.bus.kafka import KafkaBus
from modelguard.bus.security import KafkaSecurity
from modelguard.config import PlatformSettings
from modelguard.errors import InvalidInput
from modelguard.runtime import build_runtime


class Recorder:
    """Stands in for a kafka-python client class: records the keyword arguments of each
    construction (the real ones connect to a broker at once)."""

    def __init__(self, real: type[Any]) -> None:
        self.real = real
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return FakeClient()


class FakeClient:
    def send(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def get(self, timeout: float) -> None:
        return None

    def create_topics(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"topics": []}

    def subscribe(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> dict[str, Recorder]:
    recorders = {
        "producer": Recorder(KafkaProducer),
        "consumer": Recorder(KafkaConsumer),
        "admin": Recorder(KafkaAdminClient),
    }
    monkeypatch.setattr(kafka_bus, "KafkaProducer", recorders["producer"])
    monkeypatch.setattr(kafka_bus, "KafkaConsumer", recorders["consumer"])
    monkeypatch.setattr(kafka_bus, "KafkaAdminClient", recorders["admin"])
    return recorders


def exercise(bus: KafkaBus) -> None:
    """Make the bus build each of its clients: admin (topics), producer, consumer."""
    bus.publish("modelguard.test", b"x")
    sub = kafka_bus.KafkaSubscription(bus, ["modelguard.test"], "g", _ignore, RetryPolicy(), None)
    bus._new_consumer(sub)


def _ignore(_message: Message) -> None:
    return None


def platform_with(tmp_path: Path, **values: str) -> PlatformSettings:
    return PlatformSettings.model_validate({"bus": "kafka", "store_dir": tmp_path, **values})


def test_scram_over_tls_reaches_producer_consumer_and_admin(
    tmp_path: Path, clients: dict[str, Recorder]
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("s3cr3t\n")  # as a Secret's file may end
    platform = platform_with(
        tmp_path,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="modelguard",
        kafka_sasl_password_file=str(password_file),
        kafka_ssl_cafile="/etc/modelguard/kafka/ca.crt",
    )
    runtime = build_runtime(platform, client_id="leak-detector")
    assert isinstance(runtime.bus, KafkaBus)
    exercise(runtime.bus)
    for kind, recorder in clients.items():
        assert recorder.calls, f"the bus built no {kind}"
        for kwargs in recorder.calls:
            assert kwargs["security_protocol"] == "SASL_SSL", kind
            assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512", kind
            assert kwargs["sasl_plain_username"] == "modelguard", kind
            assert kwargs["sasl_plain_password"] == "s3cr3t", kind
            assert kwargs["ssl_cafile"] == "/etc/modelguard/kafka/ca.crt", kind
            assert kwargs["ssl_check_hostname"] is True, kind
            # kafka-python refuses unknown options: every one we pass must be its own
            assert set(kwargs) <= set(recorder.real.DEFAULT_CONFIG), kind
    runtime.bus.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_every_offered_mechanism_is_one_kafka_python_implements(
    tmp_path: Path, mechanism: str
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("pw")
    security = KafkaSecurity.from_settings(
        platform_with(
            tmp_path,
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism=mechanism,
            kafka_sasl_username="u",
            kafka_sasl_password_file=str(password_file),
        )
    )
    options = security.client_options()
    assert options["sasl_mechanism"] in SASL_MECHANISMS
    assert "ssl_cafile" not in options  # no TLS on SASL_PLAINTEXT


def test_mutual_tls_passes_the_client_certificate(
    tmp_path: Path, clients: dict[str, Recorder]
) -> None:
    security = KafkaSecurity.from_settings(
        platform_with(
            tmp_path,
            kafka_security_protocol="SSL",
            kafka_ssl_certfile="/certs/client.crt",
            kafka_ssl_keyfile="/certs/client.key",
        )
    )
    bus = KafkaBus("broker:9093", security=security)
    exercise(bus)
    for recorder in clients.values():
        for kwargs in recorder.calls:
            assert kwargs["security_protocol"] == "SSL"
            assert (kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (
                "/certs/client.crt",
                "/certs/client.key",
            )
            assert kwargs["ssl_cafile"] is None  # the system's CA store
            assert "sasl_mechanism" not in kwargs
    bus.close()


def test_plaintext_is_the_default(tmp_path: Path, clients: dict[str, Recorder]) -> None:
    assert PlatformSettings().kafka_security_protocol == "PLAINTEXT"
    bus = KafkaBus("broker:9092")
    exercise(bus)
    for recorder in clients.values():
        for kwargs in recorder.calls:
            assert kwargs["security_protocol"] == "PLAINTEXT"
            assert not {k for k in kwargs if k.startswith(("sasl_", "ssl_"))}
    bus.close()


def test_settings_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("from-a-secret")
    monkeypatch.setenv("MODELGUARD_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MODELGUARD_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("MODELGUARD_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("MODELGUARD_KAFKA_SASL_PASSWORD_FILE", str(password_file))
    security = KafkaSecurity.from_settings(PlatformSettings())
    assert security.client_options()["sasl_mechanism"] == "SCRAM-SHA-256"
    assert security.password.get_secret_value() == "from-a-secret"
    assert "from-a-secret" not in repr(security)  # never logged by accident
    monkeypatch.setenv("MODELGUARD_KAFKA_SASL_MECHANISM", "GSSAPI")
    with pytest.raises(ValueError, match="kafka_sasl_mechanism"):
        PlatformSettings()


def test_incomplete_settings_are_refused_with_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="MODELGUARD_KAFKA_SASL_PASSWORD_FILE"):
        KafkaSecurity.from_settings(
            platform_with(tmp_path, kafka_security_protocol="SASL_SSL", kafka_sasl_username="u")
        )
    with pytest.raises(InvalidInput, match="cannot read the Kafka SASL password file"):
        KafkaSecurity.from_settings(
            platform_with(
                tmp_path,
                kafka_security_protocol="SASL_SSL",
                kafka_sasl_username="u",
                kafka_sasl_password_file=str(tmp_path / "missing"),
            )
        )
    with pytest.raises(InvalidInput, match="does not use TLS"):
        KafkaSecurity.from_settings(platform_with(tmp_path, kafka_ssl_cafile="/certs/ca.crt"))
    with pytest.raises(InvalidInput, match="without MODELGUARD_KAFKA_SSL_CERTFILE"):
        KafkaSecurity(protocol="SSL", key_file="/certs/client.key")
