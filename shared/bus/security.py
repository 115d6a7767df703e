"""How the Kafka clients authenticate and encrypt: plaintext, TLS (optionally with a client
certificate), or SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) over plaintext or TLS.

`KafkaSecurity` turns the platform settings into kafka-python's client options, which the
bus passes to its producer, consumers and admin client alike. The SASL password is read
from a file (a mounted Secret, as Strimzi's `KafkaUser` makes) once, at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from modelguard.config import PlatformSettings
from modelguard.errors import InvalidInput

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass(frozen=True)
class KafkaSecurity:
    protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    username: str = ""
    password: SecretStr = field(default_factory=lambda: SecretStr(""))
    #: CA bundle (PEM) the brokers' certificates must chain to (empty: the system's).
    ca_file: str = ""
    #: Client certificate and key (PEM) for brokers that authenticate clients by TLS.
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if self.uses_sasl and not (self.username and self.password.get_secret_value()):
            raise InvalidInput(
                f"Kafka security protocol {self.protocol} needs a SASL user name and password: "
                "set MODELGUARD_KAFKA_SASL_USERNAME and MODELGUARD_KAFKA_SASL_PASSWORD_FILE"
            )
        if (self.ca_file or self.cert_file or self.key_file) and not self.uses_tls:
            raise InvalidInput(
                f"Kafka TLS files are set but the security protocol {self.protocol} does not "
                "use TLS: set MODELGUARD_KAFKA_SECURITY_PROTOCOL to SSL or SASL_SSL"
            )
        if self.key_file and not self.cert_file:
            raise InvalidInput(
                "MODELGUARD_KAFKA_SSL_KEYFILE is set without MODELGUARD_KAFKA_SSL_CERTFILE"
            )

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @classmethod
    def from_settings(cls, platform: PlatformSettings) -> KafkaSecurity:
        password = ""
        if platform.kafka_sasl_password_file:
            path = Path(platform.kafka_sasl_password_file)
            try:
                # a Secret's file may end with a newline that is not part of the password
                password = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as err:
                raise InvalidInput(
                    f"cannot read the Kafka SASL password file {path} "
                    f"(MODELGUARD_KAFKA_SASL_PASSWORD_FILE): {err.strerror or err}"
                ) from err
        return cls(
            protocol=platform.kafka_security_protocol,
            sasl_mechanism=platform.kafka_sasl_mechanism,
            username=platform.kafka_sasl_username,
            password=SecretStr(password),
            ca_file=platform.kafka_ssl_cafile,
            cert_file=platform.kafka_ssl_certfile,
            key_file=platform.kafka_ssl_keyfile,
        )

    def client_options(self) -> dict[str, Any]:
        """kafka-python keyword arguments, the same for producer, consumer and admin."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_sasl:
            # kafka-python names them "plain" but uses them for SCRAM too
            options |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.username,
                "sasl_plain_password": self.password.get_secret_value(),
            }
        if self.uses_tls:
            options |= {
                "ssl_check_hostname": True,
                "ssl_cafile": self.ca_file or None,
                "ssl_certfile": self.cert_file or None,
                "ssl_keyfile": self.key_file or None,
            }
        return options
