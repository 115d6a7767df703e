"""AuditClient.watch across orchestrator restarts: it reconnects when the stream breaks
(UNAVAILABLE, CANCELLED) or ends before the audit is final, does not repeat an update,
and gives up with `Unavailable` after its timeout. The stub is scripted; the real
restart is in tests/integration/test_fault_injection.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

import modelguard.services.audit_client as audit_client
from modelguard.errors import NotFound, Unavailable
from modelguard.proto.modelguard.v1 import common_pb2, pruning_orchestrator_pb2
from modelguard.services.audit_client import AuditClient


class _Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name.lower()


def _audit(state: int, progress: float = 0.0) -> pruning_orchestrator_pb2.Audit:
    audit = pruning_orchestrator_pb2.Audit(audit_id="a1", state=state)  # type: ignore[arg-type]
    audit.stages.add(stage="trigger-reversal", progress=progress)
    return audit


QUEUED = _audit(common_pb2.JOB_STATE_QUEUED)
RUNNING = _audit(common_pb2.JOB_STATE_RUNNING, 0.5)
DONE = _audit(common_pb2.JOB_STATE_SUCCEEDED, 1.0)


class _Stub:
    """Each WatchAudit call plays the next script: updates, then an optional error."""

    def __init__(self, scripts: list[tuple[list[Any], grpc.StatusCode | None]]) -> None:
        self.scripts = scripts
        self.calls = 0

    def WatchAudit(self, request: Any) -> Iterator[Any]:
        updates, error = self.scripts[self.calls]
        self.calls += 1

        def stream() -> Iterator[Any]:
            yield from updates
            if error is not None:
                raise _Error(error)

        return stream()


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[AuditClient]:
    monkeypatch.setattr(audit_client, "RECONNECT_INITIAL_S", 0.001)
    monkeypatch.setattr(audit_client, "RECONNECT_MAX_S", 0.002)
    with AuditClient("127.0.0.1:1", timeout=5) as c:
        yield c


def test_reconnects_after_a_crash_and_a_graceful_stop_without_repeating(
    client: AuditClient,
) -> None:
    stub = _Stub(
        [
            ([QUEUED, RUNNING], grpc.StatusCode.UNAVAILABLE),  # SIGKILL: the socket closes
            ([], grpc.StatusCode.UNAVAILABLE),  # restarting: connection refused
            ([RUNNING], None),  # SIGTERM: the stream ends cleanly, not final
            ([RUNNING], grpc.StatusCode.CANCELLED),  # the server cancelled the stream
            ([RUNNING, DONE], None),
        ]
    )
    client.stub = stub  # type: ignore[assignment]
    updates = list(client.watch("a1"))
    assert updates == [QUEUED, RUNNING, DONE]
    assert stub.calls == 5


def test_other_errors_are_raised_at_once(client: AuditClient) -> None:
    client.stub = _Stub([([], grpc.StatusCode.NOT_FOUND)])  # type: ignore[assignment]
    with pytest.raises(NotFound):
        list(client.watch("a1"))


def test_gives_up_after_the_timeout_without_a_stream(
    client: AuditClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter(range(0, 1000, 2))  # every look at the clock: 2 s later
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    client.stub = _Stub([([], grpc.StatusCode.UNAVAILABLE)] * 10)  # type: ignore[assignment]
    with pytest.raises(Unavailable, match="no stream from the orchestrator for 5 s"):
        list(client.watch("a1"))
