"""Batched Neural Cleanse trigger optimisation: the K labels' masks and patterns live in
stacked tensors and go through the model in one forward pass per step.

Neural Cleanse (Wang et al., IEEE S&P 2019, §IV-B and the authors' ``visualizer.py``):
for a target label ``t`` find a mask ``m`` ``(H, W)`` in [0, 1] (shared across channels)
and a pattern ``δ`` ``(C, H, W)`` in the input's value range minimising

    CE(f((1 − m) ⊙ x + m ⊙ δ), t) + λ · ‖m‖₁

over clean inputs ``x``. ``m = (tanh(θ_m) + 1) / 2`` and
``δ = low + (high − low) · (tanh(θ_δ) + 1) / 2``, so both stay inside their bounds
whatever the optimiser does. Adam (lr 0.1, betas (0.5, 0.9)) as in the paper's code.

Batching: for ``k`` active labels and a mini-batch of ``B`` clean images the stamped
batch is ``(k, B, C, H, W)``, flattened to ``(k·B, C, H, W)`` for one forward pass; the
loss is the *sum* of the per-label losses, so each label's gradient is exactly the one a
separate run would get. Adam is elementwise and kept per label (own step counter), so a
label that stops early or sits out a phase is not disturbed: the batched run is
mathematically the sequential algorithm run side by side.

One *step* is one Adam update on one mini-batch (``batch_size`` images, shared by all
active labels); the λ schedule, the best-mask rule and early stopping are evaluated
after every step on that step's stamped batch:

* λ = 0 until the attack success rate (ASR) reaches ``attack_threshold`` for
  ``patience`` consecutive steps, then λ = ``init_cost``; afterwards λ is multiplied by
  ``cost_multiplier_up`` (2) after ``patience`` consecutive steps at or above the
  threshold and divided by ``cost_multiplier_down`` (2^1.5) after ``patience``
  consecutive steps below it.
* Best mask: among the masks whose step reached the threshold, the one with the smallest
  L1 norm (with its pattern) is kept; a label that never reaches it has no valid trigger.
* Early stop (overridable hook :meth:`TriggerOptimizer.early_stop`): once a valid trigger
  exists and λ has been both raised and lowered, stop after ``early_stop_patience``
  steps in which the best norm did not fall below ``early_stop_threshold`` × its best
  earlier value.

The ASR of a label excludes the images already of that label (they say nothing about
the trigger). A label whose loss or gradient is ever non-finite skips that update and the
step counts as a failure (ASR 0) for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

# tanh never reaches ±1 in float32 for |θ| < 9, so masks stay strictly inside (0, 1) in
# practice; clamping θ keeps Adam from drifting into the flat region for ever.
THETA_LIMIT = 8.0


#: Steps observed before `TriggerOptimizer.optimize` re-plans its budget from their time.
REPLAN_AFTER_STEPS = 5

#: The masks an optimisation starts from: ``"random"``, Neural Cleanse's (a mask covering
#: about half of every pixel, uniform noise); ``"faint"``, a mask of about 2% everywhere
#: (the stamped images nearly clean), from which the pixels that flip the images fastest
#: grow first, so a small trigger wins before a large natural feature of the label can.
MASK_STARTS = ("random", "faint")
#: θ of the faint start: mask = (tanh(−2) + 1) / 2, about 2% everywhere.
FAINT_MASK_THETA = -2.0


@dataclass(frozen=True)
class OptimizerSettings:
    """The subset of :class:`ReversalConfig` the optimiser needs (kept separate so the
    sequential baseline and the tests can build one directly)."""

    batch_size: int = 32
    lr: float = 0.1
    beta1: float = 0.5
    beta2: float = 0.9
    adam_eps: float = 1e-8
    init_cost: float = 1e-3
    cost_multiplier_up: float = 2.0
    cost_multiplier_down: float = 2.0**1.5
    patience: int = 5
    attack_threshold: float = 0.99
    early_stop: bool = True
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 25
    max_batch_images: int = 4096
    mask_start: str = "random"

    def __post_init__(self) -> None:
        if self.mask_start not in MASK_STARTS:
            raise ValueError(f"mask_start must be one of {MASK_STARTS}; got {self.mask_start!r}")


def mask_from_theta(theta: torch.Tensor) -> torch.Tensor:
    """Mask in (0, 1) from its unconstrained parameter (any shape)."""
    return (torch.tanh(theta) + 1.0) / 2.0


def pattern_from_theta(theta: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Pattern in (low, high) from its unconstrained parameter (any shape)."""
    low, high = value_range
    return low + (high - low) * (torch.tanh(theta) + 1.0) / 2.0


