"""Model stealing against carrier serving (the reference stealing experiment) and a detector that
rotates a user's carrier when its queries look like extraction.

**Threat model (the reference method's).** The attacker holds everything a device holds: the public
model ``f``, the carrier ``c`` and a valid credential. They embed inputs of their own,
run ``f`` locally and query the server's mapper ``mf`` for labels, then train a
*substitute* mapper on (pseudo-output, label) pairs. With the substitute, ``f`` and ``c``
they own a working classifier. Rotating the carrier (new natural image, new ``p``, new
``mf``, new credential) revokes the server side and makes the substitute useless on the
new carrier — but the substitute **still works with the old carrier the attacker kept**.
Rotation therefore bounds what is stolen by *what was learned before it*, which is why the
detector below exists: the figure that matters is the substitute's accuracy at the moment
of rotation.

**Detector.** Per user and carrier generation, O(1) memory, a few µs per query batch:

- ``rate``: rows in a tumbling window above ``max_rows_per_window`` (devices classify at
  human speed; the reference method's attacker sent 10,000 queries);
- ``budget``: rows on one carrier generation above ``max_rows_per_generation`` — a hard
  cap on the substitute's training set whatever the pace (a slow attacker is rotated too;
  for a heavy legitimate user this is a scheduled, invisible rotation);
- ``off-distribution``: the queries' pseudo-outputs do not look like legitimate traffic
  (Mahalanobis distance in the carrier's principal subspace plus the residual energy,
  calibrated on held-out task inputs embedded in the carrier): too many single outliers
  (``max_ood_fraction``) or a mean score several times the legitimate mean
  (``max_mean_score_ratio``). Attackers without task data (surrogate data sets, noise,
  synthetic probing as in Papernot et al. 2017 / PRADA, Juuti et al. 2019) send such
  queries.

An alarm fires once per (user, generation) through ``on_alarm``; the service answers it by
requesting a new carrier generation and revoking the old one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from modelguard.errors import InvalidInput

from .query_profile import QueryProfile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectorConfig:
    #: Tumbling window for the rate rule, seconds.
    window_s: float = 3600.0
    #: Rows one user may map per window before the rate rule fires.
    max_rows_per_window: int = 500
    #: Rows one carrier generation may map before it is rotated (0: no budget).
    max_rows_per_generation: int = 2000
    #: Off-distribution rule, after at least ``min_rows_for_ood`` rows of a generation:
    #: fires when the share of outlying rows exceeds ``max_ood_fraction`` or the rows'
    #: mean profile score exceeds ``max_mean_score_ratio`` × the legitimate mean.
    max_ood_fraction: float = 0.2
    max_mean_score_ratio: float = 2.0
    min_rows_for_ood: int = 50

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.max_rows_per_window < 1:
            raise InvalidInput("window_s > 0 and max_rows_per_window >= 1 are required")
        if self.max_rows_per_generation < 0 or self.min_rows_for_ood < 1:
            raise InvalidInput("max_rows_per_generation >= 0 and min_rows_for_ood >= 1")
        if not 0 < self.max_ood_fraction <= 1 or self.max_mean_score_ratio <= 1:
            raise InvalidInput("0 < max_ood_fraction <= 1 and max_mean_score_ratio > 1 required")


@dataclass(frozen=True)
class Alarm:
    user_id: str
    generation: int
    reason: str  # rate | budget | off-distribution
    detail: str
    rows_on_generation: int
    at: float


@dataclass
class _UserState:
    generation: int
    rows: int = 0
    outlying: int = 0
    score_sum: float = 0.0
    window_start: float = 0.0
    window_rows: int = 0
    alarmed: bool = False


class ExtractionDetector:
    """Implements ``modelguard.carrier.mapper_registry.QueryObserver``. ``profiles``
    returns the user's `QueryProfile` for a generation (None: no off-distribution rule)."""

    def __init__(
        self,
        config: DetectorConfig = DetectorConfig(),
        *,
        profiles: Callable[[str, int], QueryProfile | None] | None = None,
        on_alarm: Callable[[Alarm], None] | None = None,
    ) -> None:
        self.config = config
        self.profiles = profiles
        self.on_alarm = on_alarm
        self.alarms: list[Alarm] = []
        self._state: dict[str, _UserState] = {}
        self._lock = threading.Lock()

    def observe(
        self, user_id: str, generation: int, pseudo: np.ndarray, labels: np.ndarray, now: float
    ) -> None:
        cfg = self.config
        rows = len(pseudo)
        profile = self.profiles(user_id, generation) if self.profiles is not None else None
        outlying, score_sum = 0, 0.0
        if profile is not None:
            if rows == 1:  # the usual call: plain floats, no reductions over one value
                score_sum = profile.score_one(pseudo[0])
                outlying = int(score_sum > profile.threshold)
            else:
                scores = profile.scores(pseudo)
                outlying = int((scores > profile.threshold).sum())
                score_sum = float(scores.sum())
        alarm: Alarm | None = None
        with self._lock:
            state = self._state.get(user_id)
            if state is None or state.generation != generation:
                state = self._state[user_id] = _UserState(generation, window_start=now)
            if now - state.window_start >= cfg.window_s:
                state.window_start, state.window_rows = now, 0
            state.rows += rows
            state.window_rows += rows
            state.outlying += outlying
            state.score_sum += score_sum
            if state.alarmed:
                return
            reason = detail = ""
            if state.window_rows > cfg.max_rows_per_window:
                reason = "rate"
                detail = f"{state.window_rows} rows within {cfg.window_s:g} s"
            elif cfg.max_rows_per_generation and state.rows > cfg.max_rows_per_generation:
                reason = "budget"
                detail = f"{state.rows} rows on generation {generation}"
            elif profile is not None and state.rows >= cfg.min_rows_for_ood:
                ratio = state.score_sum / state.rows / profile.mean_score
                if state.outlying > cfg.max_ood_fraction * state.rows:
                    reason = "off-distribution"
                    detail = f"{state.outlying}/{state.rows} rows outside the carrier's profile"
                elif ratio > cfg.max_mean_score_ratio:
                    reason = "off-distribution"
                    detail = f"mean profile score {ratio:.1f}× that of legitimate queries"
            if reason:
                state.alarmed = True
                alarm = Alarm(user_id, generation, reason, detail, state.rows, now)
                self.alarms.append(alarm)
        if alarm is not None:
            log.warning(
                "extraction alarm for %s/%d: %s (%s)",
                user_id,
                generation,
                alarm.reason,
                alarm.detail,
            )
            if self.on_alarm is not None:
                self.on_alarm(alarm)
