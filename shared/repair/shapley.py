"""Shapley values of neurons for the attack success rate (ShapPruning: Guan et al., "Few-shot
Backdoor Defense Using Shapley Estimation", CVPR 2022).

The game: the players are the ``n`` neurons of one layer; a coalition ``S`` is a set of
pruned neurons; its worth is the drop of the reversed trigger's attack metric,
``v(S) = a(∅) - a(S)``, where ``a(S)`` is the attack success rate (``metric="asr"``) or
the mean softmax probability of the target (``metric="soft"``) with ``S`` pruned,
averaged over the triggers. A neuron's Shapley value is its average marginal drop
``a(P) - a(P ∪ {i})`` over uniformly random orders of the players, ``P`` the players
before ``i``. The values sum to ``a(∅) - a(all)``.

Estimation (Monte Carlo permutation sampling, Castro et al. 2009):

1. *Exploration*: ``permutations`` random orders, each walked prefix by prefix. Prefixes
   of many orders are evaluated together: every forward pass carries a batch of keep-masks
   (`layers.LayerProbe.masked_logits`).
2. *Truncation* (TMC-Shapley, Ghorbani & Zou 2019; ShapPruning's discarding threshold):
   once a prefix's metric is closer than ``truncation`` to the metric with every player
   pruned, the remaining players of that order get a marginal of 0 without evaluation.
3. *ε-greedy refinement*: the remaining budget goes to single-player marginal samples
   ``a(P) - a(P ∪ {i})`` (``P`` a random prefix before ``i``). With probability 1-ε a
   slot refines the candidate whose confidence interval is widest among those that may
   belong to the top ``top_k`` (the ones pruning will act on); with probability ε it goes
   to a uniformly random player, so a neuron underestimated by exploration can still
   surface. Refinement stops when every candidate's interval is narrower than
   ``ci_target`` or the budget is spent.

Every value comes with the half-width of its 95% normal confidence interval
(``1.96·sd/√m`` over its ``m`` marginal samples) and the result reports the number of
model evaluations (one evaluation = one candidate pruning scored on the stamped set).
Truncated marginals are set to 0 and so slightly bias values toward 0 (the usual TMC
trade-off); with ``truncation=0`` the estimator is unbiased.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.errors import InvalidInput
from modelguard.nn.probe import LayerProbe
from modelguard.progress import Progress
from modelguard.repair.scoring import AttackSet, build_attack_set
from modelguard.spec import InputSpec

log = logging.getLogger(__name__)

#: Maps pruned-masks ``(P, n)`` (bool, True = pruned) to the attack metric ``(P,)``.
GameMetric = Callable[[torch.Tensor], torch.Tensor]

Z95 = 1.959964


@dataclass(frozen=True)
class ShapleyConfig:
    """Hyper-parameters of `estimate_shapley` (see the module docstring).

    ``samples``: clean samples stamped per trigger. ``permutations``: exploration orders.
    ``max_evaluations``: total budget, exploration included. ``truncation``: discarding
    threshold in metric units. ``epsilon``: exploration probability of the refinement.
    ``top_k``: how many top neurons the refinement must rank reliably. ``ci_target``:
    refinement stops when the candidates' 95% half-widths are below it.
    ``batch``: candidate prunings per forward pass.
    """

    layer: str | None = None
    metric: Literal["asr", "soft"] = "asr"
    samples: int = 200
    permutations: int = 20
    max_evaluations: int = 6000
    truncation: float = 0.02
    epsilon: float = 0.2
    top_k: int = 8
    ci_target: float = 0.02
    batch: int = 64
    seed: int = 0
    max_rows: int = 8192

    def __post_init__(self) -> None:
        if self.metric not in ("asr", "soft"):
            raise ValueError(f"metric must be asr or soft; got {self.metric!r}")
        if self.samples < 1 or self.permutations < 2 or self.batch < 1 or self.top_k < 1:
            raise ValueError("samples >= 1, permutations >= 2, batch >= 1, top_k >= 1 required")
        if self.max_evaluations < 1 or self.max_rows < 1:
            raise ValueError("max_evaluations and max_rows must be >= 1")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        if self.truncation < 0 or self.ci_target < 0:
            raise ValueError("truncation and ci_target must be >= 0")


@dataclass(frozen=True)
class ShapleyResult:
    """``values`` ``(n,)``: Shapley value of each neuron in metric units (drop of the
    attack metric it accounts for); ``ci`` ``(n,)``: 95% half-widths; ``samples`` ``(n,)``:
    marginal samples per neuron; ``evaluations``: model evaluations spent.
    ``base_metric``/``floor_metric``: the metric with nothing / everything pruned.
    Neurons in ``fixed`` were already pruned and are not players (value 0)."""

    layer: str
    values: torch.Tensor
    ci: torch.Tensor
    samples: torch.Tensor
    evaluations: int
    permutations: int
    base_metric: float
    floor_metric: float
    metric: str
    mode: str
    fixed: tuple[int, ...] = field(default_factory=tuple)

    @property
    def ranking(self) -> torch.Tensor:
        """Player indices by value, high to low (fixed neurons last)."""
        values = self.values.clone()
        if self.fixed:
            values[list(self.fixed)] = float("-inf")
        return torch.sort(values, descending=True, stable=True).indices

    def to_dict(self) -> dict[str, Any]:
        def finite(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {
            "layer": self.layer,
            "metric": self.metric,
            "mode": self.mode,
            "values": [float(v) for v in self.values],
            "ci": [finite(float(v)) for v in self.ci],
            "samples": [int(v) for v in self.samples],
            "evaluations": self.evaluations,
            "permutations": self.permutations,
            "base_metric": self.base_metric,
            "floor_metric": self.floor_metric,
            "fixed": list(self.fixed),
        }


@dataclass
class _Tally:
    """Running sums of the marginal samples of each player."""

    total: torch.Tensor
    squares: torch.Tensor
    count: torch.Tensor

    @classmethod
    def zeros(cls, n: int) -> _Tally:
        return cls(
            torch.zeros(n, dtype=torch.float64),
            torch.zeros(n, dtype=torch.float64),
            torch.zeros(n, dtype=torch.long),
        )

    def add(self, player: int, value: float) -> None:
        self.total[player] += value
        self.squares[player] += value * value
        self.count[player] += 1

    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)

    def half_width(self) -> torch.Tensor:
        count = self.count.to(torch.float64)
        mean = self.mean()
        var = (self.squares - count * mean * mean) / (count - 1).clamp_min(1)
        out = Z95 * var.clamp_min(0).sqrt() / count.clamp_min(1).sqrt()
        return torch.where(self.count >= 2, out, torch.full_like(out, float("inf")))


@dataclass
class GameEstimate:
    values: torch.Tensor
    ci: torch.Tensor
    samples: torch.Tensor
    evaluations: int
    permutations: int
    base: float
    floor: float


def shapley_game(
    metric: GameMetric,
    players: list[int],
    n: int,
    config: ShapleyConfig,
    *,
    progress: Progress | None = None,
) -> GameEstimate:
    """Estimate the Shapley values of ``players`` (indices into ``n`` neurons) in the game
    ``v(S) = metric(∅) - metric(S)``; ``metric`` scores pruned-masks ``(P, n)`` (bool)
    and returns ``(P,)``. Players outside ``players`` are never pruned by the estimator
    (the caller keeps them in whatever state they are). Returns values ``(n,)`` with 0
    for non-players."""
    generator = torch.Generator().manual_seed(config.seed)
    tally = _Tally.zeros(n)
    evaluations = 0
    if not players:
        zeros = torch.zeros(n, dtype=torch.float64)
        return GameEstimate(zeros, zeros, torch.zeros(n, dtype=torch.long), 0, 0, 0.0, 0.0)
    player_tensor = torch.tensor(players, dtype=torch.long)
    ends = torch.zeros(2, n, dtype=torch.bool)
    ends[1, player_tensor] = True
    base, floor = (float(v) for v in metric(ends))
    evaluations += 2
    budget = config.max_evaluations

    def truncated(value: float) -> bool:
        return abs(value - floor) < config.truncation

    # 1. exploration: truncated permutations, prefixes of several orders per batch
    orders = [
        player_tensor[torch.randperm(len(players), generator=generator)]
        for _ in range(config.permutations)
    ]
    position = [0] * len(orders)
    previous = [base] * len(orders)
    active = [i for i in range(len(orders))]
    done_orders = 0
    while active and evaluations < budget:
        # give each active order a share of the batch (at least one prefix each)
        share = max(1, config.batch // len(active))
        rows: list[tuple[int, int]] = []  # (order, prefix length)
        for o in active:
            for length in range(position[o] + 1, min(position[o] + share, len(players)) + 1):
                rows.append((o, length))
        rows = rows[: max(1, budget - evaluations)]
        masks = torch.zeros(len(rows), n, dtype=torch.bool)
        for r, (o, length) in enumerate(rows):
            masks[r, orders[o][:length]] = True
        values = metric(masks)
        evaluations += len(rows)
        finished: set[int] = set()
        for r, (o, length) in enumerate(rows):
            if o in finished or length != position[o] + 1:
                continue
            value = float(values[r])
            tally.add(int(orders[o][length - 1]), previous[o] - value)
            previous[o] = value
            position[o] = length
            if length == len(players) or truncated(value):
                for rest in orders[o][length:]:
                    tally.add(int(rest), 0.0)
                finished.add(o)
        active = [o for o in active if o not in finished]
        done_orders += len(finished)
        if progress is not None:
            progress(min(1.0, evaluations / budget), f"Shapley: {done_orders} orders")
    # orders cut short by the budget: drop their partial walks from the statistics
    # (already-added marginals are unbiased samples of their players, so they stay)

    # 2. ε-greedy refinement with single-player marginal samples
    top_k = min(config.top_k, len(players))
    while evaluations + 2 <= budget:
        mean, half = tally.mean(), tally.half_width()
        candidates = _candidates(mean, half, player_tensor, top_k)
        widest = half[candidates]
        if bool((widest <= config.ci_target).all()):
            break
        slots = max(1, min(config.batch // 2, (budget - evaluations) // 2))
        chosen = []
        for _ in range(slots):
            if float(torch.rand(1, generator=generator)) < config.epsilon:
                chosen.append(
                    int(player_tensor[torch.randint(len(players), (1,), generator=generator)])
                )
            else:
                # greedy: the candidate with the widest interval, spread over the slots
                weights = widest.clamp(max=1e6) + 1e-12
                pick = torch.multinomial(weights, 1, generator=generator)
                chosen.append(int(candidates[pick]))
        masks = torch.zeros(2 * len(chosen), n, dtype=torch.bool)
        for s, player in enumerate(chosen):
            order = player_tensor[torch.randperm(len(players), generator=generator)]
            at = int(torch.nonzero(order == player)[0])
            masks[2 * s, order[:at]] = True
            masks[2 * s + 1, order[: at + 1]] = True
        values = metric(masks)
        evaluations += len(masks)
        for s, player in enumerate(chosen):
            before, after = float(values[2 * s]), float(values[2 * s + 1])
            tally.add(player, 0.0 if truncated(before) else before - after)
        if progress is not None:
            progress(min(1.0, evaluations / budget), "Shapley: refining the top neurons")
    values = tally.mean()
    ci = tally.half_width()
    not_player = torch.ones(n, dtype=torch.bool)
    not_player[player_tensor] = False
    values[not_player] = 0.0
    ci[not_player] = 0.0
    return GameEstimate(values, ci, tally.count.clone(), evaluations, done_orders, base, floor)


def _candidates(
    mean: torch.Tensor, half: torch.Tensor, players: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Players that may belong to the top ``top_k``: upper bound at least the k-th
    largest lower bound."""
    m, h = mean[players], half[players]
    lower = m - h.clamp(max=1e6)
    kth_lower = torch.topk(lower, top_k).values[-1]
    upper = m + h.clamp(max=1e6)
    return players[upper >= kth_lower]


