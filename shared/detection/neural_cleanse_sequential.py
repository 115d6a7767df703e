"""The original Neural Cleanse procedure, one label after another: the faithful baseline
the batched implementation is benchmarked against (``bench/bench_reversal_speed.py``).

Wang et al., IEEE S&P 2019, and the authors' ``visualizer.py``: for each label in turn,
optimise a mask and a pattern with Adam for up to ``steps`` steps (``batch_size`` images
a step), with the λ schedule, the best-mask rule and early stopping; then the MAD test on
the K final norms. No screening, no batching across labels, ``torch.optim.Adam``, plain
Python scalars for the schedule: written independently of :mod:`.optimizer` on purpose.

It shares with the batched implementation only what makes the comparison fair: the same
configuration (steps, batch size, learning rate, schedule, stopping rule), the same
starting masks and patterns and the same sequence of mini-batches for a given seed
(:func:`~.optimizer.initial_parameters`, :class:`~.optimizer.BatchSampler`), the same loss
(images of the target label excluded), the same MAD rules, frozen weights (only the
triggers get gradients) and the same weight layout (``ReversalConfig.weight_layout``).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from modelguard.datasets import Dataset
from modelguard.detection.mad import mad_test
from modelguard.detection.neural_cleanse import (
    CLEAN,
    INFECTED,
    LabelResult,
    NeuralCleanse,
    RestartInfo,
    ReversalConfig,
    ReversalResult,
    reversal_layout,
    validate_inputs,
    verification_subset,
)
from modelguard.detection.optimizer import (
    THETA_LIMIT,
    BatchSampler,
    initial_parameters,
    mask_from_theta,
    pattern_from_theta,
)
from modelguard.errors import InvalidInput
from modelguard.nn.layout import weight_layout
from modelguard.nn.probe import frozen_weights
from modelguard.progress import Progress
from modelguard.spec import InputSpec, wrap


def reverse_label(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    label: int,
    num_labels: int,
    value_range: tuple[float, float],
    config: ReversalConfig,
) -> tuple[float, torch.Tensor, torch.Tensor, int]:
    """Neural Cleanse for one ``label``: best norm (inf if the threshold was never
    reached), best mask ``(H, W)``, best pattern ``(C, H, W)`` and the steps taken."""
    c = config
    generator = torch.Generator().manual_seed(c.seed)
    shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    theta_mask_all, theta_pattern_all = initial_parameters(
        num_labels, shape, generator, c.mask_start
    )
    theta_mask = theta_mask_all[label].clone().requires_grad_(True)  # (1, H, W)
    theta_pattern = theta_pattern_all[label].clone().requires_grad_(True)  # (C, H, W)
    sampler = BatchSampler(int(x.shape[0]), c.batch_size, generator)
    optimiser = torch.optim.Adam(
        [theta_mask, theta_pattern], lr=c.lr, betas=(c.beta1, c.beta2), eps=1e-8
    )

    cost = 0.0
    cost_set = False
    cost_set_counter = cost_up_counter = cost_down_counter = 0
    cost_up_flag = cost_down_flag = False
    best_norm = math.inf
    best_mask = mask_from_theta(theta_mask.detach())[0].clone()
    best_pattern = pattern_from_theta(theta_pattern.detach(), value_range).clone()
    stop_best = math.inf
    stop_counter = 0
    steps = 0
    for _ in range(c.steps):
        index = sampler.next()
        xb, yb = x[index], y[index]
        mask = mask_from_theta(theta_mask)
        pattern = pattern_from_theta(theta_pattern, value_range)
        stamped = (1 - mask) * xb + mask * pattern
        logits = model(stamped)
        keep = (yb != label).float()
        count = max(float(keep.sum()), 1.0)
        targets = torch.full_like(yb, label)
        ce = (F.cross_entropy(logits, targets, reduction="none") * keep).sum() / count
        l1 = mask.sum()
        loss = ce + cost * l1
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        finite = bool(torch.isfinite(loss)) and all(
            p.grad is not None and bool(torch.isfinite(p.grad).all())
            for p in (theta_mask, theta_pattern)
        )
        with torch.no_grad():
            asr = float(((logits.argmax(1) == label).float() * keep).sum()) / count
            if finite:
                optimiser.step()
                theta_mask.clamp_(-THETA_LIMIT, THETA_LIMIT)
                theta_pattern.clamp_(-THETA_LIMIT, THETA_LIMIT)
            else:
                asr = 0.0
        steps += 1
        norm = float(l1.detach())
        # best-mask rule
        if finite and asr >= c.attack_threshold and norm < best_norm:
            best_norm = norm
            best_mask = mask.detach()[0].clone()
            best_pattern = pattern.detach().clone()
        # λ schedule
        ok = asr >= c.attack_threshold
        if not cost_set:
            cost_set_counter = cost_set_counter + 1 if ok else 0
            if cost_set_counter >= c.patience:
                cost, cost_set = c.init_cost, True
                cost_up_counter = cost_down_counter = 0
                cost_up_flag = cost_down_flag = False
        else:
            if ok:
                cost_up_counter, cost_down_counter = cost_up_counter + 1, 0
            else:
                cost_up_counter, cost_down_counter = 0, cost_down_counter + 1
            if cost_up_counter >= c.patience:
                cost_up_counter = 0
                cost *= c.cost_multiplier_up
                cost_up_flag = True
            elif cost_down_counter >= c.patience:
                cost_down_counter = 0
                cost /= c.cost_multiplier_down
                cost_down_flag = True
        # early stopping
        if c.early_stop:
            if math.isfinite(best_norm):
                if best_norm >= c.early_stop_threshold * stop_best:
                    stop_counter += 1
                else:
                    stop_counter = 0
            stop_best = min(stop_best, best_norm)
            if cost_up_flag and cost_down_flag and stop_counter >= c.early_stop_patience:
                break
    if not math.isfinite(best_norm):  # no valid trigger: the last one, as the batched run
        with torch.no_grad():
            best_mask = mask_from_theta(theta_mask)[0].clone()
            best_pattern = pattern_from_theta(theta_pattern, value_range).clone()
    return best_norm, best_mask, best_pattern, steps


def reverse_triggers_sequential(
    model: nn.Module,
    data: Dataset,
    spec: InputSpec,
    config: ReversalConfig | None = None,
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
) -> ReversalResult:
    """Neural Cleanse label by label with the full budget each (``config.steps`` at
    ``config.batch_size``; the screening and restart settings are ignored), then the MAD
    test on the final norms. Same result type as the batched
    :func:`~.reversal.reverse_triggers`."""
    c = config or ReversalConfig()
    started = time.perf_counter()
    if not isinstance(spec, InputSpec):
        raise InvalidInput("an input spec (shape, value range, optional mean/std) is required")
    wrapped = wrap(model, spec).to(device)
    was_training = wrapped.training
    wrapped.eval()
    laid_out = contextlib.ExitStack()
    try:
        classes = validate_inputs(wrapped, data, spec)
        layout = reversal_layout(wrapped, data, c, device)
        # only the triggers are optimised: the weights get no gradient (none left on them)
        laid_out.enter_context(frozen_weights(wrapped))
        laid_out.enter_context(weight_layout(wrapped, layout))
        if len(data) > c.max_samples:
            data = data.subset(c.max_samples, seed=c.seed)
        x, y = data.x.float().to(device), data.y.long().to(device)
        norms: list[float | None] = []
        masks, patterns = [], []
        steps = 0
        for label in range(classes):
            if progress is not None:
                progress(label / classes, f"label {label}/{classes}")
            norm, mask, pattern, taken = reverse_label(
                wrapped, x, y, label, classes, spec.value_range, c
            )
            norms.append(norm if math.isfinite(norm) else None)
            masks.append(mask)
            patterns.append(pattern)
            steps += taken
        decision = mad_test(
            norms,
            consistency=c.mad_consistency,
            threshold=c.anomaly_threshold,
            min_valid=c.min_valid_labels,
            scale=c.norm_scale,
        )
        mask_t, pattern_t = torch.stack(masks), torch.stack(patterns)
        index = verification_subset(len(x), c).to(x.device)
        success = _attack_success(wrapped, x[index], y[index], mask_t, pattern_t)
        evaluations = steps * min(c.batch_size, len(x)) + classes * int(index.numel())
    finally:
        laid_out.close()
        wrapped.train(was_training)
    # the batched implementation's size condition, so both decide by the same rule
    flagged = tuple(
        k
        for k in decision.flagged
        if (label_norm := norms[k]) is not None and label_norm <= c.max_norm_ratio * decision.median
    )
    labels = tuple(
        LabelResult(
            label=k,
            l1_norm=math.nan if norms[k] is None else float(norms[k] or 0.0),
            anomaly_index=math.nan if (i := decision.anomaly_index[k]) is None else float(i),
            attack_success=success[k],
            reached_threshold=norms[k] is not None,
            refined=True,
            trigger_norm=float(mask_t[k].sum()),
            index_min=math.nan if i is None else float(i),
            index_median=math.nan if i is None else float(i),
        )
        for k in range(classes)
    )
    return ReversalResult(
        labels=labels,
        flagged=flagged,
        verdict=INFECTED if flagged else CLEAN,
        masks=mask_t.cpu(),
        patterns=pattern_t.cpu(),
        restarts=(RestartInfo(c.seed, tuple(norms), decision.anomaly_index, flagged, c.steps),),
        steps=steps,
        evaluations=evaluations,
        seconds=time.perf_counter() - started,
        evidence={
            "median_norm": decision.median,
            "mad": decision.mad,
            "rule": decision.rule,
            "weight_layout": layout,
        },
        value_range=spec.value_range,
        config=c,
    )


@torch.no_grad()
def _attack_success(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor
) -> list[float]:
    out = []
    for label in range(int(masks.shape[0])):
        keep = y != label
        if not bool(keep.any()):
            out.append(math.nan)
            continue
        stamped = (1 - masks[label]) * x[keep] + masks[label] * patterns[label]
        out.append(float((model(stamped).argmax(1) == label).float().mean()))
    return out


class SequentialNeuralCleanse(NeuralCleanse):
    """The `modelguard.detection.base.BackdoorDetector` of the original procedure, label by
    label (`reverse_triggers_sequential`). It takes the batched detector's configs and
    rules; screening, restarts, refinement and the re-check do not apply to it."""

    name: ClassVar[str] = "neural-cleanse-sequential"

    def detect(
        self,
        model: nn.Module,
        data: Dataset,
        spec: InputSpec,
        config: ReversalConfig | None = None,
        progress: Progress | None = None,
    ) -> ReversalResult:
        return reverse_triggers_sequential(model, data, spec, config=config, progress=progress)
