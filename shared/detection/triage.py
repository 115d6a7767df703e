"""A cheap first pass that ranks the labels of a many-class model by how likely each is a
backdoor target, so the full trigger optimisation is spent on a few of them.

Neural Cleanse optimises a trigger for every label; with a thousand labels and a 224²
model on a CPU that is days of work. Two signals cost about as much as one label:

1. **Sink search** (the main signal). One mask and pattern are optimised with the Neural
   Cleanse procedure (λ schedule on the mask's L1 norm, best-mask rule, early stopping),
   but towards whichever label the stamped batch already leans to most — the label with
   the largest summed log-probability — re-chosen at every step. The search therefore
   finds the label that is cheapest to reach from every image at once. A backdoor target
   is exactly that: its trigger is small and flips everything. As the λ schedule shrinks
   the mask, labels that need a large mask stop winning and the search moves on; a label
   that is the sink of a step whose stamped batch all goes to it (attack success at the
   threshold) is recorded with that step's mask norm. Several runs (``runs``) guard
   against a run stuck on one natural sink: the first starts from Neural Cleanse's
   random half-covering mask, the next ones from a faint mask (the images nearly clean),
   where a small trigger wins before a large natural one can.
2. **Logit prior** (after K-Arm's pre-screening, Shen et al., ICML 2021): a label whose
   log-probability on clean images of other labels is high on average is easier to reach.
   It orders the labels the sink search never visited.

The ranking takes the two signals in turn: the sink search's labels (those it drove to
the threshold, smallest mask first, then those it chose without reaching it, most often
first) alternate with the labels of the logit prior, highest first. The triage never
decides anything: it only orders the labels.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import zip_longest

import torch
from torch import nn

from modelguard.detection.optimizer import FAINT_MASK_THETA, OptimizerSettings, TriggerOptimizer


class SinkSearch(TriggerOptimizer):
    """One trigger (row 0) pushed towards the label its stamped batch leans to most."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        #: per step: the sink label, the mask's L1 norm and the attack success
        self.trail: list[tuple[int, float, float]] = []
        self.pending: torch.Tensor | None = None

    def targets(self, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lean = torch.log_softmax(logits.float(), dim=-1).sum(1)  # (k, K)
            chosen = lean.argmax(-1)
        self.labels[rows] = chosen
        self.pending = chosen
        return chosen

    def record_best(self, rows: torch.Tensor, stats: object) -> None:
        super().record_best(rows, stats)  # type: ignore[arg-type]
        assert self.pending is not None
        self.trail.append(
            (int(self.pending[0]), float(stats.l1[0]), float(stats.asr[0]))  # type: ignore[attr-defined]
        )


@dataclass(frozen=True)
class TriageResult:
    """``ranking``: every label, most likely target first. ``reached``: label → smallest
    mask norm at which the sink search brought a whole batch to it; ``visits``: label →
    steps it was the sink; ``prior``: per label, the mean log-probability on clean images
    of other labels. ``complete`` is False when the time ran out during the search."""

    ranking: tuple[int, ...]
    reached: dict[int, float]
    visits: dict[int, int]
    prior: tuple[float, ...]
    runs: int
    steps: int
    evaluations: int
    seconds: float
    complete: bool = True
    notes: list[str] = field(default_factory=list)

    def to_dict(self, top: int = 20) -> dict[str, object]:
        return {
            "top": list(self.ranking[:top]),
            "reached": {str(k): v for k, v in sorted(self.reached.items(), key=lambda i: i[1])},
            "visits": {str(k): v for k, v in list(self.visits.items())[:top]},
            "runs": self.runs,
            "steps": self.steps,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "complete": self.complete,
        }


@torch.no_grad()
def logit_prior(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int, images_per_pass: int
) -> torch.Tensor:
    """Per label, the mean log-probability the model gives it on clean images of other
    labels ``(K,)``."""
    total = torch.zeros(classes)
    count = torch.zeros(classes)
    for start in range(0, int(x.shape[0]), max(1, images_per_pass)):
        logits = model(x[start : start + images_per_pass]).float()
        log_p = torch.log_softmax(logits, dim=-1).cpu()
        own = torch.nn.functional.one_hot(y[start : start + images_per_pass].cpu(), classes)
        other = 1.0 - own.float()
        total += (log_p * other).sum(0)
        count += other.sum(0)
    return total / count.clamp_min(1.0)


def triage_labels(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    value_range: tuple[float, float],
    settings: OptimizerSettings,
    *,
    steps: int,
    runs: int,
    seed: int,
    images_per_pass: int,
    deadline: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TriageResult:
    """Rank ``classes`` labels (see the module docstring). ``steps``: step budget of one
    sink-search run; ``progress(run, step)`` is called every step."""
    started = time.perf_counter()
    # the runs' starts are the triage's own (above), whatever the screening's are
    settings = replace(settings, mask_start="random")
    prior = logit_prior(model, x, y, classes, images_per_pass)
    reached: dict[int, float] = {}
    visits: Counter[int] = Counter()
    total_steps = evaluations = done = 0
    complete = True
    for run in range(runs):
        search = SinkSearch(
            model,
            x,
            y,
            [0],
            value_range,
            settings,
            torch.Generator().manual_seed(seed + 7919 * (run + 1)),
            device=x.device,
        )
        if run > 0:
            search.theta_mask.fill_(FAINT_MASK_THETA)
        tick = None if progress is None else (lambda step, run=run: progress(run, step))
        search.optimize(steps, progress=tick, deadline=deadline)
        done += 1
        total_steps += search.step_count
        evaluations += search.evaluations
        for label, norm, asr in search.trail:
            visits[label] += 1
            if asr >= settings.attack_threshold and norm < reached.get(label, math.inf):
                reached[label] = norm
        if search.out_of_time:
            complete = False
            break
    by_norm = sorted(reached, key=lambda k: reached[k])
    sink = by_norm + [k for k, _ in visits.most_common() if k not in reached]
    by_prior = sorted(range(classes), key=lambda k: -float(prior[k]))
    ranking: list[int] = []
    for pair in zip_longest(sink, by_prior):
        for label in pair:
            if label is not None and label not in ranking:
                ranking.append(label)
    return TriageResult(
        ranking=tuple(ranking),
        reached=reached,
        visits=dict(visits.most_common()),
        prior=tuple(float(v) for v in prior),
        runs=done,
        steps=total_steps,
        evaluations=evaluations,
        seconds=time.perf_counter() - started,
        complete=complete,
    )
