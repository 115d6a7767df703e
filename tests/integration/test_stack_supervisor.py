"""`make up`'s stack as users run it (`python -m modelguard.services.stack up`, on free
ports here): a service SIGKILLed mid-audit is restarted by the supervisor, `status` shows
the new pid and the restart, and the audit still finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelguard.localstack import free_grpc_pair, free_port, tansu_binary, venv_bin
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.services.audit_client import AuditClient
from tests.conftest import MNIST_SPEC, InfectedModel
from tests.requirements import SEAWEEDFS, TANSU, require_file

pytestmark = pytest.mark.integration

AUDIT_SERVICES = ("pruning-orchestrator", "trigger-reversal", "neuron-scoring", "leak-detector")
KILLED = "trigger-reversal"


def stack_command(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "modelguard.services.stack", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"stack {args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def units(env: dict[str, str]) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(stack_command(env, "status", "--json"))
    assert reply["up"]
    return dict(reply["units"])


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A supervised stack of the four audit services, started and stopped as users do."""
    require_file(venv_bin("weed"), SEAWEEDFS)
    require_file(tansu_binary(), TANSU)
    directory: Path = tmp_path_factory.mktemp("stack")
    env = {
        **os.environ,
        "MODELGUARD_STACK_DIR": str(directory),
        "MODELGUARD_STACK_KAFKA_PORT": str(free_port()),
        "MODELGUARD_STACK_S3_PORT": str(free_grpc_pair(set())),
        "MODELGUARD_STACK_PROMETHEUS": "false",
        "MODELGUARD_STACK_SERVICES": ",".join(AUDIT_SERVICES),
        "MODELGUARD_STACK_RESTART_INITIAL_SECONDS": "0.5",
        "MODELGUARD_JOB_MAX_ATTEMPTS": "3",
        "MODELGUARD_TRIGGER_REVERSAL_CLEAN_SAMPLES": "300",
        "MODELGUARD_NEURON_SCORING_SHAPLEY": "false",
    }
    for name in AUDIT_SERVICES:
        prefix = "MODELGUARD_" + name.upper().replace("-", "_")
        env[prefix + "_GRPC_PORT"] = str(free_port())
        env[prefix + "_METRICS_PORT"] = str(free_port())
    stack_command(env, "up", timeout=600)
    try:
        yield env
    finally:
        stack_command(env, "down")
        assert not (directory / "state.json").exists()


def test_a_killed_service_is_restarted_and_the_audit_finishes(
    stack_env: dict[str, str], infected_lenet: InfectedModel
) -> None:
    before = units(stack_env)
    assert {before[name]["state"] for name in before} == {"running"}
    assert before[KILLED]["health"] == "SERVING" and before[KILLED]["restarts"] == 0
    old_pid = before[KILLED]["pid"]

    # `make up` again while up: says so, shows the status, changes nothing
    assert stack_command(stack_env, "up").startswith("the stack is already up")
    assert units(stack_env)[KILLED]["pid"] == old_pid

    with AuditClient(before["pruning-orchestrator"]["address"], timeout=60) as client:
        audit_id = client.submit(
            infected_lenet.weights_path,
            infected_lenet.clean_npz_path,
            MNIST_SPEC,
            arch="lenet5",
            options=jobs_pb2.AuditOptions(reversal_steps=300, skip_repair=True, seed=0),
            idempotency_key=uuid.uuid4().hex,
        ).audit_id
        for audit in client.watch(audit_id):
            stages = {stage.stage: stage.state for stage in audit.stages}
            if stages[KILLED] == common_pb2.STAGE_STATE_RUNNING:
                os.killpg(old_pid, signal.SIGKILL)  # a crash mid-optimisation
                break

        deadline = time.monotonic() + 120
        while True:
            after = units(stack_env)[KILLED]
            if after["state"] == "running" and after["health"] == "SERVING":
                break
            assert time.monotonic() < deadline, f"{KILLED} not restarted: {after}"
            time.sleep(0.5)  # poll interval of `status`
        assert after["pid"] != old_pid
        assert after["restarts"] == 1
        assert after["last_exit"] == "killed by SIGKILL"

        final = list(client.watch(audit_id))[-1]
        assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final
        reversal = {stage.stage: stage for stage in final.stages}[KILLED]
        assert reversal.state == common_pb2.STAGE_STATE_DONE

    # the restart is in the supervisor's log, and `logs` shows the service's own log
    supervisor_log = stack_command(stack_env, "logs", "supervisor", "-n", "200")
    assert f"{KILLED} killed by SIGKILL" in supervisor_log
    assert f"{KILLED} restarted" in supervisor_log
    assert stack_command(stack_env, "logs", KILLED).strip()