def initial_parameters(
    num_labels: int,
    shape: tuple[int, int, int],
    generator: torch.Generator,
    mask_start: str = "random",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random start, as Neural Cleanse (uniform mask and pattern), drawn in parameter
    space: θ ~ U(−1, 1), i.e. mask and pattern uniform-ish in the middle 76% of their
    ranges (avoids starting in tanh's flat tails). A ``"faint"`` mask start (see
    `MASK_STARTS`) draws the mask's θ from `FAINT_MASK_THETA` ± 0.25 instead, so each
    label and seed still starts from its own point. Shapes ``(K, 1, H, W)`` and
    ``(K, C, H, W)``; label ``k``'s start is row ``k`` whatever else is drawn."""
    channels, height, width = shape
    theta_mask = torch.rand(num_labels, 1, height, width, generator=generator) * 2 - 1
    theta_pattern = torch.rand(num_labels, channels, height, width, generator=generator) * 2 - 1
    if mask_start == "faint":
        theta_mask = FAINT_MASK_THETA + theta_mask / 4
    return theta_mask, theta_pattern


class BatchSampler:
    """Endless seeded mini-batches of indices into ``n`` samples (reshuffled each pass)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n = n
        self.batch_size = min(batch_size, n)
        self.generator = generator
        self.order = torch.randperm(n, generator=generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.n:
            self.order = torch.randperm(self.n, generator=self.generator)
            self.position = 0
        index = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return index


@dataclass
class StepStats:
    """Per active label (rows follow ``labels``): attack success on the step's batch,
    L1 norm of the mask used, cross-entropy, and whether the step was finite."""

    labels: torch.Tensor
    asr: torch.Tensor
    l1: torch.Tensor
    ce: torch.Tensor
    finite: torch.Tensor


@dataclass
class BestTriggers:
    """A saved best-trigger record of some labels (see :meth:`TriggerOptimizer.reopen`)."""

    rows: torch.Tensor
    norm: torch.Tensor
    asr: torch.Tensor
    step: torch.Tensor
    mask: torch.Tensor
    pattern: torch.Tensor


class TriggerOptimizer:
    """State and template method for optimising the triggers of several labels at once.

    Tensors (K = number of labels handled): ``theta_mask`` ``(K, 1, H, W)``,
    ``theta_pattern`` ``(K, C, H, W)``, ``best_mask`` ``(K, H, W)``, ``best_pattern``
    ``(K, C, H, W)``, and per-label vectors ``(K,)`` for λ, the schedule counters, the best
    norm and early stopping. Call :meth:`optimize` (the template method) one or more
    times with a step limit and the set of labels to work on; override
    :meth:`early_stop` or :meth:`update_cost` to change those rules.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        labels: Sequence[int],
        value_range: tuple[float, float],
        settings: OptimizerSettings,
        generator: torch.Generator,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.value_range = value_range
        self.settings = settings
        self.labels = torch.tensor(list(labels), dtype=torch.long, device=self.device)
        k = len(labels)
        shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
        theta_mask, theta_pattern = initial_parameters(k, shape, generator, settings.mask_start)
        self.theta_mask = theta_mask.to(self.device)
        self.theta_pattern = theta_pattern.to(self.device)
        self.sampler = BatchSampler(int(x.shape[0]), settings.batch_size, generator)
        zeros = torch.zeros(k, device=self.device)
        izeros = torch.zeros(k, dtype=torch.long, device=self.device)
        bzeros = torch.zeros(k, dtype=torch.bool, device=self.device)
        # Adam moments and per-label step counts
        self.m_mask = torch.zeros_like(self.theta_mask)
        self.v_mask = torch.zeros_like(self.theta_mask)
        self.m_pattern = torch.zeros_like(self.theta_pattern)
        self.v_pattern = torch.zeros_like(self.theta_pattern)
        self.adam_steps = izeros.clone()
        # λ schedule
        self.cost = zeros.clone()
        self.cost_set = bzeros.clone()
        self.cost_set_counter = izeros.clone()
        self.cost_up_counter = izeros.clone()
        self.cost_down_counter = izeros.clone()
        self.cost_up_flag = bzeros.clone()
        self.cost_down_flag = bzeros.clone()
        # best trigger
        self.best_norm = torch.full((k,), float("inf"), device=self.device)
        self.best_asr = zeros.clone()
        self.best_step = torch.full((k,), -1, dtype=torch.long, device=self.device)
        self.best_mask = mask_from_theta(self.theta_mask[:, 0]).clone()
        self.best_pattern = pattern_from_theta(self.theta_pattern, value_range).clone()
        # early stopping
        self.stop_best = torch.full((k,), float("inf"), device=self.device)
        self.stop_counter = izeros.clone()
        self.stopped = bzeros.clone()
        # bookkeeping
        self.label_steps = izeros.clone()
        self.nonfinite_steps = izeros.clone()
        self.step_count = 0
        self.evaluations = 0
        self.out_of_time = False
        #: best norm of every label after each step (only when ``keep_history``)
        self.history: list[torch.Tensor] = []
        self.keep_history = False
        self.step_mask = self.best_mask[:0]
        self.step_pattern = self.best_pattern[:0]

    # ------------------------------------------------------------------ template method
    def optimize(
        self,
        until_step: int,
        active: torch.Tensor | None = None,
        progress: Callable[[int], None] | None = None,
        deadline: float | None = None,
        fit_to_deadline: bool = False,
    ) -> None:
        """Run steps until the global step counter reaches ``until_step``, every label in
        ``active`` (bool ``(K,)``; all when None) has stopped, or ``time.perf_counter()``
        passes ``deadline`` (then ``out_of_time`` is set). With ``fit_to_deadline`` the
        step budget is re-planned from the steps' observed time: when the remaining steps
        would end past ``deadline`` (a busier or slower machine than the plan assumed),
        ``until_step`` is lowered for every label alike, so their norms stay comparable;
        the steps run are ``step_count``."""
        selected = (
            torch.ones_like(self.stopped) if active is None else active.to(self.device).bool()
        )
        started, first_step = time.perf_counter(), self.step_count
        while self.step_count < until_step:
            now = time.perf_counter()
            if deadline is not None and now > deadline:
                self.out_of_time = True
                break
            done = self.step_count - first_step
            if fit_to_deadline and deadline is not None and done >= REPLAN_AFTER_STEPS:
                per_step = (now - started) / done
                affordable = self.step_count + int((deadline - now) / per_step)
                until_step = min(until_step, max(self.step_count, affordable))
                if self.step_count >= until_step:
                    break
            rows = torch.nonzero(selected & ~self.stopped).flatten()
            if rows.numel() == 0:
                break
            index = self.sampler.next().to(self.device)
            stats = self.step(rows, self.x[index], self.y[index])
            self.record_best(rows, stats)
            self.update_cost(rows, stats)
            stop = self.early_stop(rows)
            self.stopped[rows[stop]] = True
            self.label_steps[rows] += 1
            self.step_count += 1
            if self.keep_history:
                self.history.append(self.best_norm.detach().cpu().clone())
            if progress is not None:
                progress(self.step_count)

    def reopen(self, rows: torch.Tensor, settings: OptimizerSettings) -> BestTriggers:
        """Prepare ``rows`` for another phase under ``settings`` (e.g. refinement with a
        larger batch): masks, patterns, Adam moments and λ carry on; the best-trigger
        record and early stopping start afresh, so the phase's trigger is judged by its
        own (stricter) attack-success evidence. Returns the previous best triggers for
        :meth:`keep_previous_if_unreached`."""
        previous = BestTriggers(
            rows.clone(),
            self.best_norm[rows].clone(),
            self.best_asr[rows].clone(),
            self.best_step[rows].clone(),
            self.best_mask[rows].clone(),
            self.best_pattern[rows].clone(),
        )
        self.settings = settings
        self.sampler = BatchSampler(
            int(self.x.shape[0]), settings.batch_size, self.sampler.generator
        )
        self.best_norm[rows] = float("inf")
        self.best_asr[rows] = 0.0
        self.best_step[rows] = -1
        self.stop_best[rows] = float("inf")
        self.stop_counter[rows] = 0
        self.stopped[rows] = False
        return previous

    def keep_previous_if_unreached(self, previous: BestTriggers) -> None:
        """Labels whose new phase never reached the threshold keep their previous best."""
        lost = ~torch.isfinite(self.best_norm[previous.rows])
        rows = previous.rows[lost]
        self.best_norm[rows] = previous.norm[lost]
        self.best_asr[rows] = previous.asr[lost]
        self.best_step[rows] = previous.step[lost]
        self.best_mask[rows] = previous.mask[lost]
        self.best_pattern[rows] = previous.pattern[lost]

    # ------------------------------------------------------------------ one step
    def step(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """Forward, backward and Adam update of the labels in ``rows`` on batch ``x``
        ``(B, C, H, W)`` with true labels ``y`` ``(B,)``."""
        batch = int(x.shape[0])
        per_chunk = max(1, self.settings.max_batch_images // max(batch, 1))
        parts = [
            self._forward_backward(rows[start : start + per_chunk], x, y)
            for start in range(0, int(rows.numel()), per_chunk)
        ]
        hits, counts, l1, ce, grad_mask, grad_pattern, mask, pattern = (
            torch.cat([part[i] for part in parts]) for i in range(8)
        )
        # the masks and patterns this step evaluated (before its update): the candidates
        # of the best-mask rule
        self.step_mask, self.step_pattern = mask, pattern
        stats = StepStats(
            labels=rows,
            asr=hits / counts.clamp_min(1.0),
            l1=l1,
            ce=ce,
            finite=torch.ones(int(rows.numel()), dtype=torch.bool, device=self.device),
        )
        finite = (
            torch.isfinite(stats.ce)
            & torch.isfinite(stats.l1)
            & torch.isfinite(grad_mask).flatten(1).all(1)
            & torch.isfinite(grad_pattern).flatten(1).all(1)
        )
        if not bool(finite.all()):
            bad = rows[~finite]
            log.warning("non-finite loss or gradient for labels %s: update skipped", bad.tolist())
            self.nonfinite_steps[bad] += 1
            grad_mask[~finite] = 0.0
            grad_pattern[~finite] = 0.0
            hits = torch.where(finite, hits, torch.zeros_like(hits))
        stats.finite = finite
        stats.asr = hits / counts.clamp_min(1.0)
        self._adam(rows[finite], grad_mask[finite], grad_pattern[finite])
        self.evaluations += batch * int(rows.numel())
        return stats

    def _forward_backward(
        self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Hits and counted images (for the ASR), L1, CE, ∂loss/∂θ_mask, ∂loss/∂θ_pattern,
        mask and pattern of ``rows``."""
        k, batch = int(rows.numel()), int(x.shape[0])
        theta_mask = self.theta_mask[rows].detach().requires_grad_(True)
        theta_pattern = self.theta_pattern[rows].detach().requires_grad_(True)
        mask = mask_from_theta(theta_mask)  # (k, 1, H, W)
        pattern = pattern_from_theta(theta_pattern, self.value_range)  # (k, C, H, W)
        stamped = (1 - mask).unsqueeze(1) * x.unsqueeze(0) + (mask * pattern).unsqueeze(1)
        logits = self.model(stamped.reshape(k * batch, *x.shape[1:]))
        logits = logits.reshape(k, batch, -1)
        targets = self.targets(rows, logits)
        losses = F.cross_entropy(
            logits.reshape(k * batch, -1), targets.repeat_interleave(batch), reduction="none"
        ).reshape(k, batch)
        weight = (y.unsqueeze(0) != targets.unsqueeze(1)).to(losses.dtype)
        count = weight.sum(1).clamp_min(1.0)
        ce = (losses * weight).sum(1) / count
        l1 = mask.flatten(1).sum(1)
        loss = (ce + self.cost[rows] * l1).sum()
        grad_mask, grad_pattern = torch.autograd.grad(loss, [theta_mask, theta_pattern])
        with torch.no_grad():
            hits = ((logits.argmax(-1) == targets.unsqueeze(1)).to(weight.dtype) * weight).sum(1)
        return (
            hits,
            weight.sum(1),
            l1.detach(),
            ce.detach(),
            grad_mask,
            grad_pattern,
            mask.detach()[:, 0],
            pattern.detach(),
        )

    def _adam(
        self, rows: torch.Tensor, grad_mask: torch.Tensor, grad_pattern: torch.Tensor
    ) -> None:
        """Adam (as ``torch.optim.Adam``) on the rows of the labels being optimised."""
        if rows.numel() == 0:
            return
        s = self.settings
        self.adam_steps[rows] += 1
        t = self.adam_steps[rows].to(grad_mask.dtype)
        bias1 = 1 - s.beta1**t
        bias2 = 1 - s.beta2**t
        for theta, m_all, v_all, grad in (
            (self.theta_mask, self.m_mask, self.v_mask, grad_mask),
            (self.theta_pattern, self.m_pattern, self.v_pattern, grad_pattern),
        ):
            shape = (-1,) + (1,) * (grad.dim() - 1)
            m = m_all[rows] * s.beta1 + grad * (1 - s.beta1)
            v = v_all[rows] * s.beta2 + grad * grad * (1 - s.beta2)
            m_all[rows] = m
            v_all[rows] = v
            denom = (v.sqrt() / bias2.sqrt().view(shape)) + s.adam_eps
            update = (s.lr / bias1).view(shape) * m / denom
            theta[rows] = (theta[rows] - update).clamp(-THETA_LIMIT, THETA_LIMIT)

    # ------------------------------------------------------------------ rules (hooks)
    def targets(self, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The label each of ``rows`` is pushed towards this step (``logits`` ``(k, B, K)``
        of its stamped batch): its own label. Override to choose targets as you go."""
        del logits
        return self.labels[rows]

    def record_best(self, rows: torch.Tensor, stats: StepStats) -> None:
        """Best-mask rule: keep the smallest mask whose step reached the threshold."""
        better = (
            stats.finite
            & (stats.asr >= self.settings.attack_threshold)
            & (stats.l1 < self.best_norm[rows])
        )
        if not bool(better.any()):
            return
        target = rows[better]
        self.best_norm[target] = stats.l1[better]
        self.best_asr[target] = stats.asr[better]
        self.best_step[target] = self.step_count
        self.best_mask[target] = self.step_mask[better]
        self.best_pattern[target] = self.step_pattern[better]

    def update_cost(self, rows: torch.Tensor, stats: StepStats) -> None:
        """The Neural Cleanse λ schedule, vectorised over ``rows``."""
        s = self.settings
        ok = stats.asr >= s.attack_threshold
        cost_set = self.cost_set[rows]
        # before λ is set: count consecutive successful steps
        counter = torch.where(ok, self.cost_set_counter[rows] + 1, 0)
        start = ~cost_set & (counter >= s.patience)
        self.cost_set_counter[rows] = torch.where(cost_set, 0, counter)
        # after λ is set: raise after `patience` successes, lower after `patience` failures
        up = torch.where(ok, self.cost_up_counter[rows] + 1, 0)
        down = torch.where(ok, 0, self.cost_down_counter[rows] + 1)
        raise_ = cost_set & (up >= s.patience)
        lower = cost_set & ~raise_ & (down >= s.patience)
        cost = self.cost[rows]
        cost = torch.where(raise_, cost * s.cost_multiplier_up, cost)
        cost = torch.where(lower, cost / s.cost_multiplier_down, cost)
        cost = torch.where(start, torch.full_like(cost, s.init_cost), cost)
        up = torch.where(raise_ | start | ~cost_set, 0, up)
        down = torch.where(lower | start | ~cost_set, 0, down)
        self.cost[rows] = cost
        self.cost_up_counter[rows] = up
        self.cost_down_counter[rows] = down
        self.cost_up_flag[rows] = (self.cost_up_flag[rows] | raise_) & ~start
        self.cost_down_flag[rows] = (self.cost_down_flag[rows] | lower) & ~start
        self.cost_set[rows] = cost_set | start

    def early_stop(self, rows: torch.Tensor) -> torch.Tensor:
        """Which of ``rows`` stop now (bool). Neural Cleanse's rule; override to change."""
        s = self.settings
        if not s.early_stop:
            return torch.zeros(int(rows.numel()), dtype=torch.bool, device=self.device)
        best = self.best_norm[rows]
        previous = self.stop_best[rows]
        valid = torch.isfinite(best)
        stalled = valid & (best >= s.early_stop_threshold * previous)
        counter = torch.where(stalled, self.stop_counter[rows] + 1, 0)
        counter = torch.where(valid, counter, self.stop_counter[rows])
        self.stop_counter[rows] = counter
        self.stop_best[rows] = torch.minimum(best, previous)
        return (
            self.cost_up_flag[rows] & self.cost_down_flag[rows] & (counter >= s.early_stop_patience)
        )
