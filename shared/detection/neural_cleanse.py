"""Trigger reversal (Neural Cleanse) with all labels batched: screening, MAD decision,
refinement of the suspects, re-check; independent restarts when the evidence is close.

Paper: Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
Networks", IEEE S&P 2019. The screening follows the pruning-with-rollback method (screen every
label, keep the low-norm ones as suspicious, spend the full budget re-checking only them).

Pipeline of :func:`reverse_triggers` (K labels, input ``(C, H, W)``):

1. **Screening** — every label's trigger is optimised with the full Neural Cleanse
   procedure (λ schedule, best-mask rule, early stopping; :mod:`.optimizer`), all K
   labels in one forward pass per step, on small mini-batches
   (``screening_batch_size``, 4 images instead of the original's 32) for the same number
   of steps: an eighth of the images. With 4 images a step, "reaching the threshold"
   means flipping all 4 — a laxer test than 99% of 32 — so screening norms come out
   smaller than the original's; but they do so for every label alike, and the anomaly
   index only compares the labels with one another (it is scale-free). On CPU, where the
   model's arithmetic is the whole cost, this — not the batching, which saves ~10% — is
   where the speed comes from. Under ``rule="paper"`` screening is the full optimisation.
2. **Decision** — the MAD outlier test (:mod:`.mad`) on the screening norms (log scale by
   default), and a size condition: the flagged label's trigger must also be at most
   ``max_norm_ratio`` (1/3) of the median label's. The MAD index says "unusual for this
   model"; the ratio says "a much smaller change than any natural class needs". Natural
   classes that are merely easy to reach (an MNIST "1", a Fashion-MNIST "shirt") measured
   0.33–0.9 of the median on the zoo, backdoor triggers 0.03–0.37. The log scale and
   this condition are departures from the paper (``rule="paper"``, below, has neither). The
   decision is taken here, on equal-budget norms, and nowhere else: comparing the refined
   norms of a few suspects with the unrefined norms of the other labels would make any
   refined label look small — a false positive by construction.
3. **Restarts** (``restarts``, at most 3 by default) — when a label's anomaly index lies
   within ``restart_margin`` (25%) of the threshold, another screening run from another
   random start and mini-batch order (seed + r) is made; a label's index is then the
   *median* over the runs (0 in runs where its norm is not below the median), so it is
   flagged only when most independent runs flag it. Clear cases cost one run. (Taking the
   smallest norm over runs instead would raise false positives: the minimum of noisy
   estimates is more extreme.)
4. **Refinement** — the flagged labels (plus labels whose index exceeds
   ``suspect_threshold``, up to ``max_suspects``) continue from their best screening run
   with the full budget: up to ``steps`` steps of ``batch_size`` (32) images, as the
   original, the best trigger judged afresh on those larger batches. This is the
   trigger the downstream stages stamp (neuron scoring, pruning).
5. **Re-check** — every label's returned trigger is evaluated on ``verify_samples``
   clean images (a seeded subset; images of the label itself excluded); a flagged label
   whose refined trigger flips fewer than ``verify_threshold`` of them is rejected as a
   screening artefact.

The verdict is ``"infected"`` when at least one label remains flagged. Deterministic for
a given seed on CPU with one thread (the service sets the thread count, not this code).

**Rules** (``ReversalConfig.rule``, built by :meth:`ReversalConfig.for_rule`):
``"modelguard"`` is the pipeline above with its defaults. ``"paper"`` is Neural Cleanse's
own test: every label optimised once with the full budget on full batches (screening
batch = ``batch_size``, one run, no restarts, no refinement), the MAD test on the linear
L1 norms (index > ``anomaly_threshold`` for labels below the median), no size condition
(``max_norm_ratio = 1``) and no re-check (``verify_threshold = 0``). The optimisation
itself (Adam, λ schedule, best-mask rule, early stopping) is the same under both.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.mad import SCALES, mad_test
from modelguard.detection.optimizer import (
    OptimizerSettings,
    TriggerOptimizer,
    mask_from_theta,
    pattern_from_theta,
)
from modelguard.errors import InvalidInput
from modelguard.progress import Progress
from modelguard.spec import InputSpec, wrap

log = logging.getLogger(__name__)


INFECTED = "infected"
CLEAN = "clean"

#: Named decision rules (see the module docstring): this project's, and Neural Cleanse's.
MODELGUARD = "modelguard"
PAPER = "paper"
RULES = (MODELGUARD, PAPER)


@dataclass(frozen=True)
class ReversalConfig:
    """Every hyperparameter of the reversal, validated on construction.

    Optimisation (Neural Cleanse; a *step* is one Adam update on one mini-batch):

    * ``steps`` — step budget of a label (early stopping usually ends it sooner).
    * ``batch_size`` — images per step during refinement (the original's 32).
    * ``screening_batch_size`` — images per step during screening; ``screening_steps`` —
      screening step budget (None: ``steps``).
    * ``lr``, ``beta1``, ``beta2`` — Adam (the paper's code: 0.1, 0.5, 0.9).
    * ``init_cost``, ``cost_multiplier_up``, ``cost_multiplier_down``, ``patience`` —
      the λ schedule (1e-3, ×2, ÷2^1.5, 5 steps).
    * ``attack_threshold`` — attack success a trigger must reach (0.99).
    * ``early_stop``, ``early_stop_threshold``, ``early_stop_patience`` — stop a label
      once λ went up and down and its best norm has not improved by more than
      ``1 − early_stop_threshold`` for ``early_stop_patience`` steps.

    Decision: ``anomaly_threshold`` (2), ``mad_consistency`` (1.4826), ``norm_scale``
    (``"log"``: the MAD test on log norms, see :mod:`.mad`; ``"linear"``: the paper's
    rule on the norms themselves), ``max_norm_ratio`` (a flagged label's trigger norm is at
    most this share of the median's; 1 disables the condition), ``min_valid_labels``
    (3: fewer labels with a trigger make the test inconclusive), ``suspect_threshold``
    and ``max_suspects`` (which labels are refined), ``verify_threshold`` (attack success
    of the refined trigger for a flag to stand), ``verify_samples`` (clean images, a seeded
    subset, on which every returned trigger's attack success is measured).

    Restarts and data: ``restarts`` (most independent screening runs; another is made
    only while some label's median index is within ``restart_margin`` × threshold of the
    threshold; 1 disables restarts), ``seed`` (run r uses seed + r), ``max_samples``
    (clean images used at most, a seeded subset), ``max_batch_images`` (largest forward
    batch; labels are chunked above it).

    ``refine`` — continue the suspects with the full budget after screening (False: the
    screening triggers are returned as they are). ``verify_threshold = 0`` turns the
    re-check off. ``rule`` — the named preset the fields follow (``"modelguard"`` or
    ``"paper"``); a ``"paper"`` config whose fields depart from Neural Cleanse's test is
    refused, so a report saying "paper" means the paper's test. Build presets with
    :meth:`for_rule` (or :meth:`paper`).
    """

    steps: int = 300
    batch_size: int = 32
    screening_steps: int | None = None
    screening_batch_size: int = 4
    lr: float = 0.1
    beta1: float = 0.5
    beta2: float = 0.9
    init_cost: float = 1e-3
    cost_multiplier_up: float = 2.0
    cost_multiplier_down: float = 2.0**1.5
    patience: int = 5
    attack_threshold: float = 0.99
    early_stop: bool = True
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 25
    anomaly_threshold: float = 2.0
    mad_consistency: float = 1.4826
    norm_scale: str = "log"
    max_norm_ratio: float = 1 / 3
    min_valid_labels: int = 3
    suspect_threshold: float = 2.0
    max_suspects: int = 3
    verify_threshold: float = 0.5
    verify_samples: int = 300
    restarts: int = 3
    restart_margin: float = 0.25
    seed: int = 0
    max_samples: int = 1000
    max_batch_images: int = 4096
    refine: bool = True
    rule: str = MODELGUARD

    @classmethod
    def for_rule(cls, rule: str = MODELGUARD, /, **overrides: Any) -> ReversalConfig:
        """The config of the named ``rule`` with ``overrides`` (seed, steps, …) applied; an
        override that contradicts the rule (e.g. ``norm_scale="log"`` under ``"paper"``) is
        refused with ``InvalidInput``."""
        if rule not in RULES:
            raise InvalidInput(f"detection rule must be one of {', '.join(RULES)}; got {rule!r}")
        if rule == MODELGUARD:
            return cls(**overrides)
        batch_size = overrides.get("batch_size", cls.batch_size)
        paper: dict[str, Any] = {
            **_paper_fields(batch_size),
            "screening_steps": None,  # screening is the full optimisation
        }
        return cls(**{**paper, **overrides, "rule": PAPER})

    @classmethod
    def paper(cls, **overrides: Any) -> ReversalConfig:
        """Neural Cleanse's original test (see the module docstring)."""
        return cls.for_rule(PAPER, **overrides)

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidInput(f"invalid reversal config: {message}")

        for name in ("steps", "batch_size", "screening_batch_size", "patience", "restarts"):
            require(_is_int(getattr(self, name)) and getattr(self, name) >= 1, f"{name} >= 1")
        for name in ("early_stop_patience", "max_suspects", "min_valid_labels"):
            require(_is_int(getattr(self, name)) and getattr(self, name) >= 0, f"{name} >= 0")
        require(_is_int(self.seed) and self.seed >= 0, "seed must be an integer >= 0")
        require(
            self.screening_steps is None
            or (_is_int(self.screening_steps) and self.screening_steps >= 1),
            f"screening_steps must be None (= steps) or >= 1; got {self.screening_steps}",
        )
        require(_is_int(self.max_samples) and self.max_samples >= 2, "max_samples >= 2")
        require(_is_int(self.verify_samples) and self.verify_samples >= 1, "verify_samples >= 1")
        require(_is_int(self.max_batch_images) and self.max_batch_images >= 1, "max_batch_images")
        require(_finite(self.lr) and self.lr > 0, "lr > 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "Adam betas in [0, 1)")
        require(_finite(self.init_cost) and self.init_cost > 0, "init_cost > 0")
        require(_finite(self.cost_multiplier_up) and self.cost_multiplier_up > 1, "multiplier > 1")
        require(
            _finite(self.cost_multiplier_down) and self.cost_multiplier_down > 1, "multiplier > 1"
        )
        require(0 < self.attack_threshold <= 1, "attack_threshold in (0, 1]")
        require(0 < self.early_stop_threshold <= 1, "early_stop_threshold in (0, 1]")
        require(_finite(self.anomaly_threshold) and self.anomaly_threshold >= 0, "threshold")
        require(_finite(self.mad_consistency) and self.mad_consistency > 0, "mad_consistency")
        require(self.norm_scale in SCALES, f"norm_scale must be one of {SCALES}")
        require(0 < self.max_norm_ratio <= 1, "max_norm_ratio in (0, 1]")
        require(_finite(self.suspect_threshold) and self.suspect_threshold >= 0, "suspects")
        require(0 <= self.verify_threshold <= 1, "verify_threshold in [0, 1]")
        require(self.restart_margin >= 0, "restart_margin >= 0 (inf: always make every restart)")
        require(isinstance(self.refine, bool), "refine must be a bool")
        require(self.rule in RULES, f"rule must be one of {', '.join(RULES)}")
        if self.rule == PAPER:
            expected = _paper_fields(self.batch_size)
            conflicts = [
                f"{name}={getattr(self, name)!r} (the paper's: {value!r})"
                for name, value in expected.items()
                if getattr(self, name) != value
            ]
            if self.screening_budget != self.steps:
                conflicts.append(f"screening_steps={self.screening_steps!r} (the paper's: steps)")
            require(
                not conflicts,
                "rule 'paper' is Neural Cleanse's own test (build it with "
                "ReversalConfig.paper()); these fields depart from it: " + ", ".join(conflicts),
            )

    @property
    def screening_budget(self) -> int:
        """Step limit of the screening pass (early stopping usually ends it sooner)."""
        return self.steps if self.screening_steps is None else self.screening_steps

    def optimizer_settings(self, *, screening: bool) -> OptimizerSettings:
        return OptimizerSettings(
            batch_size=self.screening_batch_size if screening else self.batch_size,
            lr=self.lr,
            beta1=self.beta1,
            beta2=self.beta2,
            init_cost=self.init_cost,
            cost_multiplier_up=self.cost_multiplier_up,
            cost_multiplier_down=self.cost_multiplier_down,
            patience=self.patience,
            attack_threshold=self.attack_threshold,
            early_stop=self.early_stop,
            early_stop_threshold=self.early_stop_threshold,
            early_stop_patience=self.early_stop_patience,
            max_batch_images=self.max_batch_images,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _paper_fields(batch_size: int) -> dict[str, Any]:
    """The fields Neural Cleanse's test fixes: every label optimised once on full batches,
    the linear MAD test alone (no size condition, restarts, refinement or re-check)."""
    return {
        "norm_scale": "linear",
        "max_norm_ratio": 1.0,
        "restarts": 1,
        "screening_batch_size": batch_size,
        "refine": False,
        "verify_threshold": 0.0,
    }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class LabelResult:
    """One label's outcome.

    ``l1_norm`` — L1 norm of the smallest mask reaching the threshold in screening (the
    value the MAD test compares; median over runs when there were several; NaN when no
    trigger reached the threshold). ``anomaly_index`` — its MAD anomaly index, the median
    over screening runs (0 in a run where the norm is not below that run's median; NaN
    without a valid trigger). ``attack_success`` — share of the clean images (of other
    labels) the returned trigger flips to this label. ``reached_threshold`` — a trigger
    reaching ``attack_threshold`` was found. ``refined`` — the label was refined;
    ``trigger_norm`` is the L1 norm of the returned mask (the refined one for suspects).
    ``steps`` — its optimisation steps over all phases. ``index_min`` /
    ``index_median`` — smallest and median index over the screening runs.
    """

    label: int
    l1_norm: float
    anomaly_index: float
    attack_success: float
    reached_threshold: bool
    refined: bool = False
    trigger_norm: float = math.nan
    steps: int = 0
    index_min: float = math.nan
    index_median: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RestartInfo:
    """One screening run: its seed, per-label norms (None: no trigger), MAD anomaly
    indices and flags, the steps it took, its median norm and dispersion (MAD, or the
    fallback of :mod:`.mad`) and the rule used."""

    seed: int
    norms: tuple[float | None, ...]
    anomaly_index: tuple[float | None, ...]
    flagged: tuple[int, ...]
    screening_steps: int
    median: float = math.nan
    mad: float = math.nan
    rule: str = "mad"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "norms": [_clean(v) for v in self.norms],
            "anomaly_index": [_clean(v) for v in self.anomaly_index],
            "flagged": list(self.flagged),
            "screening_steps": self.screening_steps,
            "median": _clean(self.median),
            "mad": _clean(self.mad),
            "rule": self.rule,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ReversalResult:
    """Outcome of a reversal. ``masks`` ``(K, H, W)`` in [0, 1] and ``patterns``
    ``(K, C, H, W)`` in the declared value range (raw input space): the trigger of label
    ``k`` is ``x' = (1 − masks[k]) ⊙ x + masks[k] ⊙ patterns[k]``.

    ``steps`` — optimisation steps summed over labels and restarts; ``evaluations`` —
    images passed through the model (forward, and backward while optimising);
    ``evidence`` — the numbers behind the verdict, for the report.
    """

    labels: tuple[LabelResult, ...]
    flagged: tuple[int, ...]
    verdict: str
    masks: torch.Tensor
    patterns: torch.Tensor
    restarts: tuple[RestartInfo, ...]
    steps: int
    evaluations: int
    seconds: float
    evidence: dict[str, Any] = field(default_factory=dict)
    value_range: tuple[float, float] = (0.0, 1.0)
    config: ReversalConfig = field(default_factory=ReversalConfig)

    @property
    def infected(self) -> bool:
        return self.verdict == INFECTED

    @property
    def suspects(self) -> tuple[int, ...]:
        return tuple(r.label for r in self.labels if r.refined)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the mask/pattern tensors are left out: they are large)."""
        return {
            "verdict": self.verdict,
            "flagged": list(self.flagged),
            "labels": [r.to_dict() for r in self.labels],
            "suspects": list(self.suspects),
            "restarts": [r.to_dict() for r in self.restarts],
            "steps": self.steps,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "evidence": _clean(self.evidence),
            "value_range": list(self.value_range),
            "config": self.config.to_dict(),
        }


def _clean(value: Any) -> Any:
    """NaN/inf → None, recursively (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# ---------------------------------------------------------------------- validation


def validate_inputs(model: nn.Module, data: Dataset, spec: InputSpec) -> int:
    """Check that ``data`` matches the declared ``spec`` and that the (wrapped) model maps
    it to finite logits; returns the number of classes K. Raises ``InvalidInput``."""
    if not isinstance(spec, InputSpec):
        raise InvalidInput("an input spec (shape, value range, optional mean/std) is required")
    x, y = data.x, data.y
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise InvalidInput("clean data x must be a tensor (N, C, H, W)")
    if tuple(x.shape[1:]) != tuple(spec.shape):
        raise InvalidInput(
            f"clean data has shape {list(x.shape[1:])} per image but the declared input "
            f"shape is {list(spec.shape)}"
        )
    if not x.is_floating_point():
        raise InvalidInput(f"clean data must be floating point; got {x.dtype}")
    if x.shape[0] < 2:
        raise InvalidInput("at least two clean images are needed")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InvalidInput("clean labels y must be a tensor (N,) matching x")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise InvalidInput(f"clean labels must be integers; got {y.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInput("clean data contains NaN or infinite values")
    low, high = spec.value_range
    tolerance = 1e-3 * (high - low)
    x_min, x_max = float(x.min()), float(x.max())
    if x_min < low - tolerance or x_max > high + tolerance:
        raise InvalidInput(
            f"clean data spans [{x_min:.4g}, {x_max:.4g}] but the declared value range is "
            f"[{low:g}, {high:g}]: declare the range the data is really in (normalisation "
            "belongs in mean/std, not in the data)"
        )
    probe = x[:2].float()
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as err:
        raise InvalidInput(
            f"the model does not accept inputs of the declared shape {list(spec.shape)}: {err}"
        ) from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        raise InvalidInput("the model must return logits of shape (N, classes)")
    if not bool(torch.isfinite(out).all()):
        raise InvalidInput("the model returns NaN or infinite logits on the clean data")
    classes = int(out.shape[1])
    if classes < 2:
        raise InvalidInput("the model returns fewer than two classes")
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise InvalidInput(f"clean labels must lie in 0..{classes - 1} (the model's classes)")
    return classes


# ---------------------------------------------------------------------- entry point


def reverse_triggers(
    model: nn.Module,
    data: Dataset,
    spec: InputSpec,
    config: ReversalConfig | None = None,
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
) -> ReversalResult:
    """Reverse-engineer a trigger for every label of ``model`` and decide whether it is
    backdoored.

    ``model`` maps inputs of ``spec`` (after its declared normalisation) to logits
    ``(N, K)``: a registered architecture or a TorchScript module, as loaded. It is wrapped
    with :func:`modelguard.spec.wrap` here, so triggers live in the raw value range. ``data``
    is a small clean set ``x`` ``(N, C, H, W)`` in ``spec.value_range`` with labels ``y``
    ``(N,)``. The model is put in eval mode for the run (its mode is restored after) and
    moved to ``device``; its parameters are not modified.
    """
    config = config or ReversalConfig()
    started = time.perf_counter()
    if not isinstance(spec, InputSpec):
        raise InvalidInput("an input spec (shape, value range, optional mean/std) is required")
    wrapped = wrap(model, spec).to(device)
    was_training = wrapped.training
    wrapped.eval()
    try:
        classes = validate_inputs(wrapped, data, spec)
        return _Reversal(wrapped, data, spec, config, classes, progress, device).run(started)
    finally:
        wrapped.train(was_training)


class _Reversal:
    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        spec: InputSpec,
        config: ReversalConfig,
        classes: int,
        progress: Progress | None,
        device: torch.device | str,
    ) -> None:
        self.model = model
        self.spec = spec
        self.config = config
        self.classes = classes
        self.progress = progress
        self.device = torch.device(device)
        if len(data) > config.max_samples:
            data = data.subset(config.max_samples, seed=config.seed)
        self.x = data.x.float().to(self.device)
        self.y = data.y.long().to(self.device)
        self.labels = list(range(classes))
        # progress accounting in images through the model: one screening run (early
        # stopping ends it near half its budget) plus the refinement of one label
        c = config
        self.planned = max(
            1,
            classes * c.screening_budget * c.screening_batch_size // 2
            + (c.steps * c.batch_size // 2 if c.refine else 0),
        )
        self.done = 0

    def report(self, message: str) -> None:
        if self.progress is not None:
            self.progress(min(0.99, self.done / self.planned), message)

    def run(self, started: float) -> ReversalResult:
        c = self.config
        runs: list[TriggerOptimizer] = []
        infos: list[RestartInfo] = []
        for restart in range(c.restarts):
            optimizer, info = self.screen(restart)
            runs.append(optimizer)
            infos.append(info)
            combined = combine_restarts(infos)
            if not self.ambiguous(combined, infos):
                break
            if restart + 1 < c.restarts:
                log.info("anomaly indices %s are near the threshold: another restart", combined)
                self.planned += self.classes * c.screening_budget * c.screening_batch_size // 2

        decision = decide(infos, c)
        index, ratios, decided = decision.index, decision.ratios, decision.decided
        not_small = [k for k in decision.outliers if k not in decided]
        suspects = self.select_suspects(infos, index, decided) if c.refine else []
        # each label's trigger comes from the run that found its smallest one
        best_run = [_smallest_run(infos, k) for k in range(self.classes)]
        for r, optimizer in enumerate(runs):
            mine = [k for k in suspects if best_run[k] == r]
            if mine:
                self.refine(optimizer, mine)

        reached = [any(info.norms[k] is not None for info in infos) for k in range(self.classes)]
        masks = torch.stack([runs[best_run[k]].best_mask[k] for k in range(self.classes)])
        patterns = torch.stack([runs[best_run[k]].best_pattern[k] for k in range(self.classes)])
        for k in range(self.classes):
            if not reached[k]:  # no valid trigger: return the last one, for inspection
                last = runs[best_run[k]]
                masks[k] = mask_from_theta(last.theta_mask[k, 0])
                patterns[k] = pattern_from_theta(last.theta_pattern[k], self.spec.value_range)
        self.report("re-checking the triggers on the clean set")
        success, verify_evals = self.attack_success(masks, patterns)
        # verify_threshold 0: no re-check (a NaN success, no image of another label, stands)
        flagged = tuple(
            k for k in decided if c.verify_threshold == 0 or success[k] >= c.verify_threshold
        )
        rejected = [k for k in decided if k not in flagged]

        labels = tuple(
            LabelResult(
                label=k,
                l1_norm=_median_or_nan([info.norms[k] for info in infos]),
                anomaly_index=index[k] if reached[k] else math.nan,
                attack_success=success[k],
                reached_threshold=reached[k],
                refined=k in suspects,
                trigger_norm=float(masks[k].sum()),
                steps=int(sum(int(run.label_steps[k]) for run in runs)),
                index_min=min(_scores(infos, k)) if reached[k] else math.nan,
                index_median=index[k] if reached[k] else math.nan,
            )
            for k in range(self.classes)
        )
        evidence = self.evidence(labels, flagged, rejected, suspects, infos)
        evidence["rule"] = c.rule
        evidence["norm_ratio"] = [_clean(r) for r in ratios]
        evidence["max_norm_ratio"] = c.max_norm_ratio
        if not_small:
            evidence["outliers_not_small"] = not_small
            evidence["summary"] += (
                f"; labels {not_small} are MAD outliers but their triggers are "
                + ", ".join(f"{ratios[k]:.2f}" for k in not_small)
                + f" of the median norm, above {c.max_norm_ratio:.2f} (natural classes, "
                "not flagged)"
            )
        if self.progress is not None:
            self.progress(1.0, "done")
        return ReversalResult(
            labels=labels,
            flagged=flagged,
            verdict=INFECTED if flagged else CLEAN,
            masks=masks.detach().cpu(),
            patterns=patterns.detach().cpu(),
            restarts=tuple(infos),
            steps=int(sum(int(run.label_steps.sum()) for run in runs)),
            evaluations=int(sum(run.evaluations for run in runs)) + verify_evals,
            seconds=time.perf_counter() - started,
            evidence=evidence,
            value_range=self.spec.value_range,
            config=c,
        )

    def ambiguous(self, index: Sequence[float], infos: Sequence[RestartInfo]) -> bool:
        """Whether another independent screening run is worth its cost: a label's (median)
        anomaly index lies within ``restart_margin`` of the threshold, or a label over the
        threshold has a trigger-to-median ratio within ``restart_margin`` of
        ``max_norm_ratio`` (either condition alone could flip the verdict)."""
        c = self.config
        low = c.anomaly_threshold * (1 - c.restart_margin)
        high = c.anomaly_threshold * (1 + c.restart_margin)
        if any(low <= value <= high for value in index):
            return True
        ratio_low = c.max_norm_ratio * (1 - c.restart_margin)
        ratio_high = c.max_norm_ratio * (1 + c.restart_margin)
        return any(
            value > c.anomaly_threshold and ratio_low <= norm_ratio(infos, k) <= ratio_high
            for k, value in enumerate(index)
        )

    # -------------------------------------------------------------- screening
    def screen(self, restart: int) -> tuple[TriggerOptimizer, RestartInfo]:
        """One screening run: all labels, batched, ``screening_batch_size`` images a step,
        until each label stops early (or the screening budget is spent)."""
        c = self.config
        seed = c.seed + restart
        optimizer = TriggerOptimizer(
            self.model,
            self.x,
            self.y,
            self.labels,
            self.spec.value_range,
            c.optimizer_settings(screening=True),
            torch.Generator().manual_seed(seed),
            device=self.device,
        )
        base = self.done
        message = f"screening all {self.classes} labels (run {restart + 1})"

        def tick(step: int) -> None:
            if step % 10 == 0:
                self.done = base + optimizer.evaluations
                self.report(message)

        optimizer.optimize(c.screening_budget, progress=tick)
        self.done = base + optimizer.evaluations
        norms = tuple(
            float(v) if math.isfinite(float(v)) else None for v in optimizer.best_norm.cpu()
        )
        return optimizer, screening_run(norms, c, seed=seed, steps=optimizer.step_count)

    def select_suspects(
        self, infos: list[RestartInfo], index: list[float], decided: tuple[int, ...]
    ) -> list[int]:
        """The labels to refine: every flagged one, plus labels whose (median) index
        exceeds ``suspect_threshold``, highest first, up to ``max_suspects`` in all."""
        c = self.config
        extra = sorted(
            (k for k in range(self.classes) if k not in decided and index[k] > c.suspect_threshold),
            key=lambda k: -index[k],
        )
        room = max(0, c.max_suspects - len(decided))
        return sorted(set(decided) | set(extra[:room]))

    def refine(self, optimizer: TriggerOptimizer, labels: list[int]) -> None:
        """Continue ``labels`` of a screening run with the full budget and batch: masks,
        patterns, Adam moments and λ carry on; the best trigger is chosen afresh on the
        larger batches (kept from screening if refinement never reaches the threshold)."""
        c = self.config
        rows = torch.tensor(labels, dtype=torch.long, device=self.device)
        previous = optimizer.reopen(rows, c.optimizer_settings(screening=False))
        active = torch.zeros(self.classes, dtype=torch.bool, device=self.device)
        active[rows] = True
        base, before = self.done, optimizer.evaluations
        self.planned += len(labels) * c.steps * c.batch_size // 2

        def tick(step: int) -> None:
            if step % 10 == 0:
                self.done = base + optimizer.evaluations - before
                self.report(f"refining the suspects {labels}")

        optimizer.optimize(optimizer.step_count + c.steps, active, progress=tick)
        optimizer.keep_previous_if_unreached(previous)
        self.done = base + optimizer.evaluations - before

    # -------------------------------------------------------------- re-check
    @torch.no_grad()
    def attack_success(
        self, masks: torch.Tensor, patterns: torch.Tensor
    ) -> tuple[list[float], int]:
        """Share of the clean images of other labels that each label's trigger flips."""
        hits = torch.zeros(self.classes)
        counts = torch.zeros(self.classes)
        evaluations = 0
        chunk = max(1, self.config.max_batch_images // self.classes)
        targets = torch.arange(self.classes, device=self.device).unsqueeze(1)
        m = masks.to(self.device).unsqueeze(1).unsqueeze(2)  # (K, 1, 1, H, W)
        p = patterns.to(self.device).unsqueeze(1)  # (K, 1, C, H, W)
        index = verification_subset(int(self.x.shape[0]), self.config)
        xs, ys = self.x[index.to(self.device)], self.y[index.to(self.device)]
        for start in range(0, int(xs.shape[0]), chunk):
            x = xs[start : start + chunk]
            y = ys[start : start + chunk]
            stamped = (1 - m) * x.unsqueeze(0) + m * p
            logits = self.model(stamped.reshape(-1, *x.shape[1:]))
            predicted = logits.reshape(self.classes, x.shape[0], -1).argmax(-1)
            keep = (y.unsqueeze(0) != targets).float()
            hits += ((predicted == targets).float() * keep).sum(1).cpu()
            counts += keep.sum(1).cpu()
            evaluations += self.classes * int(x.shape[0])
        rate = torch.where(counts > 0, hits / counts.clamp_min(1), torch.full_like(hits, math.nan))
        return [float(v) for v in rate], evaluations

    def evidence(
        self,
        labels: tuple[LabelResult, ...],
        flagged: tuple[int, ...],
        rejected: list[int],
        suspects: list[int],
        infos: list[RestartInfo],
    ) -> dict[str, Any]:
        c = self.config
        runs = len(infos)
        per_run = f" (median over {runs} screening runs)" if runs > 1 else ""
        median = statistics.median(info.median for info in infos)
        if flagged:
            parts = [
                f"label {k}: trigger L1 norm {labels[k].l1_norm:.1f} vs median {median:.1f}, "
                f"anomaly index {labels[k].anomaly_index:.2f} > {c.anomaly_threshold:g}"
                f"{per_run}, {'refined ' if labels[k].refined else ''}trigger flips "
                f"{labels[k].attack_success:.1%} of the clean images"
                for k in flagged
            ]
            summary = "infected: " + "; ".join(parts)
        elif all(info.rule == "inconclusive" for info in infos):
            summary = "clean (inconclusive): " + infos[0].reason
        else:
            top = max((r.anomaly_index for r in labels if r.reached_threshold), default=0.0)
            summary = (
                f"clean: no label's trigger is an outlier below the median (largest anomaly "
                f"index {top:.2f}{per_run}, threshold {c.anomaly_threshold:g})"
            )
        if rejected:
            summary += (
                f"; labels {rejected} were outliers at screening but their refined trigger "
                f"flips fewer than {c.verify_threshold:.0%} of the clean images (rejected)"
            )
        return {
            "summary": summary,
            "median_norm": median,
            "threshold": c.anomaly_threshold,
            "screening_runs": runs,
            "suspects": suspects,
            "rejected_at_recheck": rejected,
            "run_flags": [list(info.flagged) for info in infos],
        }


def _scores(infos: Sequence[RestartInfo], k: int) -> list[float]:
    """Label ``k``'s anomaly index in each screening run, counted as 0 where it has no
    trigger, where the run was inconclusive, or where its norm is not below the median
    (only small triggers are suspicious)."""
    out = []
    for info in infos:
        value, norm = info.anomaly_index[k], info.norms[k]
        small = norm is not None and norm < info.median
        out.append(float(value) if value is not None and small else 0.0)
    return out


def screening_run(
    norms: Sequence[float | None], config: ReversalConfig, *, seed: int = 0, steps: int = 0
) -> RestartInfo:
    """One screening run's MAD test on its per-label ``norms`` (None: no trigger)."""
    c = config
    result = mad_test(
        norms,
        consistency=c.mad_consistency,
        threshold=c.anomaly_threshold,
        min_valid=c.min_valid_labels,
        scale=c.norm_scale,
    )
    return RestartInfo(
        seed=seed,
        norms=tuple(norms),
        anomaly_index=result.anomaly_index,
        flagged=result.flagged,
        screening_steps=steps,
        median=result.median,
        mad=result.dispersion,
        rule=result.rule,
        reason=result.reason,
    )


@dataclass(frozen=True)
class Decision:
    """Per label, the anomaly index (median over runs) and the norm over the median norm;
    ``outliers``: index above the threshold; ``decided``: outliers that also meet the size
    condition (flagged unless the re-check rejects them)."""

    index: list[float]
    ratios: list[float]
    outliers: list[int]
    decided: tuple[int, ...]


def decide(infos: Sequence[RestartInfo], config: ReversalConfig) -> Decision:
    """The outlier decision over the screening runs ``infos`` (see :func:`combine_restarts`
    and ``max_norm_ratio``)."""
    c = config
    classes = len(infos[0].norms)
    index = combine_restarts(infos)
    ratios = [norm_ratio(infos, k) for k in range(classes)]
    outliers = [k for k in range(classes) if index[k] > c.anomaly_threshold]
    # max_norm_ratio 1 is no size condition at all (not even on a NaN ratio)
    decided = tuple(k for k in outliers if c.max_norm_ratio >= 1 or ratios[k] <= c.max_norm_ratio)
    return Decision(index, ratios, outliers, decided)


def norm_ratio(infos: Sequence[RestartInfo], k: int) -> float:
    """Label ``k``'s trigger norm over the run's median norm, the median over the runs
    where it has a trigger (NaN if none)."""
    ratios = [
        norm / info.median
        for info in infos
        if (norm := info.norms[k]) is not None and math.isfinite(info.median) and info.median > 0
    ]
    return float(statistics.median(ratios)) if ratios else math.nan


def combine_restarts(infos: Sequence[RestartInfo]) -> list[float]:
    """Per label, the median over screening runs of its anomaly index (see
    :func:`_scores`). A label is flagged when this exceeds the threshold, i.e. (for an odd
    number of runs) when a majority of the independent runs flag it; with one run this is
    exactly the Neural Cleanse rule."""
    classes = len(infos[0].norms)
    return [statistics.median(_scores(infos, k)) for k in range(classes)]


def verification_subset(n: int, config: ReversalConfig) -> torch.Tensor:
    """Indices of the clean images the re-check uses: ``verify_samples`` of the ``n``,
    seeded (the same for the batched and the sequential implementation)."""
    generator = torch.Generator().manual_seed(config.seed + 104729)
    return torch.randperm(n, generator=generator)[: config.verify_samples]


def _smallest_run(infos: Sequence[RestartInfo], k: int) -> int:
    """The screening run that found label ``k``'s smallest valid trigger (0 if none)."""
    valid = [(norm, r) for r, info in enumerate(infos) if (norm := info.norms[k]) is not None]
    return min(valid)[1] if valid else 0


def _median_or_nan(values: Sequence[float | None]) -> float:
    valid = [v for v in values if v is not None]
    return float(statistics.median(valid)) if valid else math.nan


# ---------------------------------------------------------------------- pictures


def trigger_images(
    result: ReversalResult, base: torch.Tensor | None = None
) -> dict[int, np.ndarray]:
    """Per label, one uint8 picture ``mask | pattern | trigger`` side by side (2-pixel
    gaps): ``(H, 3W + 4)`` for one channel, ``(H, 3W + 4, 3)`` RGB for three. The trigger
    panel is ``mask ⊙ pattern`` on black, or the trigger stamped on ``base`` ``(C, H, W)``
    (a clean image in the value range) when given."""
    low, high = result.value_range
    masks, patterns = result.masks.float(), result.patterns.float()
    k, channels, height, width = patterns.shape
    out: dict[int, np.ndarray] = {}
    for label in range(k):
        mask = masks[label].clamp(0, 1)
        pattern = ((patterns[label] - low) / (high - low)).clamp(0, 1)
        if base is not None:
            clean = ((base.float() - low) / (high - low)).clamp(0, 1)
            stamped = (1 - mask) * clean + mask * pattern
        else:
            stamped = mask * pattern
        mask_panel = mask.expand(channels, height, width)
        gap = torch.ones(channels, height, 2)
        picture = torch.cat([mask_panel, gap, pattern, gap, stamped], dim=2)
        array = (picture * 255).round().to(torch.uint8)
        if channels == 1:
            out[label] = array[0].numpy()
        elif channels == 3:
            out[label] = array.permute(1, 2, 0).contiguous().numpy()
        else:  # other channel counts: show the channel mean
            out[label] = array.float().mean(0).round().to(torch.uint8).numpy()
    return out


class NeuralCleanse:
    """The `modelguard.detection.base.BackdoorDetector` of this module: Neural Cleanse with
    all labels batched (`reverse_triggers`); its rules are `RULES` (`ReversalConfig.for_rule`)."""

    name: ClassVar[str] = "neural-cleanse"
    rules: ClassVar[tuple[str, ...]] = RULES

    def configure(self, rule: str = "", **overrides: Any) -> ReversalConfig:
        return ReversalConfig.for_rule(rule or self.rules[0], **overrides)

    def detect(
        self,
        model: nn.Module,
        data: Dataset,
        spec: InputSpec,
        config: ReversalConfig | None = None,
        progress: Progress | None = None,
    ) -> ReversalResult:
        return reverse_triggers(model, data, spec, config=config, progress=progress)
