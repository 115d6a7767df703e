"""Per-user resource limits of result-mapper: a request rate (token bucket) and a query
budget (rows per period). Separate from the extraction detector
(`modelguard.carrier.extraction`), which *revokes* a carrier whose queries look
like model stealing: these limits only refuse a call, with RESOURCE_EXHAUSTED, a clear
message and a retry hint, so that one user cannot starve the others or run up costs.

They are applied after the caller's credential is checked (a stranger cannot spend a
user's rate or budget) and after the request is validated (a malformed call costs
nothing). State is per replica and in memory; with N replicas behind a balancer a user
gets up to N times the rate, which is the usual trade-off for not adding a shared store
to the latency-critical path.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from modelguard.errors import InvalidInput, ResourceExhausted

#: Users whose state is kept at most; beyond it, idle users with full buckets and no
#: budget spent are forgotten first (forgetting them changes nothing).
MAX_TRACKED_USERS = 100_000


@dataclass(frozen=True)
class LimitsConfig:
    #: Map calls per second a user may sustain (0: no rate limit).
    rate_per_second: float = 100.0
    #: Calls a user may make at once above the rate (bucket size).
    burst: int = 200
    #: Rows a user may map per period (0: no budget).
    budget_rows: int = 200_000
    budget_period_s: float = 86_400.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_second) and self.rate_per_second >= 0):
            raise InvalidInput("rate_per_second must be >= 0")
        if self.rate_per_second > 0 and self.burst < 1:
            raise InvalidInput("burst must be >= 1")
        if self.budget_rows < 0 or not self.budget_period_s > 0:
            raise InvalidInput("budget_rows must be >= 0 and budget_period_s > 0")


@dataclass
class _UserState:
    tokens: float
    refilled_at: float
    window_start: float
    rows_used: int = 0


class UserLimits:
    """Thread-safe; ``clock`` is injectable (monotonic seconds) for tests."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._users: dict[str, _UserState] = {}

    @property
    def enabled(self) -> bool:
        return self.config.rate_per_second > 0 or self.config.budget_rows > 0

    def admit(self, user_id: str, rows: int) -> None:
        """Charge one call and ``rows`` rows to ``user_id``, or raise ResourceExhausted
        (charging nothing) when either limit would be exceeded."""
        if not self.enabled:
            return
        c = self.config
        now = self.clock()
        with self._lock:
            state = self._users.get(user_id)
            if state is None:
                if len(self._users) >= MAX_TRACKED_USERS:
                    self._forget_idle(now)
                state = self._users[user_id] = _UserState(float(c.burst), now, now)
            if c.rate_per_second > 0:
                state.tokens = min(
                    float(c.burst), state.tokens + (now - state.refilled_at) * c.rate_per_second
                )
                state.refilled_at = now
            if c.budget_rows > 0 and now - state.window_start >= c.budget_period_s:
                state.window_start, state.rows_used = now, 0
            if c.rate_per_second > 0 and state.tokens < 1.0:
                wait = (1.0 - state.tokens) / c.rate_per_second
                raise ResourceExhausted(
                    f"rate limit: user {user_id!r} may make {c.rate_per_second:g} Map calls "
                    f"per second (bursts of {c.burst}); retry in {wait:.2f} s, or send more "
                    "rows per call",
                    retry_after=wait,
                )
            if c.budget_rows > 0 and state.rows_used + rows > c.budget_rows:
                renew = state.window_start + c.budget_period_s - now
                raise ResourceExhausted(
                    f"query budget spent: user {user_id!r} mapped {state.rows_used} of "
                    f"{c.budget_rows} rows allowed per {c.budget_period_s:g} s (this call asks "
                    f"for {rows}); the budget renews in {renew:.0f} s",
                    retry_after=renew,
                )
            if c.rate_per_second > 0:
                state.tokens -= 1.0
            state.rows_used += rows

    def usage(self, user_id: str) -> tuple[float, int]:
        """(tokens left, rows used in the current period), for tests and status."""
        with self._lock:
            state = self._users.get(user_id)
            return (
                (float(self.config.burst), 0)
                if state is None
                else (
                    state.tokens,
                    state.rows_used,
                )
            )

    def _forget_idle(self, now: float) -> None:
        """Under the lock: drop users whose state equals a fresh one."""
        c = self.config
        for user, state in list(self._users.items()):
            refilled = state.tokens + (now - state.refilled_at) * c.rate_per_second
            full = c.rate_per_second <= 0 or refilled >= c.burst
            renewed = c.budget_rows <= 0 or now - state.window_start >= c.budget_period_s
            if full and (renewed or state.rows_used == 0):
                del self._users[user]
        if len(self._users) >= MAX_TRACKED_USERS:  # all busy: bounded memory wins
            self._users.clear()