def attack_metric(
    probe: LayerProbe, attack: AttackSet, metric: str, fixed: torch.Tensor | None = None
) -> GameMetric:
    """The game metric of `shapley_game` for one layer: pruned-masks ``(P, n)`` → mean
    over triggers of the ASR (or soft ASR) with those neurons (and ``fixed``) pruned."""

    def evaluate(pruned: torch.Tensor) -> torch.Tensor:
        if fixed is not None:
            pruned = pruned | fixed
        logits = probe.masked_logits(attack.x, (~pruned).float())
        per_trigger = attack.asr(logits) if metric == "asr" else attack.soft_asr(logits)
        return per_trigger.mean(-1)

    return evaluate


def estimate_shapley(
    model: nn.Module,
    data: Dataset | torch.Tensor,
    triggers: Any,
    spec: InputSpec,
    config: ShapleyConfig = ShapleyConfig(),
    *,
    fixed: list[int] | tuple[int, ...] = (),
    probe: LayerProbe | None = None,
    attack: AttackSet | None = None,
    progress: Progress | None = None,
) -> ShapleyResult:
    """Shapley value of every neuron of ``config.layer`` for the ASR of ``triggers`` on
    ``data`` (clean samples in ``spec.value_range``; the model is the raw one). Neurons in
    ``fixed`` are treated as already pruned. The model is not modified (TorchScript in
    weight-masking mode: modified transiently, restored before every return)."""
    probe = probe or LayerProbe(model, config.layer, spec, max_rows=config.max_rows)
    if attack is None:
        attack = build_attack_set(data, triggers, spec, samples=config.samples, seed=config.seed)
    n = probe.neurons
    fixed_mask = torch.zeros(n, dtype=torch.bool)
    for index in fixed:
        if not 0 <= index < n:
            raise InvalidInput(f"neuron {index} is not in layer {probe.info.name} (0..{n - 1})")
        fixed_mask[index] = True
    players = [i for i in range(n) if not fixed_mask[i]]
    if not probe.batched:
        log.warning(
            "Shapley on %s uses weight masking: one forward pass per candidate pruning",
            probe.info.name,
        )
    game = shapley_game(
        attack_metric(probe, attack, config.metric, fixed_mask),
        players,
        n,
        config,
        progress=progress,
    )
    return ShapleyResult(
        layer=probe.info.name,
        values=game.values.float(),
        ci=game.ci.float(),
        samples=game.samples,
        evaluations=game.evaluations,
        permutations=game.permutations,
        base_metric=game.base,
        floor_metric=game.floor,
        metric=config.metric,
        mode=probe.mode,
        fixed=tuple(int(i) for i in fixed),
    )
