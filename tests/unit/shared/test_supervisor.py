"""The supervisor's restart policy, and the supervisor restarting real (tiny) processes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from modelguard.supervisor import BackoffPolicy, Supervisor, UnitStatus, describe_exit


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap() -> None:
    policy = BackoffPolicy(initial_seconds=1.0, factor=2.0, max_seconds=10.0)
    assert [policy.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.delay(10_000) == 10.0  # a long crash loop neither overflows nor grows


def test_backoff_resets_after_the_process_stayed_up() -> None:
    policy = BackoffPolicy(reset_after_seconds=60.0)
    assert policy.failures_after_exit(4, uptime_seconds=5.0) == 5
    assert policy.failures_after_exit(4, uptime_seconds=60.0) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_seconds": -1.0},
        {"initial_seconds": 5.0, "max_seconds": 1.0},
        {"factor": 0.5},
        {"reset_after_seconds": 0.0},
        {"crash_loop_after": 0},
    ],
)
def test_backoff_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)  # type: ignore[arg-type]


def test_exit_descriptions() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(70) == "exit status 70"


class ScriptUnit:
    """A real process running ``code``; ready as soon as it is spawned."""

    def __init__(self, name: str, code: str) -> None:
        self.name = name
        self.code = code
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        self.starts += 1
        self.process = subprocess.Popen([sys.executable, "-c", self.code])

    def poll(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)  # poll interval


FAST = BackoffPolicy(initial_seconds=0.1, max_seconds=0.4, reset_after_seconds=30.0)
SLEEPER = "import time; time.sleep(60)"


def test_a_killed_process_is_restarted_with_a_new_pid() -> None:
    unit = ScriptUnit("sleeper", SLEEPER)
    changes: list[dict[str, UnitStatus]] = []
    supervisor = Supervisor([unit], FAST, on_change=changes.append, poll_seconds=0.05)
    supervisor.start()
    try:
        first_pid = supervisor.snapshot()["sleeper"].pid
        assert first_pid == unit.pid
        assert unit.process is not None
        unit.process.kill()
        wait_for(lambda: supervisor.snapshot()["sleeper"].restarts == 1)
        wait_for(lambda: supervisor.snapshot()["sleeper"].state == "running")
        status = supervisor.snapshot()["sleeper"]
        assert status.pid is not None and status.pid != first_pid
        assert status.last_exit == "killed by SIGKILL"
        assert status.consecutive_failures == 1
        # the backoff was reported before the restart
        assert any(change["sleeper"].state == "backoff" for change in changes)
    finally:
        supervisor.stop()
    assert supervisor.snapshot()["sleeper"].state == "stopped"
    assert unit.poll() is not None


def test_a_crash_loop_is_reported_and_backs_off() -> None:
    unit = ScriptUnit("crasher", "import sys; sys.exit(3)")
    policy = BackoffPolicy(
        initial_seconds=0.05, max_seconds=0.2, reset_after_seconds=30.0, crash_loop_after=3
    )
    supervisor = Supervisor([unit], policy, poll_seconds=0.02)
    supervisor.start()
    try:
        wait_for(lambda: supervisor.snapshot()["crasher"].state == "crash-loop")
        status = supervisor.snapshot()["crasher"]
        assert status.consecutive_failures >= 3
        assert status.last_exit == "exit status 3"
        assert status.next_start_at is not None
        assert status.restarts >= 2
    finally:
        supervisor.stop()


def test_a_unit_that_cannot_start_stops_those_started_before() -> None:
    class Broken(ScriptUnit):
        def start(self) -> None:
            raise RuntimeError("no binary")

    first = ScriptUnit("first", SLEEPER)
    supervisor = Supervisor([first, Broken("second", SLEEPER)], FAST)
    with pytest.raises(RuntimeError, match="no binary"):
        supervisor.start()
    assert first.poll() is not None  # stopped, not left behind


def test_parallel_units_start_after_the_ordered_ones() -> None:
    units = [ScriptUnit(name, SLEEPER) for name in ("store", "a", "b")]
    supervisor = Supervisor(units, FAST)
    supervisor.start(parallel=["a", "b"])
    try:
        assert all(unit.starts == 1 and unit.poll() is None for unit in units)
        assert {s.state for s in supervisor.snapshot().values()} == {"running"}
    finally:
        supervisor.stop()
