"""Keep processes running the way Kubernetes keeps containers running: a process that
exits is started again after an exponential backoff (capped), the backoff is forgotten
once the process has stayed up a while, and a process that keeps failing is reported as
being in a crash loop rather than silently retried.

The supervisor knows nothing of what it runs: a `Unit` starts (returning once ready or
raising), stops, and reports its exit status. One watcher thread per unit, so a slow
restart of one never delays another's.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

log = logging.getLogger(__name__)

UnitState = Literal["starting", "running", "backoff", "crash-loop", "stopped"]


@dataclass(frozen=True)
class BackoffPolicy:
    """Restart delays: ``initial_seconds * factor**(n - 1)`` after the n-th consecutive
    failure, at most ``max_seconds``. A process that stayed up ``reset_after_seconds``
    starts afresh at ``initial_seconds``; ``crash_loop_after`` consecutive failures mark it
    as crash-looping (Kubernetes: 10 s doubling to 300 s, reset after 10 min running)."""

    initial_seconds: float = 1.0
    factor: float = 2.0
    max_seconds: float = 60.0
    reset_after_seconds: float = 60.0
    crash_loop_after: int = 3

    def __post_init__(self) -> None:
        if self.initial_seconds < 0 or self.max_seconds < self.initial_seconds:
            raise ValueError("need 0 <= initial_seconds <= max_seconds")
        if self.factor < 1:
            raise ValueError("factor must be >= 1")
        if self.reset_after_seconds <= 0 or self.crash_loop_after < 1:
            raise ValueError("reset_after_seconds must be > 0 and crash_loop_after >= 1")

    def delay(self, consecutive_failures: int) -> float:
        """Seconds to wait before the restart that follows ``consecutive_failures`` (>= 1)."""
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures counts from 1")
        # the exponent is bounded so a long crash loop never overflows a float
        exponent = min(consecutive_failures - 1, 64)
        return float(min(self.initial_seconds * self.factor**exponent, self.max_seconds))

    def failures_after_exit(self, consecutive_failures: int, uptime_seconds: float) -> int:
        """The consecutive-failure count once a process that ran ``uptime_seconds`` exits."""
        if uptime_seconds >= self.reset_after_seconds:
            return 1
        return consecutive_failures + 1


class Unit(Protocol):
    """A supervised process."""

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None:
        """Start the process and return once it is ready; raise when it cannot start (a
        process left running by a failed start is stopped by the supervisor)."""

    def poll(self) -> int | None:
        """The exit status once the process has exited, None while it runs."""

    def stop(self) -> None:
        """Stop the process (gracefully, then by force)."""


@dataclass
class UnitStatus:
    """What `make status` shows of one unit."""

    state: UnitState = "starting"
    pid: int | None = None
    up_since: float | None = None  # epoch seconds of the last successful start
    restarts: int = 0
    consecutive_failures: int = 0
    last_exit: str = ""  # "exit status 1", "killed by SIGKILL", "failed to start: ..."
    next_start_at: float | None = None  # epoch seconds, while waiting to restart

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def describe_exit(returncode: int) -> str:
    """``-9`` -> ``"killed by SIGKILL"``, ``1`` -> ``"exit status 1"``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Supervisor:
    """Starts ``units`` in order, then restarts any that exits until `stop`.

    ``on_change`` receives a snapshot of every unit's status whenever one changes (the
    stack writes it to its state file for `make status`)."""

    def __init__(
        self,
        units: Iterable[Unit],
        policy: BackoffPolicy | None = None,
        *,
        on_change: Callable[[dict[str, UnitStatus]], None] | None = None,
        poll_seconds: float = 0.2,
    ) -> None:
        self.units = {unit.name: unit for unit in units}
        self.policy = policy or BackoffPolicy()
        self.poll_seconds = poll_seconds
        self._on_change = on_change
        self._status = {name: UnitStatus() for name in self.units}
        self._lock = threading.Lock()
        self._notify_lock = threading.Lock()  # one on_change at a time, in order
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def snapshot(self) -> dict[str, UnitStatus]:
        with self._lock:
            return {name: UnitStatus(**asdict(status)) for name, status in self._status.items()}

    def start(self, parallel: Iterable[str] = ()) -> None:
        """Start every unit and begin watching. Units are started in order (a later one may
        need an earlier one), except those named in ``parallel``, which start together
        once the others are up. Raises (after stopping what started) when one cannot
        start: a stack that never came up is not supervised."""
        together = [name for name in self.units if name in set(parallel)]
        try:
            for name in self.units:
                if name not in together:
                    self._first_start(name)
            errors: list[BaseException] = []
            threads = [
                threading.Thread(target=self._first_start, args=(name, errors), daemon=True)
                for name in together
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
        except BaseException:
            self.stop()
            raise
        for name in self.units:
            thread = threading.Thread(target=self._watch, args=(name,), name=f"watch-{name}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop watching, then stop the units in reverse start order."""
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        for name, unit in reversed(self.units.items()):
            unit.stop()
            self._update(name, state="stopped", pid=None, next_start_at=None)
            log.info("stopped %s", name)

    def _first_start(self, name: str, errors: list[BaseException] | None = None) -> None:
        unit = self.units[name]
        try:
            unit.start()
        except BaseException as err:
            if errors is None:
                raise
            errors.append(err)
            return
        self._update(name, state="running", pid=unit.pid, up_since=time.time())
        log.info("%s running (pid %s)", name, unit.pid)

    def _watch(self, name: str) -> None:
        unit = self.units[name]
        while not self._stopping.wait(self.poll_seconds):
            returncode = unit.poll()
            if returncode is None:
                continue
            status = self.snapshot()[name]
            uptime = time.time() - (status.up_since or time.time())
            failures = self.policy.failures_after_exit(status.consecutive_failures, uptime)
            self._restart_after_failure(name, unit, describe_exit(returncode), failures)

    def _restart_after_failure(self, name: str, unit: Unit, why: str, failures: int) -> None:
        """Back off, then start ``unit`` again; keep backing off while starts fail."""
        while not self._stopping.is_set():
            delay = self.policy.delay(failures)
            crash_loop = failures >= self.policy.crash_loop_after
            self._update(
                name,
                state="crash-loop" if crash_loop else "backoff",
                pid=None,
                consecutive_failures=failures,
                last_exit=why,
                next_start_at=time.time() + delay,
            )
            report = log.error if crash_loop else log.warning
            report(
                "%s %s%s; restarting in %.1f s (failure %d in a row)",
                name,
                why,
                " (crash loop)" if crash_loop else "",
                delay,
                failures,
            )
            if self._stopping.wait(delay):
                return
            restarts = self.snapshot()[name].restarts + 1
            self._update(name, state="starting", restarts=restarts, next_start_at=None)
            try:
                unit.start()
            except Exception as err:
                unit.stop()  # whatever a failed start left running
                why = f"failed to start: {err}"
                failures += 1
                continue
            self._update(name, state="running", pid=unit.pid, up_since=time.time())
            log.info("%s restarted (pid %s, restart %d)", name, unit.pid, restarts)
            return

    def _update(self, name: str, **fields: object) -> None:
        with self._lock:
            status = self._status[name]
            for key, value in fields.items():
                setattr(status, key, value)
        if self._on_change is not None:
            with self._notify_lock:
                self._on_change(self.snapshot())
