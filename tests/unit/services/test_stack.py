"""`make up`'s fixed ports and their conflicts, and `status` / `logs` / `up` against a
state file (the supervised stack itself is exercised in tests/integration)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelguard.config import SERVICES, StackSettings
from modelguard.localstack import free_port
from modelguard.services import stack
from modelguard.services.stack import LocalStack, PortClaim, PortInUse, check_ports


@pytest.fixture
def listening() -> Iterator[int]:
    """A port some other program holds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_taken_port_fails_naming_the_port_and_the_setting(listening: int) -> None:
    claims = [
        PortClaim(free_port(), "Kafka API (Tansu)", "MODELGUARD_STACK_KAFKA_PORT"),
        PortClaim(listening, "gRPC of trigger-reversal", "MODELGUARD_TRIGGER_REVERSAL_GRPC_PORT"),
    ]
    with pytest.raises(PortInUse) as raised:
        check_ports(claims)
    message = str(raised.value)
    assert f"port {listening} (gRPC of trigger-reversal) is in use" in message
    assert "MODELGUARD_TRIGGER_REVERSAL_GRPC_PORT" in message
    assert "KAFKA" not in message  # the free one is not blamed


def test_a_port_claimed_twice_names_both_settings() -> None:
    port = free_port()
    with pytest.raises(PortInUse, match=r"MODELGUARD_STACK_KAFKA_PORT.*MODELGUARD_STACK_S3_PORT"):
        check_ports(
            [
                PortClaim(port, "Kafka API (Tansu)", "MODELGUARD_STACK_KAFKA_PORT"),
                PortClaim(port, "S3 API (SeaweedFS)", "MODELGUARD_STACK_S3_PORT"),
            ]
        )


def test_free_ports_pass() -> None:
    check_ports([PortClaim(free_port(), "x", "MODELGUARD_X")])


def test_default_ports_are_fixed_and_overridable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELGUARD_TRIGGER_REVERSAL_GRPC_PORT", "51052")
    local = LocalStack(StackSettings(dir=tmp_path, prometheus=False))
    ports = {claim.what: claim.port for claim in local.port_claims()}
    assert ports["Kafka API (Tansu)"] == 9092
    assert ports["S3 API (SeaweedFS)"] == 9000
    assert ports["gRPC of pruning-orchestrator"] == 50051
    assert ports["metrics of pruning-orchestrator"] == 9101
    assert ports["gRPC of trigger-reversal"] == 51052
    # the services find the broker and the store where the platform settings look first
    assert local.env["MODELGUARD_KAFKA_BOOTSTRAP"] == "127.0.0.1:9092"
    assert local.env["MODELGUARD_S3_ENDPOINT"] == "127.0.0.1:9000"


def test_up_refuses_a_taken_port_before_starting_anything(
    tmp_path: Path, listening: int, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = StackSettings(dir=tmp_path, kafka_port=listening, prometheus=False)
    assert stack.up(settings) == 1
    err = capsys.readouterr().err
    assert f"port {listening} (Kafka API (Tansu))" in err
    assert "MODELGUARD_STACK_KAFKA_PORT" in err
    assert not (tmp_path / "state.json").exists()
    assert not (tmp_path / "supervisor.log").exists()


def test_unknown_service_names_are_refused() -> None:
    with pytest.raises(ValueError, match="nope"):
        StackSettings(services="trigger-reversal,nope").service_names()
    assert StackSettings(services="").service_names() == SERVICES
    picked = StackSettings(services="trigger-reversal, pruning-orchestrator").service_names()
    assert picked == ("pruning-orchestrator", "trigger-reversal")


def write_state(directory: Path, address: str) -> None:
    """The state file of a stack whose supervisor is this test process."""
    unit = {
        "address": address,
        "probe": "tcp",
        "state": "running",
        "pid": os.getpid(),
        "up_since": 1.0e9,
        "restarts": 2,
        "consecutive_failures": 1,
        "last_exit": "killed by SIGKILL",
        "next_start_at": None,
    }
    state = {
        "supervisor_pid": os.getpid(),
        "ready": True,
        "orchestrator": "",
        "prometheus": "",
        "env": {},
        "units": {"tansu": unit},
    }
    (directory / "state.json").write_text(json.dumps(state))


def test_status_shows_restarts_last_exit_and_health(
    tmp_path: Path, listening: int, capsys: pytest.CaptureFixture[str]
) -> None:
    write_state(tmp_path, f"127.0.0.1:{listening}")
    settings = StackSettings(dir=tmp_path)
    assert stack.status(settings, as_json=True) == 0
    tansu = json.loads(capsys.readouterr().out)["units"]["tansu"]
    assert (tansu["restarts"], tansu["health"]) == (2, "accepting")
    assert stack.status(settings) == 0
    table = capsys.readouterr().out
    assert "RESTARTS" in table and "tansu" in table
    assert "tansu: last exit: killed by SIGKILL" in table


def test_status_of_a_stack_that_is_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert stack.status(StackSettings(dir=tmp_path), as_json=True) == stack.EXIT_NOT_UP
    assert json.loads(capsys.readouterr().out) == {"up": False}


def test_up_when_already_up_says_so_and_shows_status(
    tmp_path: Path, listening: int, capsys: pytest.CaptureFixture[str]
) -> None:
    write_state(tmp_path, f"127.0.0.1:{listening}")
    assert stack.up(StackSettings(dir=tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.startswith("the stack is already up")
    assert "tansu" in out and "accepting" in out


def test_logs_tails_one_service_or_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "logs").mkdir()
    lines = "\n".join(f"line {i}" for i in range(100))
    (tmp_path / "logs" / "trigger-reversal.log").write_text(lines)
    (tmp_path / "supervisor.log").write_text("supervisor says hi\n")
    settings = StackSettings(dir=tmp_path)
    assert stack.logs(settings, "trigger-reversal", lines=3) == 0
    assert capsys.readouterr().out == "line 97\nline 98\nline 99\n"
    assert stack.logs(settings) == 0
    everything = capsys.readouterr().out
    assert "==> supervisor" in everything and "==> trigger-reversal" in everything
    assert "==> tansu" not in everything  # no such log yet
    assert stack.logs(settings, "nope") == 2
