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
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from shared.datasets import Dataset
from shared.errors import InvalidInput, ModelGuardError

from .carrier import Carrier, MappingNetwork, pseudo_outputs
from .public_models import PublicModel

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- query profile


@dataclass(frozen=True)
class QueryProfile:
    """What legitimate pseudo-outputs of one carrier look like.

    ``score(z) = ‖Λ^{-1/2} Vᵀ (z − μ)‖² + ‖(I − V Vᵀ)(z − μ)‖² / λ_res`` with ``V`` the top
    ``rank`` principal directions (eigenvalues ``Λ``) of held-out legitimate pseudo-outputs
    and ``λ_res`` the mean of the remaining eigenvalues. ``threshold`` is the
    ``quantile`` of the calibration samples' own scores times ``margin`` (per-query
    outliers); ``mean_score`` their average (a stream of queries whose average score is
    several times that comes from elsewhere, even when few single queries are outliers).
    """

    mean: np.ndarray  # (K,)
    components: np.ndarray  # (K, r)
    scales: np.ndarray  # (r,) 1 / sqrt(eigenvalue)
    residual_scale: float  # 1 / mean residual eigenvalue (0 when r == K)
    threshold: float
    #: Mean score of the calibration samples: legitimate traffic averages about this.
    mean_score: float = 1.0

    @classmethod
    def fit(
        cls, samples: np.ndarray, *, rank: int = 32, quantile: float = 0.995, margin: float = 1.5
    ) -> QueryProfile:
        """``samples`` ``(N, K)``: legitimate pseudo-outputs (N > K is best)."""
        x = np.asarray(samples, dtype=np.float64)
        if x.ndim != 2 or len(x) < 10:
            raise InvalidInput(f"a query profile needs (N >= 10, K) samples; got {x.shape}")
        mean = x.mean(axis=0)
        centred = x - mean
        cov = centred.T @ centred / (len(x) - 1)
        eigenvalues, eigenvectors = np.linalg.eigh(cov)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        floor = max(float(eigenvalues[0]) * 1e-6, 1e-9)
        r = min(rank, x.shape[1], len(x) - 1)
        top = np.maximum(eigenvalues[:r], floor)
        rest = eigenvalues[r:]
        residual_scale = 1.0 / max(float(rest.mean()), floor) if len(rest) else 0.0
        profile = cls(
            mean.astype(np.float32),
            eigenvectors[:, :r].astype(np.float32),
            (1.0 / np.sqrt(top)).astype(np.float32),
            residual_scale,
            math.inf,
        )
        scores = profile.scores(x.astype(np.float32))
        threshold = float(np.quantile(scores, quantile)) * margin
        return cls(
            profile.mean,
            profile.components,
            profile.scales,
            residual_scale,
            threshold,
            max(float(scores.mean()), 1e-9),
        )

    def scores(self, z: np.ndarray) -> np.ndarray:
        """``(N, K)`` → ``(N,)`` outlyingness (larger: further from legitimate traffic)."""
        centred = np.asarray(z, dtype=np.float32) - self.mean
        projected = centred @ self.components
        score = ((projected * self.scales) ** 2).sum(axis=1)
        if self.residual_scale:
            residual = centred - projected @ self.components.T
            score += (residual**2).sum(axis=1) * self.residual_scale
        return score  # type: ignore[no-any-return]

    def score_one(self, z: np.ndarray) -> float:
        """The score of one row ``(K,)``, as `scores` gives it for ``z[None]``."""
        return float(self.scores(z[None])[0])

    def outliers(self, z: np.ndarray) -> np.ndarray:
        flags: np.ndarray = self.scores(z) > self.threshold
        return flags

    def to_dict(self) -> dict[str, object]:
        return {
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "scales": self.scales.tolist(),
            "residual_scale": self.residual_scale,
            "threshold": self.threshold,
            "mean_score": self.mean_score,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> QueryProfile:
        return cls(
            np.asarray(data["mean"], dtype=np.float32),
            np.asarray(data["components"], dtype=np.float32),
            np.asarray(data["scales"], dtype=np.float32),
            float(data["residual_scale"]),  # type: ignore[arg-type]
            float(data["threshold"]),  # type: ignore[arg-type]
            float(data.get("mean_score", 1.0)),  # type: ignore[arg-type]
        )


# -------------------------------------------------------------------------------- detector


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
    """Implements ``shared.carrier.mapper_registry.QueryObserver``. ``profiles``
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


# --------------------------------------------------------------------- stealing simulation

#: The attacker's query interface: pseudo-outputs ``(rows, K)`` → labels ``(rows,)``.
#: Raises a ``ModelGuardError`` (e.g. NotFound after a rotation) when refused.
Oracle = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class StealingConfig:
    """The reference method's attacker: rounds of ``queries_per_round`` queries (200 × 50 =
    10,000)."""

    rounds: int = 200
    queries_per_round: int = 50
    hidden: int = 64
    steps_per_round: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    #: Evaluate the substitute every this many rounds.
    eval_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.rounds, self.queries_per_round, self.steps_per_round, self.batch_size) < 1:
            raise InvalidInput("rounds, queries_per_round, steps_per_round, batch_size >= 1")
        if self.lr <= 0 or self.eval_every < 1 or self.hidden < 0:
            raise InvalidInput("lr > 0, eval_every >= 1 and hidden >= 0 are required")


@dataclass(frozen=True)
class CurvePoint:
    queries: int
    #: Substitute accuracy per evaluation carrier name (e.g. "stolen", "rotated").
    accuracy: dict[str, float]


@dataclass(frozen=True)
class StealingResult:
    curve: tuple[CurvePoint, ...]
    queries: int  # answered queries
    refused: str  # why querying stopped early ("" if it did not)
    substitute: MappingNetwork


def simulate_stealing(
    config: StealingConfig,
    public_model: PublicModel,
    carrier: Carrier,
    attacker_inputs: torch.Tensor,
    oracle: Oracle,
    eval_data: Dataset,
    eval_carriers: dict[str, Carrier],
    classes: int,
    *,
    before_round: Callable[[int], None] | None = None,
) -> StealingResult:
    """Train a substitute mapper by querying ``oracle`` with pseudo-outputs of
    ``attacker_inputs`` ``(M, C, h, w)`` embedded in the stolen ``carrier``.

    Every ``eval_every`` rounds (and at the end) the substitute is scored on ``eval_data``
    through each carrier of ``eval_carriers``: the stolen one measures what the attacker
    owns, a rotated one what the substitute is worth against the live system.
    ``before_round(r)`` lets a simulation advance its clock or rotate.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    substitute = MappingNetwork(public_model.output_dim, classes, config.hidden)
    optimiser = torch.optim.Adam(substitute.parameters(), lr=config.lr)
    order = torch.randperm(len(attacker_inputs), generator=generator)
    # the attacker standardises its substitute's inputs as the owner does: pseudo-outputs
    # cost it no query (it holds the public model and the carrier)
    substitute.standardise(
        pseudo_outputs(
            public_model, attacker_inputs[order[:2000]], carrier.image, carrier.placement
        )
    )
    eval_scores = {
        name: pseudo_outputs(public_model, eval_data.x, c.image, c.placement)
        for name, c in eval_carriers.items()
    }
    known_x: list[torch.Tensor] = []
    known_y: list[torch.Tensor] = []
    curve: list[CurvePoint] = []
    queries, refused = 0, ""

    def evaluate() -> None:
        substitute.eval()
        with torch.no_grad():
            accuracy = {
                name: float((substitute(z).argmax(1) == eval_data.y).float().mean())
                for name, z in eval_scores.items()
            }
        substitute.train()
        curve.append(CurvePoint(queries, accuracy))

    evaluate()
    for round_ in range(config.rounds):
        start = round_ * config.queries_per_round
        if start >= len(order):
            refused = "attacker ran out of inputs"
            break
        if before_round is not None:
            before_round(round_)
        batch = attacker_inputs[order[start : start + config.queries_per_round]]
        z = pseudo_outputs(public_model, batch, carrier.image, carrier.placement)
        try:
            labels = oracle(z.numpy())
        except ModelGuardError as err:
            refused = f"{type(err).__name__}: {err}"
            break
        queries += len(z)
        known_x.append(z)
        known_y.append(torch.as_tensor(np.asarray(labels), dtype=torch.int64))
        xs, ys = torch.cat(known_x), torch.cat(known_y)
        substitute.train()
        for _ in range(config.steps_per_round):
            index = torch.randint(
                0, len(xs), (min(config.batch_size, len(xs)),), generator=generator
            )
            loss = F.cross_entropy(substitute(xs[index]), ys[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if (round_ + 1) % config.eval_every == 0:
            evaluate()
    if not curve or curve[-1].queries != queries:
        evaluate()
    substitute.eval()
    return StealingResult(tuple(curve), queries, refused, substitute)


@dataclass
class TrafficReport:
    """Outcome of `replay_traffic` for one simulated user."""

    user_id: str
    rows: int = 0
    alarms: list[Alarm] = field(default_factory=list)


def replay_traffic(
    detector: ExtractionDetector,
    user_id: str,
    generation: int,
    batches: Sequence[tuple[float, np.ndarray]],
) -> TrafficReport:
    """Feed ``(time, pseudo-outputs)`` batches of one (legitimate) user to ``detector``
    directly; used to measure false alarms without a registry."""
    report = TrafficReport(user_id)
    before = len(detector.alarms)
    for now, pseudo in batches:
        detector.observe(user_id, generation, pseudo, np.zeros(len(pseudo), np.int32), now)
        report.rows += len(pseudo)
    report.alarms = [a for a in detector.alarms[before:] if a.user_id == user_id]
    return report
