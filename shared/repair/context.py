"""Pruning primitives shared by the repair modes.

*Pruning a neuron* zeroes its output: the weight row (Linear) or output filter (Conv2d)
and its bias are set to 0 **in place** (for an input site ``<layer>:in``, the weight
column: the feature no longer reaches the layer), so the change is in the saved weights of every
format (safetensors, state dict, TorchScript) and needs no wrapper code. Rolling back
restores the saved values exactly. Fine-tuning keeps pruned neurons at zero by zeroing
their gradients and re-zeroing them after every optimiser step (Adam's moment estimates
would otherwise move them).

When a batch-norm layer follows a pruned convolution, the channel after normalisation is
a constant (``β - γ·μ/σ``) instead of 0: it carries no information about the input any
more, which is what removes the trigger's path through it, and the layers after it absorb
the constant.

`RepairContext` holds what every mode needs: the working copy of the model, the split of
the defender's clean data (fine-tuning part, validation part), the reversed-trigger set
stamped on the validation part, the original model's validation predictions (for the
agreement ``q``) and an evaluation counter.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from modelguard.datasets import Dataset
from modelguard.detection.optimizer import OptimizerSettings, TriggerOptimizer
from modelguard.detection.triggers import ReversedTrigger
from modelguard.errors import InvalidInput
from modelguard.nn.probe import (
    LayerInfo,
    LayerProbe,
    evaluating,
    frozen_weights,
    get_module,
    is_scripted,
    normalise,
)
from modelguard.progress import Progress
from modelguard.repair.result import Measure
from modelguard.repair.scoring import AttackSet, as_reversed_triggers, build_attack_set
from modelguard.spec import InputSpec, wrap

log = logging.getLogger(__name__)


#: Weights from which a model whose site is its classifier's input gets a classifier edit
#: rather than an end-to-end fine-tune (``final_scope="auto"``): the size of a real
#: ImageNet-scale network, far above the small models sized for 28×28 inputs.
REFIT_MIN_PARAMETERS = 2_000_000


def copy_model(model: nn.Module) -> nn.Module:
    """An independent copy: ``copy.deepcopy`` for eager modules, a ``torch.jit``
    save/load round trip for TorchScript (which keeps it a loadable archive)."""
    if is_scripted(model):
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        loaded: nn.Module = torch.jit.load(buffer, map_location="cpu")
        return loaded
    return copy.deepcopy(model)


class Pruner:
    """The pruned neurons of one site of ``model`` (a layer name, which means its
    outputs, or a `LayerInfo`, which may be a Linear layer's inputs), applied to its
    weights in place: rows / filters and bias for outputs, columns for inputs."""

    def __init__(self, model: nn.Module, layer: str | LayerInfo) -> None:
        info = layer if isinstance(layer, LayerInfo) else None
        self.model = model
        self.layer = info.name if info else str(layer)
        self.module = get_module(model, info.module if info else str(layer))
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        self.weight: torch.Tensor = weight
        #: the weight dimension indexed by neuron (1: input features)
        self.dim = info.weight_dim if info else 0
        bias = getattr(self.module, "bias", None) if self.dim == 0 else None
        self.bias: torch.Tensor | None = bias if isinstance(bias, torch.Tensor) else None
        self.neurons = int(weight.shape[self.dim])
        self.pruned: list[int] = []
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _check(self, index: int) -> None:
        if not 0 <= index < self.neurons:
            raise InvalidInput(
                f"neuron {index} is not in layer {self.layer} (0..{self.neurons - 1})"
            )

    @torch.no_grad()
    def prune(self, index: int) -> None:
        """Zero neuron ``index`` (saving its parameters for `unprune`)."""
        self._check(index)
        if index in self._saved:
            return
        self._saved[index] = (
            self.weight.data.select(self.dim, index).clone(),
            self.bias.data[index].clone() if self.bias is not None else None,
        )
        self.weight.data.select(self.dim, index).zero_()
        if self.bias is not None:
            self.bias.data[index] = 0
        self.pruned.append(index)

    @torch.no_grad()
    def unprune(self, index: int) -> None:
        """Roll back the pruning of ``index``: restore the parameters saved by `prune`."""
        if index not in self._saved:
            raise ValueError(f"neuron {index} of {self.layer} is not pruned")
        weight, bias = self._saved.pop(index)
        self.weight.data.select(self.dim, index).copy_(weight)
        if self.bias is not None and bias is not None:
            self.bias.data[index] = bias
        self.pruned.remove(index)

    @torch.no_grad()
    def reapply(self) -> None:
        """Zero every pruned neuron again (after an optimiser step)."""
        if self.pruned:
            index = torch.tensor(self.pruned, dtype=torch.long)
            self.weight.data.index_fill_(self.dim, index, 0)
            if self.bias is not None:
                self.bias.data[index] = 0

    def mask_gradients(self) -> None:
        if not self.pruned:
            return
        index = torch.tensor(self.pruned, dtype=torch.long)
        if self.weight.grad is not None:
            self.weight.grad.index_fill_(self.dim, index, 0)
        if self.bias is not None and self.bias.grad is not None:
            self.bias.grad[index] = 0

    def keep_mask(self) -> torch.Tensor:
        """``(n,)`` float: 0 for pruned neurons, 1 otherwise."""
        keep = torch.ones(self.neurons)
        if self.pruned:
            keep[self.pruned] = 0
        return keep

    def is_zero(self) -> bool:
        """Whether every pruned neuron's parameters are exactly zero."""
        if not self.pruned:
            return True
        index = torch.tensor(self.pruned, dtype=torch.long)
        zero = bool((self.weight.data.index_select(self.dim, index) == 0).all())
        if self.bias is not None:
            zero = zero and bool((self.bias.data[index] == 0).all())
        return zero


@dataclass(frozen=True)
class FineTuneConfig:
    """Fine-tuning on the clean fine-tuning split (cross-entropy on its labels, Adam).
    ``local_steps``: optimiser steps after each kept prune (the rollback method's local fine-tune;
    the reference method fits the layer by least squares, a few gradient steps are the accepted
    equivalent). ``local_objective="original"`` keeps the reference method's intent: the steps fit,
    by least squares, the logits of the *original* model on the clean fine-tuning split,
    which is what ``q`` measures (training on labels instead moves an imperfect model away
    from the original and drains the agreement budget step after step);
    ``local_unlearn`` adds the trigger unlearning below to them. ``final_epochs`` (at
    least ``final_min_steps`` steps, for small clean sets): the closing fine-tune from the
    pruned weights, on the labels.
    ``freeze_batchnorm`` keeps batch-norm running statistics fixed (small batches of a
    few thousand samples would otherwise shift them). ``keep_best``: undo the final
    fine-tune when it revives the attack or costs accuracy for nothing (see
    `RepairContext.final_fine_tune`).

    ``unlearn_fraction``: share of every fine-tuning batch stamped with a reversed trigger
    while keeping its true label (Neural Cleanse's unlearning, Wang et al. 2019, §VI-C).
    Fine-tuning on clean data alone re-grows the backdoor in the layers after a pruned
    one: on an infected LeNet-5 with 12 of 120 ``fc1`` neurons pruned (reversed ASR 8%),
    100 clean Adam steps brought the real trigger's ASR back to 35–80% depending on
    which layers were tuned; with a 0.2 share stamped it stayed at 1%. 0 gives the reference
    method's clean-only fine-tune (and is what the Fine-Pruning baseline uses).
    ``unlearn_jitter``: each stamped trigger is shifted by a random offset of up to this
    fraction of the image side (2 pixels at 28×28), zero-filled. A reversed trigger is
    an approximation that often sits a little off the real one; unlearning its shifted
    copies too generalised to the real trigger far better (on a 3×3-patch LeNet-5 whose
    reversed mask was a scatter of pixels near the patch: real ASR 14% → 5% after the
    rollback repair, clean accuracy unchanged).
    ``unlearn_dilate``: the stamped mask is grown by this many pixels (a max filter), the
    pattern unchanged. Neural Cleanse finds the *smallest* trigger, usually a subset of the
    real one (on the zoo's Fashion-MNIST LeNet-5 five of the patch's nine pixels); the
    model then still answers the pixels left out. Growing the mask covers them: real ASR
    after the rollback repair 21% (no dilation, share 0.2) → 13% (1 pixel) → 11% (2) →
    9.5% (2 pixels, share 0.35), clean accuracy −0.2 → −1.2 points; on the MNIST 3×3
    model 1.5% → 1.0%.
    ``local_seconds``/``final_seconds``: wall-time caps of one local and of the final
    fine-tune. On a small model the step counts decide; on a real one (every step a full
    forward and backward pass of a large network) the caps keep a repair within minutes,
    and the steps run are reported.
    ``final_scope``: what the final fine-tune trains. ``model``: every weight. ``classifier``
    (the site must be a classifier's input features): only the classifier is re-fitted, on
    the features of the clean fine-tuning images (towards the original's logits) and of the
    same images stamped with the (dilated, shifted) reversed triggers (see
    ``refit_margin``), pulled towards its weights (``refit_pull`` times the squared
    distance, beside mean squared errors over the edited rows; ``refit_steps`` full-batch
    Adam steps at ``refit_lr``). A model of millions of weights
    fine-tuned end to end on a few hundred images forgets what they do not show (its
    agreement with the original collapses), while the features are computed once and the
    classifier is all that decides the label. ``auto``: ``classifier`` for a model of at
    least `REFIT_MIN_PARAMETERS` weights whose site is its classifier's input, else ``model``.
    Beside the re-fit, the ``classifier`` scope tries an edit without training, after
    linear concept erasure (Belrose et al., "LEACE", 2023): the directions along which the
    reversed triggers move the features (the top right singular vectors of the stamped
    minus clean features) are projected out of the edited rows, each removed
    direction's mean clean value folded into the bias, with the fewest directions (at most
    ``erase_max_rank``) that bring the reversed ASR on the validation split under
    ``erase_asr_stop``. Of the two, the validation split keeps the one that removes the
    attack with the higher agreement. When neither does, it keeps the lowest reversed ASR
    among the edits (the re-fit and every erasure rank tried) whose agreement stays at or
    above ``edit_min_agreement``, and when none does, the edit with the highest agreement:
    an edit that leaves the attack in place must not also break the model.

    ``edit_rows`` (the ``classifier`` scope): ``flagged`` confines both edits to the
    classifier's rows of the flagged labels, and the pruning search before it is skipped
    (pruning the classifier's input changes every class's logit). Every other class's
    logit is then exactly the original's, so a clean image's answer can only change where
    a flagged label's logit crosses the top one; an edit of all rows (``all``), or
    pruning the input features, moves the answers of the many low-margin images of a
    1000-class model, which a validation split of a few dozen images cannot police.
    ``refit_margin``: in the re-fit, the logit of the label whose trigger an image carries
    need not match its logit on the clean image, only stay at least this far below it (a
    one-sided loss, in both ``edit_rows`` modes): the reversed trigger only approximates the
    real one, and the margin carries the unlearning over to it. Every other edited row is
    fitted to the clean logits both ways. A model repaired without triggers (the
    Fine-Pruning baseline) gets the re-fit on clean features alone, of every row.

    ``unlearn_restarts`` (the ``classifier`` scope): before the edit, each flagged label's
    trigger is reversed again on the fine-tuning split from this many random starts
    (Neural Cleanse's optimisation, ``restart_steps`` steps on batches of
    ``restart_batch`` images, all restarts in one batched run stopped after
    ``restart_seconds``), and every restart that reaches the attack threshold is stamped
    beside the given trigger, unless its mask's L1 norm exceeds ``restart_max_norm_ratio``
    times the given trigger's (a much larger trigger is a feature of the label, not the
    backdoor: Neural Cleanse's premise). The smallest trigger the reversal finds is one
    sparse subset of a real patch's pixels, a different one from each start: unlearning
    several covers more of the real trigger than unlearning one. A trigger whose footprint
    (the pixels where its mask is at least half its maximum) covers more than
    ``restart_max_footprint`` of the image is a blend: a search for the smallest mask finds
    something else, so it is not reversed again. Off by default (0: the given triggers
    alone): it helped the tuning patch model and not the held-out one (results page).
    """

    local_steps: int = 30
    local_lr: float = 1e-4
    local_objective: Literal["original", "labels"] = "original"
    local_unlearn: bool = False
    final_epochs: int = 3
    final_min_steps: int = 150
    final_objective: Literal["original", "labels"] = "original"
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    freeze_batchnorm: bool = True
    keep_best: bool = True
    unlearn_fraction: float = 0.35
    unlearn_jitter: float = 0.075
    unlearn_dilate: int = 2
    local_seconds: float = 20.0
    final_seconds: float = 240.0
    final_scope: Literal["auto", "model", "classifier"] = "auto"
    refit_steps: int = 300
    refit_lr: float = 1e-3
    refit_pull: float = 1e-2
    edit_rows: Literal["flagged", "all"] = "flagged"
    refit_margin: float = 1.0
    erase_max_rank: int = 8
    erase_asr_stop: float = 0.10
    #: the agreement floor of an edit that does not remove the attack (the rollback
    #: mode's default q0)
    edit_min_agreement: float = 0.97
    unlearn_restarts: int = 0
    restart_steps: int = 200
    restart_batch: int = 4
    restart_seconds: float = 240.0
    restart_max_norm_ratio: float = 2.0
    restart_max_footprint: float = 0.25

    def __post_init__(self) -> None:
        if self.local_steps < 0 or self.final_epochs < 0 or self.batch_size < 1:
            raise ValueError("local_steps, final_epochs >= 0 and batch_size >= 1 required")
        if self.lr <= 0 or self.local_lr <= 0:
            raise ValueError("lr and local_lr must be > 0")
        if {self.local_objective, self.final_objective} - {"original", "labels"}:
            raise ValueError("local_objective and final_objective must be original or labels")
        if self.final_min_steps < 0:
            raise ValueError("final_min_steps must be >= 0")
        if not 0.0 <= self.unlearn_fraction < 1.0:
            raise ValueError("unlearn_fraction must be in [0, 1)")
        if not 0.0 <= self.unlearn_jitter < 0.5:
            raise ValueError("unlearn_jitter must be in [0, 0.5)")
        if not 0 <= self.unlearn_dilate <= 8:
            raise ValueError("unlearn_dilate must be in 0..8 pixels")
        if self.local_seconds <= 0 or self.final_seconds <= 0:
            raise ValueError("local_seconds and final_seconds must be > 0")
        if self.final_scope not in ("auto", "model", "classifier"):
            raise ValueError("final_scope must be auto, model or classifier")
        if self.refit_steps < 0 or self.refit_lr <= 0 or self.refit_pull < 0:
            raise ValueError("refit_steps >= 0, refit_lr > 0 and refit_pull >= 0 required")
        if self.edit_rows not in ("flagged", "all") or self.refit_margin < 0:
            raise ValueError("edit_rows must be flagged or all, and refit_margin >= 0")
        if self.erase_max_rank < 0 or not 0.0 < self.erase_asr_stop <= 1.0:
            raise ValueError("erase_max_rank >= 0 and erase_asr_stop in (0, 1] required")
        if not 0.0 <= self.edit_min_agreement <= 1.0:
            raise ValueError("edit_min_agreement in [0, 1] required")
        if self.unlearn_restarts < 0 or self.restart_steps < 1 or self.restart_batch < 1:
            raise ValueError("unlearn_restarts >= 0, restart_steps >= 1, restart_batch >= 1")
        if self.restart_seconds <= 0 or self.restart_max_norm_ratio <= 0:
            raise ValueError("restart_seconds and restart_max_norm_ratio must be > 0")
        if not 0.0 < self.restart_max_footprint <= 1.0:
            raise ValueError("restart_max_footprint must be in (0, 1]")


def _is_batchnorm(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return is_scripted(module) and "BatchNorm" in str(getattr(module, "original_name", ""))


def fine_tune(
    model: nn.Module,
    data: Dataset,
    spec: InputSpec,
    pruners: list[Pruner],
    config: FineTuneConfig,
    *,
    steps: int,
    seed: int = 0,
    triggers: Sequence[ReversedTrigger] = (),
    lr: float | None = None,
    targets: torch.Tensor | None = None,
    seconds: float | None = None,
) -> int:
    """``steps`` Adam steps on ``data`` (raw inputs; ``spec``'s normalisation applied
    here), keeping every pruner's neurons at zero. The loss is cross-entropy on the labels,
    or, with ``targets`` (logits ``(N, K)`` aligned with ``data``), least squares between
    the model's logits and them. With ``triggers`` and ``config.unlearn_fraction > 0``, that
    share of each batch is stamped with a random one of them, its label (or target) that
    of the unstamped sample. ``seconds``: stop after this much wall time even if steps
    remain. Returns the number of steps run; leaves the model in eval mode."""
    if steps <= 0 or len(data) == 0:
        return 0
    deadline = time.perf_counter() + seconds if seconds is not None else math.inf
    run = 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(
        params, lr=config.lr if lr is None else lr, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    # grown once here, not on every batch
    stamped = _unlearning_triggers(triggers, config)
    n = len(data)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    model.train()
    if config.freeze_batchnorm:
        for module in model.modules():
            if _is_batchnorm(module):
                module.eval()
    try:
        for _ in range(steps):
            if time.perf_counter() > deadline:
                log.info("fine-tune stopped by its time cap after %d of %d steps", run, steps)
                break
            if cursor >= n:
                order, cursor = torch.randperm(n, generator=generator), 0
            index = order[cursor : cursor + config.batch_size]
            cursor += config.batch_size
            x, y = data.x[index], data.y[index]
            if triggers and config.unlearn_fraction > 0:
                jitter = round(config.unlearn_jitter * min(spec.shape[1:]))
                x, _ = _stamp_share(x, stamped, config.unlearn_fraction, spec, generator, jitter)
            logits = model(normalise(x, spec))
            if targets is None:
                loss = F.cross_entropy(logits, y)
            else:
                loss = F.mse_loss(logits, targets[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            for pruner in pruners:
                pruner.mask_gradients()
            optimiser.step()
            for pruner in pruners:
                pruner.reapply()
            run += 1
    finally:
        model.eval()
    return run


def _stamp_share(
    x: torch.Tensor,
    triggers: Sequence[ReversedTrigger],
    fraction: float,
    spec: InputSpec,
    generator: torch.Generator,
    jitter: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fraction`` of ``x`` stamped with a random one of ``triggers`` (shifted by up to
    ``jitter`` pixels), and each row's trigger label (-1: left clean)."""
    count = round(fraction * len(x))
    labels = torch.full((len(x),), -1, dtype=torch.long)
    if count == 0 or not triggers:
        return x, labels
    x = x.clone()
    rows = torch.randperm(len(x), generator=generator)[:count]
    which = torch.randint(len(triggers), (count,), generator=generator)
    for row, t in zip(rows.tolist(), which.tolist(), strict=True):
        trigger = triggers[t]
        mask, pattern = trigger.mask, trigger.pattern
        if jitter > 0:
            dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
            mask, pattern = _shift(mask, dy, dx), _shift(pattern, dy, dx)
        x[row] = ((1 - mask) * x[row] + mask * pattern).clamp(*spec.value_range)
        labels[row] = trigger.label
    return x, labels


def choose_edit(
    figures: dict[str, tuple[float, float]], asr_stop: float, min_agreement: float
) -> str:
    """The classifier edit to keep, from ``{name: (reversed ASR, agreement)}`` on the
    validation split: of those that remove the attack (ASR under ``asr_stop``), the one
    with the highest agreement; else, of those that keep ``min_agreement``, the lowest
    ASR; else the highest agreement."""
    removed = [name for name, (asr, _) in figures.items() if asr < asr_stop]
    if removed:
        return max(removed, key=lambda name: figures[name][1])
    safe = [name for name, (_, agreement) in figures.items() if agreement >= min_agreement]
    if safe:
        return min(safe, key=lambda name: figures[name][0])
    return max(figures, key=lambda name: figures[name][1])


def _unlearning_triggers(
    triggers: Sequence[ReversedTrigger], config: FineTuneConfig
) -> Sequence[ReversedTrigger]:
    """The triggers as unlearning stamps them: masks grown by ``unlearn_dilate`` pixels."""
    if not config.unlearn_dilate:
        return triggers
    return [_dilated(t, config.unlearn_dilate) for t in triggers]


def footprint(mask: torch.Tensor) -> float:
    """The share of the image where ``mask`` is at least half its maximum."""
    peak = float(mask.max())
    return float((mask >= 0.5 * peak).float().mean()) if peak > 0 else 0.0


def _dilated(trigger: ReversedTrigger, pixels: int) -> ReversedTrigger:
    """The trigger with its mask grown by ``pixels`` (a max filter), pattern unchanged."""
    mask = trigger.mask.reshape(1, 1, *trigger.mask.shape[-2:])
    grown = F.max_pool2d(mask, 2 * pixels + 1, stride=1, padding=pixels)
    return replace(trigger, mask=grown.reshape(trigger.mask.shape))


def _shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``t`` (…, H, W) moved by (dy, dx) pixels, zero-filled (no wrap-around)."""
    out = torch.zeros_like(t)
    height, width = t.shape[-2], t.shape[-1]
    src_y = slice(max(0, -dy), height - max(0, dy))
    dst_y = slice(max(0, dy), height - max(0, -dy))
    src_x = slice(max(0, -dx), width - max(0, dx))
    dst_x = slice(max(0, dx), width - max(0, -dx))
    out[..., dst_y, dst_x] = t[..., src_y, src_x]
    return out


#: Rows of one forward pass of a repair's probe (candidate prunings × samples).
PROBE_MAX_ROWS = 8192


def _validation_size(n: int, validation_fraction: float) -> int:
    return max(1, round(n * validation_fraction))


def can_split(n: int, validation_fraction: float) -> bool:
    """Whether `split_clean` accepts ``n`` samples."""
    return n >= 20 and n - _validation_size(n, validation_fraction) >= 1


def split_label(validation_fraction: float, seed: int = 0) -> str:
    """Names the fine-tuning part of `split_clean` (``"tune:0.3:seed=0"``): what a neuron
    ranking computed on it says in ``data_split``."""
    return f"tune:{validation_fraction:g}:seed={seed}"


def split_clean(
    data: Dataset, validation_fraction: float, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Seeded random split into (fine-tuning, validation)."""
    n = len(data)
    n_val = _validation_size(n, validation_fraction)
    if not can_split(n, validation_fraction):
        raise InvalidInput(
            f"the clean dataset has {n} samples; the repair needs at least 20 (a part to "
            "fine-tune on and a part to validate every pruning decision)"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, tune = order[:n_val], order[n_val:]
    return Dataset(data.x[tune], data.y[tune]), Dataset(data.x[val], data.y[val])


@dataclass(frozen=True)
class Candidates:
    """Figures of ``P`` candidate prunings, each ``(P,)``; ``asr`` is the max over triggers,
    ``mean_asr`` and ``soft`` the means."""

    asr: torch.Tensor
    mean_asr: torch.Tensor
    soft: torch.Tensor
    agreement: torch.Tensor
    accuracy: torch.Tensor
    per_trigger: torch.Tensor  # (P, T)


@dataclass
class RepairContext:
    """The working state of one repair (see the module docstring)."""

    model: nn.Module
    spec: InputSpec
    probe: LayerProbe
    pruner: Pruner
    tune: Dataset
    val: Dataset
    attack: AttackSet
    reference: torch.Tensor  # (V,) original predictions on val
    tune_logits: torch.Tensor  # (T, K) original logits on the fine-tuning split
    finetune: FineTuneConfig
    triggers: list[ReversedTrigger]
    seed: int = 0
    evaluations: int = 0
    finetune_steps: int = 0
    progress: Progress | None = None
    notes: list[str] = field(default_factory=list)
    #: the classifier edit made at the end, if any (see `refit_classifier`)
    edit: str = ""

    @classmethod
    def build(
        cls,
        model: nn.Module,
        data: Dataset,
        spec: InputSpec,
        triggers: object,
        *,
        layer: str | None,
        validation_fraction: float,
        attack_samples: int,
        val_samples: int,
        finetune: FineTuneConfig,
        seed: int,
        progress: Progress | None,
        max_rows: int = PROBE_MAX_ROWS,
    ) -> RepairContext:
        model.eval()
        items = as_reversed_triggers(triggers, spec)
        tune, val = split_clean(data, validation_fraction, seed)
        if len(val) > val_samples:
            val = val.subset(val_samples, seed=seed)
        attack = build_attack_set(val, items, spec, samples=attack_samples, seed=seed)
        probe = LayerProbe(model, layer, spec, max_rows=max_rows)
        with evaluating(model):
            reference = probe.logits(val.x).argmax(1)
            tune_logits = probe.logits(tune.x)
        context = cls(
            model=model,
            spec=spec,
            probe=probe,
            pruner=Pruner(model, probe.info),
            tune=tune,
            val=val,
            attack=attack,
            reference=reference,
            tune_logits=tune_logits,
            finetune=finetune,
            triggers=items,
            seed=seed,
            progress=progress,
        )
        if probe.info.reason:
            context.notes.append(f"pruning site {probe.info.name}: {probe.info.reason}")
        if probe.mode == "weights":
            context.notes.append(
                "TorchScript graph probe unavailable: candidate prunings were evaluated one "
                "forward pass each by weight masking"
            )
        return context

    def report(self, fraction: float, text: str) -> None:
        if self.progress is not None:
            self.progress(max(0.0, min(1.0, fraction)), text)

    @torch.no_grad()
    def candidates(self, keep: torch.Tensor) -> Candidates:
        """Score ``P`` candidate keep-masks ``(P, n)`` on top of the current model, in
        batched forward passes (2·P evaluations: stamped set and validation set)."""
        attack_logits = self.probe.masked_logits(self.attack.x, keep)
        val_logits = self.probe.masked_logits(self.val.x, keep)
        self.evaluations += 2 * int(keep.shape[0])
        per_trigger = self.attack.asr(attack_logits)
        predicted = val_logits.argmax(-1)
        return Candidates(
            asr=per_trigger.amax(-1),
            mean_asr=per_trigger.mean(-1),
            soft=self.attack.soft_asr(attack_logits).mean(-1),
            agreement=(predicted == self.reference).float().mean(-1),
            accuracy=(predicted == self.val.y).float().mean(-1),
            per_trigger=per_trigger,
        )

    def measure(self) -> Measure:
        """Figures of the model as it is now."""
        scores = self.candidates(torch.ones(1, self.probe.neurons))
        return Measure(
            agreement=float(scores.agreement[0]),
            reversed_asr=float(scores.asr[0]),
            accuracy=float(scores.accuracy[0]),
            per_trigger_asr=tuple(float(v) for v in scores.per_trigger[0]),
            soft_asr=float(scores.soft[0]),
        )

    def local_fine_tune(self) -> None:
        """A short fine-tune after a kept pruning step; none when only the classifier is
        edited at the end (a large model: an end-to-end step would need the activations
        of a whole batch through it, and the closing classifier edit restores it)."""
        if self.final_scope() == "classifier":
            note = "no local fine-tunes: the classifier edit at the end restores agreement"
            if note not in self.notes:
                self.notes.append(note)
            return
        self.finetune_steps += fine_tune(
            self.model,
            self.tune,
            self.spec,
            [self.pruner],
            self.finetune,
            steps=self.finetune.local_steps,
            seed=self.seed + self.finetune_steps,
            triggers=self.triggers if self.finetune.local_unlearn else (),
            lr=self.finetune.local_lr,
            targets=self.tune_logits if self.finetune.local_objective == "original" else None,
            seconds=self.finetune.local_seconds,
        )

    def final_scope(self) -> Literal["model", "classifier"]:
        """What the final fine-tune trains (see `FineTuneConfig`, ``final_scope``)."""
        info, scope = self.probe.info, self.finetune.final_scope
        weight = getattr(self.probe.module, "weight", None)
        at_classifier = (
            info.side == "input"
            and isinstance(weight, torch.Tensor)
            and int(weight.shape[0]) == int(self.tune_logits.shape[1])
        )
        if scope == "classifier" and not at_classifier:
            raise InvalidInput(
                f"the classifier re-fit needs the site to be a classifier's input features; "
                f"{info.name} is not"
            )
        if scope == "auto":
            large = sum(p.numel() for p in self.model.parameters()) >= REFIT_MIN_PARAMETERS
            return "classifier" if at_classifier and large else "model"
        return "classifier" if scope == "classifier" else "model"

    def edited_rows(self) -> list[int]:
        """The classifier rows the closing edit may change: the flagged labels', or every
        row (``edit_rows="all"``, or no trigger to name the labels)."""
        if self.finetune.edit_rows == "flagged" and self.triggers:
            return sorted({t.label for t in self.triggers})
        return list(range(int(self.tune_logits.shape[1])))

    def skip_pruning(self) -> bool:
        """True (with a note) when the closing edit is confined to the flagged rows (see
        `FineTuneConfig`, ``edit_rows``): the pruning search is then not run."""
        confined = (
            self.final_scope() == "classifier"
            and self.finetune.edit_rows == "flagged"
            and bool(self.triggers)
        )
        if not confined:
            return False
        self.notes.append(
            f"no pruning at {self.probe.info.name}: only the flagged labels' rows of the "
            "classifier are edited, and pruning its input features would change every "
            "class's answer"
        )
        return True

    def refit_classifier(self) -> None:
        """Edit the classifier whose input features are the site (see `FineTuneConfig`):
        the re-fit and the erasure are both computed on features computed once (the rest
        of the model is left as it is), and the validation split chooses between them."""
        config = self.finetune
        generator = torch.Generator().manual_seed(self.seed + 7919)
        unlearned = [*self.triggers, *self.restarted_triggers()]
        stamped_triggers = _unlearning_triggers(unlearned, config)
        jitter = round(config.unlearn_jitter * min(self.spec.shape[1:]))
        # each image stamped twice: where the trigger was found and shifted a little
        copies = [
            _stamp_share(self.tune.x, stamped_triggers, 1.0, self.spec, generator, shift)
            for shift in (0, jitter)
        ]
        _, clean_features = self.probe.capture(self.tune.x)
        if stamped_triggers:
            _, stamped_features = self.probe.capture(torch.cat([x for x, _ in copies]))
            stamped_labels = torch.cat([labels for _, labels in copies])
        else:  # nothing to unlearn (the Fine-Pruning baseline): the clean features alone
            stamped_features = clean_features[:0]
            stamped_labels = torch.zeros(0, dtype=torch.long)
        classifier = self.probe.module
        weight = getattr(classifier, "weight", None)
        bias = getattr(classifier, "bias", None)
        assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
        keep = self.pruner.keep_mask().reshape(1, -1).to(weight.dtype)
        start_weight = weight.detach().clone() * keep
        start_bias = bias.detach().clone() if bias is not None else torch.zeros(weight.shape[0])
        _, val_features = self.probe.capture(self.val.x)
        _, attack_features = self.probe.capture(self.attack.x)
        refit = self._refitted(
            (clean_features, stamped_features, stamped_labels),
            start_weight,
            start_bias,
            keep,
            fit_bias=bias is not None,
        )
        edits = {"re-fit": refit}
        figures = {
            "re-fit": self._classifier_figures(refit[0], refit[1], val_features, attack_features)
        }
        if bias is not None and config.erase_max_rank > 0 and stamped_triggers:
            for rank, (edit, measured) in self._erasures(
                (clean_features, stamped_features, val_features, attack_features),
                start_weight,
                start_bias,
                keep,
            ).items():
                edits[f"erasure (rank {rank})"] = edit
                figures[f"erasure (rank {rank})"] = measured
        chosen = choose_edit(figures, config.erase_asr_stop, config.edit_min_agreement)
        fitted_weight, fitted_bias, how = edits[chosen]
        with torch.no_grad():
            weight.copy_(fitted_weight * keep)
            if bias is not None:
                bias.copy_(fitted_bias)
        self.finetune_steps += config.refit_steps
        compared = "; ".join(
            f"{name}: reversed ASR {asr:.3f}, agreement {agreement:.3f}"
            for name, (asr, agreement) in figures.items()
        )
        module, rows = self.probe.info.module, self.edited_rows()
        if len(rows) < int(self.tune_logits.shape[1]):
            where = f"the rows of label(s) {', '.join(map(str, rows))} of the classifier {module}"
            rest = "every other class's row and the rest of the model unchanged"
        else:
            where, rest = f"the classifier {module}", "the rest of the model unchanged"
        if self.pruner.pruned:
            rest += ", beside the pruned input features"
        self.edit = f"{where} ({chosen})"
        edited = f"{where} edited by {how}, {rest}"
        self.notes.append(
            f"final fine-tune: {edited} (validation split, {compared}; {chosen} kept)"
        )

    def restarted_triggers(self) -> list[ReversedTrigger]:
        """The flagged labels' triggers reversed again from ``unlearn_restarts`` random
        starts (see `FineTuneConfig`): those that reach the attack threshold."""
        config = self.finetune
        if config.unlearn_restarts == 0:
            return []
        labels = sorted(
            {t.label for t in self.triggers if footprint(t.mask) <= config.restart_max_footprint}
        )
        if not labels:
            return []
        rows = [label for label in labels for _ in range(config.unlearn_restarts)]
        self.report(0.9, f"reversing {len(labels)} trigger(s) again from {len(rows)} starts")
        started = time.perf_counter()
        with frozen_weights(self.model):  # only the triggers are optimised
            optimizer = TriggerOptimizer(
                wrap(self.model, self.spec),
                self.tune.x,
                self.tune.y,
                rows,
                self.spec.value_range,
                OptimizerSettings(batch_size=config.restart_batch),
                torch.Generator().manual_seed(self.seed + 104729),
            )
            optimizer.optimize(
                config.restart_steps,
                deadline=started + config.restart_seconds,
                fit_to_deadline=True,
            )
        given = {
            label: max(float(t.mask.sum()) for t in self.triggers if t.label == label)
            for label in labels
        }
        found = [
            ReversedTrigger(label, optimizer.best_mask[row], optimizer.best_pattern[row])
            for row, label in enumerate(rows)
            if float(optimizer.best_norm[row]) <= config.restart_max_norm_ratio * given[label]
        ]
        self.notes.append(
            f"unlearning set: the given trigger(s) and {len(found)} of {len(rows)} reversals "
            f"from random starts that reached the attack threshold with a mask at most "
            f"{config.restart_max_norm_ratio:g}× the given one's ({optimizer.step_count} "
            f"steps, {time.perf_counter() - started:.0f} s)"
        )
        return found

    def _refitted(
        self,
        features: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        start_weight: torch.Tensor,
        start_bias: torch.Tensor,
        keep: torch.Tensor,
        *,
        fit_bias: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The re-fit of the edited rows. ``features``: the clean features (fitted towards
        the original's logits), the stamped ones and each stamped row's trigger label: the
        logit of that label at least ``refit_margin`` below the original's on the same
        clean image, the other rows towards it. Pulled towards the starting weights; the
        bias is left as it is when the classifier has none (``fit_bias``)."""
        config = self.finetune
        clean_features, stamped_features, stamped_labels = features
        rows = self.edited_rows()
        start_rows = start_weight[rows]
        fitted_weight = start_rows.clone().requires_grad_(True)
        fitted_bias = start_bias[rows].clone().requires_grad_(fit_bias)
        trained = [fitted_weight, fitted_bias] if fit_bias else [fitted_weight]
        optimiser = torch.optim.Adam(trained, lr=config.refit_lr)
        targets = self.tune_logits[:, rows]
        repeats = int(stamped_features.shape[0]) // int(clean_features.shape[0])
        stamped_targets = targets.repeat(repeats, 1)
        carried = stamped_labels[:, None] == torch.tensor(rows)[None, :]  # (M, R)
        for _ in range(config.refit_steps):
            effective = fitted_weight * keep
            loss = (
                F.mse_loss(clean_features @ effective.T + fitted_bias, targets)
                + config.refit_pull * ((fitted_weight - start_rows) ** 2).sum()
            )
            if repeats:
                stamped = stamped_features @ effective.T + fitted_bias
                excess = torch.where(
                    carried,
                    F.relu(stamped - stamped_targets + config.refit_margin),
                    stamped - stamped_targets,
                )
                loss = loss + (excess**2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        weight, bias = start_weight.clone(), start_bias.clone()
        weight[rows], bias[rows] = fitted_weight.detach(), fitted_bias.detach()
        how = f"re-fitting on the features of {len(self.tune)} clean images" + (
            " and of the same images stamped with the reversed trigger(s)" if repeats else ""
        )
        return weight, bias, how

    @torch.no_grad()
    def _erasures(
        self,
        features: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        start_weight: torch.Tensor,
        start_bias: torch.Tensor,
        keep: torch.Tensor,
    ) -> dict[int, tuple[tuple[torch.Tensor, torch.Tensor, str], tuple[float, float]]]:
        """The erasures (see `FineTuneConfig`) of 1, 2, … trigger directions, up to the
        first that brings the reversed ASR on the validation split under
        ``erase_asr_stop`` (or ``erase_max_rank``), each with its validation figures
        (`_classifier_figures`). ``features``: clean, stamped, validation and stamped
        validation features at the site."""
        config = self.finetune
        clean_features, stamped_features, val_features, attack_features = features
        repeats = int(stamped_features.shape[0]) // int(clean_features.shape[0])
        shifts = stamped_features - clean_features.repeat(repeats, 1)
        # the uncentred shifts: their mean is the trigger's main effect and must go too
        _, _, directions = torch.linalg.svd(shifts.double(), full_matrices=False)
        mean = clean_features.double().mean(0)
        rows = self.edited_rows()
        erasures: dict[int, tuple[tuple[torch.Tensor, torch.Tensor, str], tuple[float, float]]] = {}
        for rank in range(1, min(config.erase_max_rank, int(directions.shape[0])) + 1):
            basis = directions[:rank].T  # (n, rank)
            along = start_weight[rows].double() @ basis  # (R, rank)
            weight, bias = start_weight.clone(), start_bias.clone()
            weight[rows] = ((start_weight[rows].double() - along @ basis.T) * keep).to(weight.dtype)
            bias[rows] = (start_bias[rows].double() + along @ (basis.T @ mean)).to(bias.dtype)
            how = (
                f"erasing the {rank} feature direction(s) along which the reversed "
                f"trigger(s) move the features of {len(self.tune)} clean images"
            )
            measured = self._classifier_figures(weight, bias, val_features, attack_features)
            erasures[rank] = ((weight, bias, how), measured)
            if measured[0] < config.erase_asr_stop:
                break
        return erasures

    @torch.no_grad()
    def _classifier_figures(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        val_features: torch.Tensor,
        attack_features: torch.Tensor,
    ) -> tuple[float, float]:
        """The reversed ASR (worst trigger) and the agreement with the original on the
        validation split of a classifier ``weight``, ``bias`` on captured features."""
        attack_logits = attack_features @ weight.T + bias
        val_logits = val_features @ weight.T + bias
        asr = float(self.attack.asr(attack_logits).amax())
        agreement = float((val_logits.argmax(-1) == self.reference).float().mean())
        return asr, agreement

    def final_fine_tune(self, revival: float | None = 0.10) -> Measure:
        """The closing fine-tune (``final_epochs`` over the fine-tuning split, at least
        ``final_min_steps`` steps) from the pruned weights. With ``keep_best`` it is undone
        when it revives the attack (the reversed ASR rises by more than 5 points *and*
        ends above ``revival``) without gaining a point of validation accuracy, or costs
        more than a point of accuracy without lowering the reversed ASR. Returns the final
        figures."""
        before = self.measure()
        epoch = max(1, -(-len(self.tune) // self.finetune.batch_size))
        steps = self.finetune.final_epochs * epoch
        if steps == 0:
            return before
        steps = max(steps, self.finetune.final_min_steps)
        snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.final_scope() == "classifier":
            self.refit_classifier()
        else:
            self.finetune_steps += fine_tune(
                self.model,
                self.tune,
                self.spec,
                [self.pruner],
                self.finetune,
                steps=steps,
                seed=self.seed + 7919,
                triggers=self.triggers,
                targets=self.tune_logits if self.finetune.final_objective == "original" else None,
                seconds=self.finetune.final_seconds,
            )
        after = self.measure()
        threshold = revival if revival is not None else 1.0
        revived = after.reversed_asr > max(before.reversed_asr + 0.05, threshold)
        gained = after.accuracy > before.accuracy + 0.01
        worse = (revived and not gained) or (
            after.accuracy < before.accuracy - 0.01 and after.reversed_asr >= before.reversed_asr
        )
        if self.finetune.keep_best and worse:
            self.model.load_state_dict(snapshot)
            self.edit = ""
            self.notes.append(
                f"final fine-tune undone: validation accuracy {after.accuracy:.4f} vs "
                f"{before.accuracy:.4f}, reversed ASR {after.reversed_asr:.4f} vs "
                f"{before.reversed_asr:.4f}"
            )
            return before
        return after
