"""The reference stealing experiment against carrier serving: an attacker holding the
public model, the carrier and a credential queries the mapper and trains a substitute;
``replay_traffic`` replays attackers and legitimate users through the extraction detector
(`modelguard.carrier.extraction`)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from modelguard.datasets import Dataset
from modelguard.errors import InvalidInput, ModelGuardError

from .carrier import Carrier, MappingNetwork
from .extraction import Alarm, ExtractionDetector
from .public_models import PublicModel

log = logging.getLogger(__name__)

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
    initial: MappingNetwork | None = None,
) -> StealingResult:
    """Train a substitute mapper by querying ``oracle`` with pseudo-outputs of
    ``attacker_inputs`` ``(M, C, h, w)`` embedded in the stolen ``carrier``.

    Every ``eval_every`` rounds (and at the end) the substitute is scored on ``eval_data``
    through each carrier of ``eval_carriers``: the stolen one measures what the attacker
    owns, a rotated one what the substitute is worth against the live system.
    ``before_round(r)`` lets a simulation advance its clock or rotate. ``initial``: a
    substitute to keep training (an attacker who re-queries after a rotation), copied with its
    input standardisation.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    substitute = (
        copy.deepcopy(initial)
        if initial is not None
        else MappingNetwork(public_model.output_dim, classes, config.hidden)
    )
    optimiser = torch.optim.Adam(substitute.parameters(), lr=config.lr)
    order = torch.randperm(len(attacker_inputs), generator=generator)
    # the attacker standardises its substitute's inputs as the owner does: pseudo-outputs
    # cost it no query (it holds the public model and the carrier)
    if initial is None:
        substitute.standardise(carrier.outputs(public_model, attacker_inputs[order[:2000]]))
    eval_scores = {name: c.outputs(public_model, eval_data.x) for name, c in eval_carriers.items()}
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
        z = carrier.outputs(public_model, batch)
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
