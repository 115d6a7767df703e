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
   Masks start faint (``mask_start``), not half-covering as in the paper: from a
   half-covering start the optimisation of a planted target often settles in the class's
   large natural features and never finds the few pixels of its trigger.
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
   estimates is more extreme.) After a triage (a many-class model, where a second run of
   every label rarely fits the time budget) a restart re-screens only the labels in
   doubt; the other labels keep their first run's norms, against which the new norms
   are scored.
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
a given seed on CPU with one thread (the service sets the thread count, not this code),
except where the machine's speed decides: a time budget that cuts the screening steps,
and the weight layout chosen by timing (``weight_layout``, pinned to repeat a run).

**Rules** (``ReversalConfig.rule``, built by :meth:`ReversalConfig.for_rule`):
``"modelguard"`` is the pipeline above with its defaults. ``"paper"`` is Neural Cleanse's
own test: every label optimised once with the full budget on full batches (screening
batch = ``batch_size``, the paper's random start, one run, no restarts, no refinement),
the MAD test on the linear L1 norms (index > ``anomaly_threshold`` for labels below the
median), no size condition (``max_norm_ratio = 1``) and no re-check
(``verify_threshold = 0``). The optimisation itself (Adam, λ schedule, best-mask rule,
early stopping) is the same under both.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, cast

import numpy as np
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.blend_probe import BlendProbeConfig, BlendProbeResult, probe_blend
from modelguard.detection.budget import (
    LAYOUT_PROBE_IMAGES,
    faster_layout,
    measure_pass_cost,
    pass_memory,
)
from modelguard.detection.mad import SCALES, mad_test
from modelguard.detection.optimizer import (
    MASK_STARTS,
    OptimizerSettings,
    TriggerOptimizer,
    mask_from_theta,
    pattern_from_theta,
)
from modelguard.detection.triage import TriageResult, triage_labels
from modelguard.errors import InvalidInput
from modelguard.nn.layout import LAYOUTS, Layout, weight_layout
from modelguard.nn.probe import evaluating, frozen_weights
from modelguard.progress import Progress
from modelguard.spec import InputSpec, wrap

log = logging.getLogger(__name__)


INFECTED = "infected"
CLEAN = "clean"
#: The evidence is not clear within the budget (or too few labels have a trigger): never
#: read as clean.
INCONCLUSIVE = "inconclusive"

#: Fewest screening steps a label's trigger needs to be worth comparing (the λ schedule
#: needs a few dozen steps to set in); a time budget affording fewer is inconclusive.
MIN_SCREENING_STEPS = 60
#: Share of the time left that the screening plan may fill (the re-check, a restart's
#: decision and the per-step overheads take the rest).
TIME_MARGIN = 0.85

#: `ReversalConfig.weight_layout`: channels-last for large inputs unless `faster_layout`
#: finds it clearly slower on the model.
AUTO_LAYOUT = "auto"

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
    * ``mask_start`` — ``"faint"`` (every mask starts near zero, so the pixels that flip
      the images fastest grow first: a planted trigger's few pixels win before a label's
      large natural features, which a half-covering start often settles in) or
      ``"random"`` (Neural Cleanse's start, the paper rule's).

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

    ``blend_probe`` — after the reversal, blend fresh noise into the clean images and flag
    a label that receives at least ``blend_threshold`` of the images of other labels under
    one probe (:mod:`.blend_probe`: the whole-image blended triggers a reversal misses; not
    part of the ``"paper"`` rule).

    ``weight_layout`` — the layout of the convolution weights during the run
    (:mod:`modelguard.nn.layout`; the model is given back as it came): ``"auto"`` is
    channels-last for inputs of 64² and more unless timing both on the model finds it
    clearly slower (`faster_layout`), ``"as_loaded"`` or ``"channels_last"`` pin one (a
    run is then repeated exactly unless a time budget cuts its steps differently).

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
    mask_start: str = "faint"
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
    memory_budget_mb: int = 4096
    time_budget_seconds: float = 480.0
    full_screening_max_labels: int = 100
    triage_steps: int = 100
    triage_runs: int = 2
    triage_candidates: int = 3
    reference_labels: int = 5
    blend_probe: bool = True
    blend_threshold: float = 0.6
    weight_layout: str = AUTO_LAYOUT

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
        require(_is_int(self.memory_budget_mb) and self.memory_budget_mb >= 1024, "memory >= 1024")
        require(
            _finite(self.time_budget_seconds) and self.time_budget_seconds > 0, "time budget > 0"
        )
        for name in ("full_screening_max_labels", "triage_steps", "triage_runs"):
            require(_is_int(getattr(self, name)) and getattr(self, name) >= 1, f"{name} >= 1")
        require(_is_int(self.triage_candidates) and self.triage_candidates >= 1, "candidates")
        require(
            _is_int(self.reference_labels) and self.reference_labels >= self.min_valid_labels,
            "reference_labels >= min_valid_labels (the MAD test needs them)",
        )
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
        require(self.mask_start in MASK_STARTS, f"mask_start must be one of {MASK_STARTS}")
        require(0 < self.max_norm_ratio <= 1, "max_norm_ratio in (0, 1]")
        require(_finite(self.suspect_threshold) and self.suspect_threshold >= 0, "suspects")
        require(0 <= self.verify_threshold <= 1, "verify_threshold in [0, 1]")
        require(self.restart_margin >= 0, "restart_margin >= 0 (inf: always make every restart)")
        require(isinstance(self.refine, bool), "refine must be a bool")
        require(isinstance(self.blend_probe, bool), "blend_probe must be a bool")
        require(0 < self.blend_threshold <= 1, "blend_threshold in (0, 1]")
        require(
            self.weight_layout in (AUTO_LAYOUT, *LAYOUTS),
            f"weight_layout must be one of {', '.join((AUTO_LAYOUT, *LAYOUTS))}",
        )
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

    def optimizer_settings(
        self, *, screening: bool, max_batch_images: int | None = None
    ) -> OptimizerSettings:
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
            max_batch_images=max_batch_images or self.max_batch_images,
            mask_start=self.mask_start,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _paper_fields(batch_size: int) -> dict[str, Any]:
    """The fields Neural Cleanse's test fixes: every label optimised once on full batches,
    the linear MAD test alone (no size condition, restarts, refinement or re-check)."""
    return {
        "norm_scale": "linear",
        "mask_start": "random",
        "max_norm_ratio": 1.0,
        "restarts": 1,
        "screening_batch_size": batch_size,
        "refine": False,
        "verify_threshold": 0.0,
        "blend_probe": False,
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
    optimised: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RestartInfo:
    """One screening run: its seed, per-label norms (None: no trigger), MAD anomaly
    indices and flags, the steps it took, its median norm and dispersion (MAD, or the
    fallback of :mod:`.mad`) and the rule used. ``screened``: the positions (as in
    ``norms``) this run optimised when it re-screened only the labels in doubt (the
    others' norms are the first run's); None when it screened every label."""

    seed: int
    norms: tuple[float | None, ...]
    anomaly_index: tuple[float | None, ...]
    flagged: tuple[int, ...]
    screening_steps: int
    median: float = math.nan
    mad: float = math.nan
    rule: str = "mad"
    reason: str = ""
    screened: tuple[int, ...] | None = None

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
            "screened": None if self.screened is None else list(self.screened),
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
    trigger_labels: tuple[int, ...] = ()

    @property
    def infected(self) -> bool:
        return self.verdict == INFECTED

    @property
    def labels_with_triggers(self) -> tuple[int, ...]:
        """The labels whose triggers ``masks`` and ``patterns`` hold, row by row (every
        label unless a triage left some out)."""
        return self.trigger_labels or tuple(range(int(self.masks.shape[0])))

    def trigger(self, label: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Label ``label``'s mask ``(H, W)`` and pattern ``(C, H, W)``; ``InvalidInput``
        if its trigger was not optimised."""
        rows = self.labels_with_triggers
        if label not in rows:
            raise InvalidInput(f"label {label} has no reversed trigger (the triage left it out)")
        row = rows.index(label)
        return self.masks[row], self.patterns[row]

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
            "trigger_labels": list(self.labels_with_triggers),
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
    moved to ``device``; its parameters are not modified (their ``requires_grad`` is off
    during the run, and the convolution weights may be laid out channels-last, see
    ``ReversalConfig.weight_layout``; both are restored after).
    """
    config = config or ReversalConfig()
    started = time.perf_counter()
    if not isinstance(spec, InputSpec):
        raise InvalidInput("an input spec (shape, value range, optional mean/std) is required")
    wrapped = wrap(model, spec).to(device)
    # only the trigger needs gradients: the weights' would be a third of every backward
    # pass, computed for nothing
    with evaluating(wrapped), frozen_weights(wrapped):
        classes = validate_inputs(wrapped, data, spec)
        layout = reversal_layout(wrapped, data, config, device)
        with weight_layout(wrapped, layout):
            result = _reverse(wrapped, data, spec, config, classes, progress, device, started)
        return replace(result, evidence={**result.evidence, "weight_layout": layout})


def reversal_layout(
    wrapped: nn.Module, data: Dataset, config: ReversalConfig, device: torch.device | str
) -> Layout:
    """The weight layout a reversal runs with: ``config.weight_layout``, or under
    ``"auto"`` the one `faster_layout` picks for the (wrapped) model."""
    layout = cast(Layout, config.weight_layout)
    if config.weight_layout == AUTO_LAYOUT:
        layout = faster_layout(wrapped, data.x[:LAYOUT_PROBE_IMAGES].float().to(device))
    log.info("weight layout of the reversal's passes: %s", layout)
    return layout


def _reverse(
    wrapped: nn.Module,
    data: Dataset,
    spec: InputSpec,
    config: ReversalConfig,
    classes: int,
    progress: Progress | None,
    device: torch.device | str,
    started: float,
) -> ReversalResult:
    """The reversal and the blend probe on the prepared (wrapped, frozen, laid out) model."""
    result = _Reversal(wrapped, data, spec, config, classes, progress, device, started).run()
    if not config.blend_probe:
        return result
    probe = probe_blend(
        wrapped,
        data,
        spec,
        BlendProbeConfig(threshold=config.blend_threshold, seed=config.seed),
    )
    return with_blend_probe(result, probe, time.perf_counter() - started)


def with_blend_probe(
    result: ReversalResult, probe: BlendProbeResult, seconds: float
) -> ReversalResult:
    """``result`` with the blend probe's evidence; when the probe flags a label, that label
    is flagged too (the verdict infected, even where the reversal alone was inconclusive)
    and its trigger is the probe's: a full-image mask of the probe's strength over its
    noise image, so a repair unlearns the blend rather than a patch."""
    evidence = {**result.evidence, "blend_probe": probe.to_dict()}
    if not probe.flagged:
        return replace(result, evidence=evidence, seconds=seconds)
    label = probe.label
    summary = (
        f"noise blended into the whole image at α {probe.alpha:g} sends "
        f"{probe.share:.0%} of the images of other labels to label {label} "
        f"(threshold {probe.threshold:.0%}): a blended trigger"
    )
    evidence["summary"] = f"{evidence.get('summary', '')}; blend probe: {summary}".lstrip("; ")
    masks, patterns = result.masks, result.patterns
    rows = list(result.labels_with_triggers)
    mask = torch.full(masks.shape[1:], probe.alpha, dtype=masks.dtype)
    pattern = probe.pattern.to(patterns.dtype)
    if label in rows:
        masks, patterns = masks.clone(), patterns.clone()
        masks[rows.index(label)] = mask
        patterns[rows.index(label)] = pattern
    else:
        masks = torch.cat([masks, mask[None]])
        patterns = torch.cat([patterns, pattern[None]])
        rows.append(label)
    return replace(
        result,
        flagged=tuple(sorted({*result.flagged, label})),
        verdict=INFECTED,
        masks=masks,
        patterns=patterns,
        evidence=evidence,
        trigger_labels=tuple(rows),
        seconds=seconds,
    )


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
        started: float,
    ) -> None:
        self.model = model
        self.spec = spec
        self.config = config
        self.classes = classes
        self.progress = progress
        self.device = torch.device(device)
        self.started = started
        self.deadline = started + config.time_budget_seconds
        if len(data) > config.max_samples:
            data = data.subset(config.max_samples, seed=config.seed)
        self.x = data.x.float().to(self.device)
        self.y = data.y.long().to(self.device)
        self.shape = (int(self.x.shape[1]), int(self.x.shape[2]), int(self.x.shape[3]))
        self.cost = measure_pass_cost(model, self.x)
        self.probed_again = False
        c = config
        full_seconds = (
            classes * c.screening_budget * c.screening_batch_size / 2 * self.cost.seconds_per_image
        )
        #: triage first when every label cannot be screened (never under the paper's rule)
        self.triaged = c.rule != PAPER and (
            classes > c.full_screening_max_labels or full_seconds > c.time_budget_seconds / 2
        )
        #: the labels whose triggers are optimised (positions index this list)
        self.labels: list[int] = list(range(classes))
        self.triage: TriageResult | None = None
        self.candidates: list[int] = []
        #: the screening step budget of this reversal (`affordable_steps` may cut it)
        self.screening_steps = config.screening_budget
        #: when the first screening run began, and its measured seconds per step
        self.screening_started: float | None = None
        self.seconds_per_step: float | None = None
        self.images_per_pass = self.pass_size(1 if self.triaged else classes)
        # progress accounting in images through the model: one screening run (early
        # stopping ends it near half its budget) plus the refinement of one label
        self.planned = max(1, self.screening_images(len(self.labels)))
        self.done = 0
        self.reported = 0.0

    def pass_size(self, labels_held: int) -> int:
        """Images one forward pass may hold: the memory budget less the optimisation state
        of ``labels_held`` labels, over the measured memory per image, and no more than
        keep its activations in reused memory (at most ``max_batch_images``)."""
        room = pass_memory(self.config.memory_budget_mb, labels_held, self.shape)
        return min(self.config.max_batch_images, self.cost.images_per_pass(room))

    def screening_images(self, labels: int) -> int:
        c = self.config
        refinement = c.steps * c.batch_size // 2 if c.refine and not self.triaged else 0
        return int(labels * c.screening_budget * c.screening_batch_size // 2 + refinement)

    def report(self, message: str) -> None:
        if self.progress is None:
            return
        # the plan grows when a restart or a refinement is added: progress then pauses,
        # it never runs backwards
        self.reported = max(self.reported, min(0.99, self.done / self.planned))
        # time per image as observed so far (the probe's figure until there is one)
        elapsed = time.perf_counter() - self.started
        per_image = elapsed / self.done if self.done >= 64 else self.cost.seconds_per_image
        left = max(0, self.planned - self.done) * per_image
        self.progress(self.reported, f"{message}; about {_duration(left)} left")

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def select_labels(self) -> None:
        """Triage (see :mod:`.triage`): the ``triage_candidates`` most likely targets and
        ``reference_labels`` others drawn at random, whose norms give the MAD test its
        median and spread."""
        c = self.config
        budget = c.triage_steps
        self.planned = budget * c.screening_batch_size * c.triage_runs + self.screening_images(
            c.triage_candidates + c.reference_labels
        )

        def tick(run: int, step: int) -> None:
            if step % 10 == 0:
                self.done = (run * budget + step) * c.screening_batch_size
                self.report(
                    f"triage of {self.classes} labels: sink search {run + 1}/{c.triage_runs}, "
                    f"step {step}"
                )

        self.triage = triage_labels(
            self.model,
            self.x,
            self.y,
            self.classes,
            self.spec.value_range,
            c.optimizer_settings(screening=True, max_batch_images=self.images_per_pass),
            steps=budget,
            runs=c.triage_runs,
            seed=c.seed,
            images_per_pass=self.images_per_pass,
            deadline=self.deadline,
            progress=tick,
        )
        self.done = self.triage.evaluations
        candidates = list(self.triage.ranking[: c.triage_candidates])
        others = [k for k in range(self.classes) if k not in candidates]
        generator = torch.Generator().manual_seed(c.seed + 15485863)
        order = torch.randperm(len(others), generator=generator)[: c.reference_labels]
        references = [others[int(i)] for i in order]
        self.labels = sorted(candidates + references)
        self.candidates = candidates
        self.images_per_pass = self.pass_size(len(self.labels))
        log.info("triage candidates %s, references %s", candidates, references)

    def run(self) -> ReversalResult:
        c = self.config
        if self.triaged:
            self.select_labels()
            assert self.triage is not None
            if not self.triage.complete:
                return self.inconclusive(
                    [],
                    [],
                    f"the time budget ({c.time_budget_seconds:g} s) ran out during the triage "
                    f"of {self.classes} labels: {self.budget_hint()}",
                )
        count = len(self.labels)
        self.screening_steps = self.affordable_steps()
        if self.screening_steps < min(MIN_SCREENING_STEPS, c.screening_budget):
            return self.inconclusive(
                [],
                [],
                f"the time budget ({c.time_budget_seconds:g} s) affords only "
                f"{self.screening_steps} screening steps of {count} labels (at least "
                f"{MIN_SCREENING_STEPS} are needed): {self.budget_hint()}",
            )
        runs: list[TriggerOptimizer] = []
        infos: list[RestartInfo] = []
        doubtful: list[int] | None = None  # None: every label is screened
        in_doubt: list[int] = []
        for restart in range(c.restarts):
            if restart > 0 and self.affordable_steps(doubtful) < self.screening_steps:
                return self.inconclusive(
                    runs,
                    infos,
                    "a label's evidence lies close to the threshold and the time budget "
                    f"({c.time_budget_seconds:g} s) leaves no room for another screening run",
                )
            optimizer, info = self.screen(restart, doubtful, infos[0] if infos else None)
            runs.append(optimizer)
            screened = optimizer.stopped if doubtful is None else optimizer.stopped[doubtful]
            cut_short = not bool(screened.all()) and optimizer.step_count < min(
                MIN_SCREENING_STEPS, self.screening_steps
            )
            if optimizer.out_of_time or cut_short:
                return self.inconclusive(
                    runs,
                    infos,
                    f"the time budget ({c.time_budget_seconds:g} s) ran out while screening "
                    f"{count} labels (run {restart + 1}, after {optimizer.step_count} steps; "
                    f"at least {MIN_SCREENING_STEPS} are needed): {self.budget_hint()}",
                )
            infos.append(info)
            combined = combine_restarts(infos)
            in_doubt = self.ambiguous_labels(combined, infos)
            if not in_doubt:
                break
            if restart + 1 < c.restarts:
                # after a triage only the labels in doubt are screened again
                doubtful = in_doubt if self.triaged else None
                log.info(
                    "anomaly indices %s are near the threshold: another restart of %s",
                    combined,
                    "every label" if doubtful is None else self.named(doubtful),
                )
                self.planned += self.screening_images(count if doubtful is None else len(doubtful))
        if in_doubt and self.out_of_time():
            return self.inconclusive(
                runs,
                infos,
                "a label's evidence lies close to the threshold and the time budget "
                f"({c.time_budget_seconds:g} s) left no room for another screening run",
            )

        decision = decide(infos, c)
        index, ratios, decided = decision.index, decision.ratios, decision.decided
        not_small = [k for k in decision.outliers if k not in decided]
        # with many labels the time goes to the labels, not to refining one trigger: the
        # screening triggers are re-checked and returned as they are
        suspects = self.select_suspects(infos, index, decided) if c.refine else []
        refined = suspects if not self.triaged else []
        # each label's trigger comes from the run that found its smallest one
        best_run = [_smallest_run(infos, k) for k in range(count)]
        for r, optimizer in enumerate(runs):
            mine = [k for k in refined if best_run[k] == r]
            if mine and not self.out_of_time():
                self.refine(optimizer, mine)

        reached = [any(info.norms[k] is not None for info in infos) for k in range(count)]
        masks, patterns = self.triggers(runs, best_run, reached)
        self.report("re-checking the triggers on the clean set")
        # many labels: only the suspects' triggers are re-checked (the others decide nothing)
        checked = list(range(count)) if not self.triaged else sorted(set(decided) | set(suspects))
        success, verify_evals = self.attack_success(masks, patterns, checked)
        # verify_threshold 0: no re-check (a NaN success, no image of another label, stands)
        flagged = tuple(
            k for k in decided if c.verify_threshold == 0 or success[k] >= c.verify_threshold
        )
        rejected = [k for k in decided if k not in flagged]

        positions = [
            LabelResult(
                label=self.labels[k],
                l1_norm=_median_or_nan([info.norms[k] for info in infos]),
                anomaly_index=index[k] if reached[k] else math.nan,
                attack_success=success[k],
                reached_threshold=reached[k],
                refined=k in refined,
                trigger_norm=float(masks[k].sum()),
                steps=int(sum(int(run.label_steps[k]) for run in runs)),
                index_min=min(_scores(infos, k)) if reached[k] else math.nan,
                index_median=index[k] if reached[k] else math.nan,
            )
            for k in range(count)
        ]
        labels = self.all_labels(positions)
        named = self.named
        evidence = self.evidence(labels, named(flagged), named(rejected), named(suspects), infos)
        evidence["rule"] = c.rule
        evidence["norm_ratio"] = {str(self.labels[k]): _clean(r) for k, r in enumerate(ratios)}
        evidence["max_norm_ratio"] = c.max_norm_ratio
        if not_small:
            evidence["outliers_not_small"] = named(not_small)
            evidence["summary"] += (
                f"; labels {named(not_small)} are MAD outliers but their triggers are "
                + ", ".join(f"{ratios[k]:.2f}" for k in not_small)
                + f" of the median norm, above {c.max_norm_ratio:.2f} (natural classes, "
                "not flagged)"
            )
        verdict = INFECTED if flagged else CLEAN
        if not flagged and all(info.rule == "inconclusive" for info in infos):
            verdict = INCONCLUSIVE
            reason = infos[0].reason
            if self.screening_steps < c.screening_budget:
                # the labels ran out of steps, not of triggers: more time is the remedy
                reason += (
                    f"; the time budget ({c.time_budget_seconds:g} s) afforded "
                    + self.steps_afforded()
                )
            _explain_inconclusive(evidence, reason)
        elif not flagged and self.screening_steps < c.screening_budget and not all(reached):
            # A label without a trigger counts as an infinite norm, which inflates the
            # spread the outlier test divides by; when the budget cut the steps, a clean
            # verdict must survive those labels reaching a trigger at their masks' size.
            last_norms = [float(masks[k].sum()) for k in range(count)]
            hidden = outliers_if_reached(infos, last_norms, c)
            if hidden:
                verdict = INCONCLUSIVE
                unreached = count - sum(reached)
                reason = (
                    f"labels {', '.join(map(str, named(hidden)))} would be outliers had the "
                    f"{unreached} labels "
                    "without a trigger reached one at their masks' last size, and the time "
                    f"budget ({c.time_budget_seconds:g} s) afforded only " + self.steps_afforded()
                )
                _explain_inconclusive(evidence, reason)
                evidence["outliers_if_reached"] = named(hidden)
        return self.result(
            labels,
            named(flagged),
            verdict,
            masks,
            patterns,
            runs,
            infos,
            verify_evals,
            evidence,
        )

    def affordable_steps(self, screened: Sequence[int] | None = None) -> int:
        """The screening step budget: ``screening_budget``, or fewer when the time left
        does not afford that many steps of every label screened (``screened`` positions;
        None: all), at the cost per image observed so far. Every label gets the same
        budget, so their norms stay comparable. The paper's rule is never cut (it runs
        out of time instead)."""
        c = self.config
        if c.rule == PAPER:
            return c.screening_budget
        # the probe's cost per image: the triage's one-trigger passes are smaller, hence
        # slower per image, than the screening's batched ones (a slower machine than the
        # probe says is caught by the deadline instead)
        labels = len(self.labels) if screened is None else len(screened)
        per_step = labels * c.screening_batch_size * self.cost.seconds_per_image
        left = self.deadline - time.perf_counter()
        affordable = int(TIME_MARGIN * left / per_step)
        if affordable < c.screening_budget and not self.probed_again:
            # the first probe may have run on a machine busy for a moment: before the
            # budget cuts the steps, the speed is measured once more and the faster holds
            self.probed_again = True
            again = measure_pass_cost(self.model, self.x)
            if again.seconds_per_image < self.cost.seconds_per_image:
                log.info(
                    "pass cost measured again: %.4f s per image (first probe: %.4f s)",
                    again.seconds_per_image,
                    self.cost.seconds_per_image,
                )
                self.cost = replace(self.cost, seconds_per_image=again.seconds_per_image)
                return self.affordable_steps(screened)
        if affordable < c.screening_budget:
            log.info("the time budget affords %d screening steps", affordable)
        return min(c.screening_budget, affordable)

    def needed_seconds(self, screening_steps: int | None = None) -> float:
        """A time budget that would hold this reversal at the speed measured so far: the
        time spent before the screening (the whole triage when it did not finish), a
        screening run of ``screening_steps`` (default: about half its step budget, where
        early stopping usually ends it; at least `MIN_SCREENING_STEPS`) and the re-check,
        with the planner's margin."""
        c = self.config
        now = time.perf_counter()
        before = (self.screening_started or now) - self.started
        labels = len(self.labels)
        if (self.triaged and self.triage is None) or (self.triage and not self.triage.complete):
            triage_images = c.triage_runs * c.triage_steps * c.screening_batch_size
            before += triage_images * self.cost.seconds_per_image
            labels = c.triage_candidates + c.reference_labels
        per_step = self.seconds_per_step or (
            labels * c.screening_batch_size * self.cost.seconds_per_image
        )
        steps = screening_steps or max(MIN_SCREENING_STEPS, c.screening_budget // 2)
        return (before + steps * per_step + self.recheck_seconds()) / TIME_MARGIN

    def steps_afforded(self) -> str:
        """The screening steps the time budget afforded, of the step budget, and the time
        budget that would afford them all."""
        c = self.config
        return (
            f"{self.screening_steps} of {c.screening_budget} screening steps: "
            + self.budget_hint(c.screening_budget)
        )

    def budget_hint(self, screening_steps: int | None = None) -> str:
        """What to raise ``--time-budget`` to, rounded up to a minute."""
        needed = 60 * math.ceil(self.needed_seconds(screening_steps) / 60)
        return f"raise --time-budget (about {needed} s for this model at the speed measured here)"

    def named(self, positions: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.labels[k] for k in positions)

    def all_labels(self, positions: Sequence[LabelResult]) -> tuple[LabelResult, ...]:
        """One `LabelResult` per class of the model: the optimised labels' figures, NaN for
        the labels the triage left out."""
        by_label = {r.label: r for r in positions}
        return tuple(
            by_label.get(k)
            or LabelResult(
                label=k,
                l1_norm=math.nan,
                anomaly_index=math.nan,
                attack_success=math.nan,
                reached_threshold=False,
                optimised=False,
            )
            for k in range(self.classes)
        )

    def triggers(
        self, runs: list[TriggerOptimizer], best_run: list[int], reached: list[bool]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(self.labels)
        masks, patterns = _best_triggers(runs, best_run)
        for k in range(count):
            if not reached[k]:  # no valid trigger: return the last one, for inspection
                last = runs[best_run[k]]
                masks[k] = mask_from_theta(last.theta_mask[k, 0])
                patterns[k] = pattern_from_theta(last.theta_pattern[k], self.spec.value_range)
        return masks, patterns

    def result(
        self,
        labels: tuple[LabelResult, ...],
        flagged: tuple[int, ...],
        verdict: str,
        masks: torch.Tensor,
        patterns: torch.Tensor,
        runs: list[TriggerOptimizer],
        infos: list[RestartInfo],
        verify_evals: int,
        evidence: dict[str, Any],
    ) -> ReversalResult:
        evidence["labels_optimised"] = len(self.labels)
        evidence["screening_steps"] = self.screening_steps
        evidence["images_per_pass"] = self.images_per_pass
        evidence["budget"] = {
            "memory_mb": self.config.memory_budget_mb,
            "time_seconds": self.config.time_budget_seconds,
            "measured_mb_per_image": round(self.cost.bytes_per_image / 2**20, 3),
            "measured_ms_per_image": round(1000 * self.cost.seconds_per_image, 3),
        }
        if self.triage is not None:
            evidence["triage"] = {
                **self.triage.to_dict(),
                "candidates": list(self.candidates),
                "references": [k for k in self.labels if k not in self.candidates],
            }
        if self.progress is not None:
            self.progress(1.0, "done")
        return ReversalResult(
            labels=labels,
            flagged=flagged,
            verdict=verdict,
            masks=masks.detach().cpu(),
            patterns=patterns.detach().cpu(),
            restarts=tuple(infos),
            steps=int(sum(int(run.label_steps.sum()) for run in runs)),
            evaluations=int(sum(run.evaluations for run in runs))
            + verify_evals
            + (self.triage.evaluations if self.triage else 0),
            seconds=time.perf_counter() - self.started,
            evidence=evidence,
            value_range=self.spec.value_range,
            config=self.config,
            trigger_labels=tuple(self.labels),
        )

    def inconclusive(
        self, runs: list[TriggerOptimizer], infos: list[RestartInfo], reason: str
    ) -> ReversalResult:
        """The verdict when the budget runs out before the evidence is clear: never clean.
        The triggers found so far are returned for inspection."""
        log.warning("reversal inconclusive: %s", reason)
        count = len(self.labels)
        if runs:
            # per label, the run with its smallest trigger (a restart may have screened
            # only some labels)
            norms = torch.stack([run.best_norm.cpu() for run in runs])
            masks, patterns = _best_triggers(runs, norms.argmin(0).tolist())
        else:
            masks = torch.zeros(count, *self.shape[1:])
            patterns = torch.zeros(count, *self.shape)
        positions = [
            LabelResult(
                label=self.labels[k],
                l1_norm=math.nan,
                anomaly_index=math.nan,
                attack_success=math.nan,
                reached_threshold=any(math.isfinite(float(run.best_norm[k])) for run in runs),
                steps=int(sum(int(run.label_steps[k]) for run in runs)),
            )
            for k in range(count)
        ]
        evidence: dict[str, Any] = {
            "summary": f"inconclusive: {reason}",
            "reason": reason,
            "rule": self.config.rule,
            "screening_runs": len(infos),
        }
        return self.result(
            self.all_labels(positions),
            (),
            INCONCLUSIVE,
            masks,
            patterns,
            runs,
            infos,
            0,
            evidence,
        )

    def ambiguous_labels(self, index: Sequence[float], infos: Sequence[RestartInfo]) -> list[int]:
        """The positions whose evidence makes another independent screening run worth its
        cost (none: the evidence is clear): a label's (median) anomaly index lies within
        ``restart_margin`` of the threshold while its trigger-to-median ratio could still
        meet ``max_norm_ratio`` (within the same margin: a label whose trigger is clearly
        too large for a backdoor cannot be flagged whatever its index), or a label over
        the threshold has a ratio within ``restart_margin`` of ``max_norm_ratio`` (either
        could flip the verdict)."""
        c = self.config
        low = c.anomaly_threshold * (1 - c.restart_margin)
        high = c.anomaly_threshold * (1 + c.restart_margin)
        ratio_low = c.max_norm_ratio * (1 - c.restart_margin)
        ratio_high = c.max_norm_ratio * (1 + c.restart_margin)
        return [
            k
            for k, value in enumerate(index)
            if (low <= value <= high and not norm_ratio(infos, k) > ratio_high)
            or (value > c.anomaly_threshold and ratio_low <= norm_ratio(infos, k) <= ratio_high)
        ]

    # -------------------------------------------------------------- screening
    def screen(
        self,
        restart: int,
        screened: Sequence[int] | None = None,
        first: RestartInfo | None = None,
    ) -> tuple[TriggerOptimizer, RestartInfo]:
        """One screening run: the labels, batched, ``screening_batch_size`` images a step,
        until each label stops early (or the screening budget is spent). With
        ``screened`` (positions) only those labels are optimised; the others keep their
        norms from the ``first`` run, so the MAD test scores the new norms against it."""
        c = self.config
        seed = c.seed + restart
        optimizer = TriggerOptimizer(
            self.model,
            self.x,
            self.y,
            self.labels,
            self.spec.value_range,
            c.optimizer_settings(screening=True, max_batch_images=self.images_per_pass),
            torch.Generator().manual_seed(seed),
            device=self.device,
        )
        base = self.done
        active: torch.Tensor | None = None
        if screened is not None:
            active = torch.zeros(len(self.labels), dtype=torch.bool)
            active[list(screened)] = True
            what = f"labels {list(self.named(screened))} again"
        elif self.triaged:
            what = f"{len(self.labels)} of {self.classes} labels"
        else:
            what = f"all {self.classes} labels"
        message = f"screening {what} (run {restart + 1})"

        def tick(step: int) -> None:
            if step % 10 == 0:
                self.done = base + optimizer.evaluations
                # at most what the running labels' step budgets leave (early stopping
                # usually ends them sooner)
                steps_left = (self.screening_steps - optimizer.label_steps).clamp_min(0)
                running = ~optimizer.stopped if active is None else active & ~optimizer.stopped
                images_left = int(steps_left[running].sum()) * c.screening_batch_size
                self.planned = max(1, self.done + images_left)
                total = len(self.labels) if active is None else int(active.sum())
                stopped = total - int(running.sum())
                self.report(f"{message}: {stopped}/{total} labels done")

        # the screening ends in time for the re-check after it, however busy the machine
        started = time.perf_counter()
        if self.screening_started is None:
            self.screening_started = started
        optimizer.optimize(
            self.screening_steps,
            active=active,
            progress=tick,
            deadline=self.deadline - self.recheck_seconds(),
            fit_to_deadline=c.rule != PAPER,
        )
        if optimizer.step_count and self.seconds_per_step is None:
            self.seconds_per_step = (time.perf_counter() - started) / optimizer.step_count
        self.done = base + optimizer.evaluations
        norms = [float(v) if math.isfinite(float(v)) else None for v in optimizer.best_norm.cpu()]
        if screened is not None and first is not None:
            norms = [norms[k] if k in screened else first.norms[k] for k in range(len(norms))]
        info = screening_run(norms, c, seed=seed, steps=optimizer.step_count)
        if screened is not None:
            info = replace(info, screened=tuple(screened))
        return optimizer, info

    def recheck_seconds(self) -> float:
        """What the re-check after the screening costs, at most: the triage candidates (or
        every label) on the verification images, forward passes only (about a third of a
        forward and backward pass)."""
        c = self.config
        labels = min(len(self.labels), c.triage_candidates + 1) if self.triaged else 0
        images = min(c.verify_samples, int(self.x.shape[0]))
        return labels * images * self.cost.seconds_per_image / 3

    def select_suspects(
        self, infos: list[RestartInfo], index: list[float], decided: tuple[int, ...]
    ) -> list[int]:
        """The labels to refine: every flagged one, plus labels whose (median) index
        exceeds ``suspect_threshold``, highest first, up to ``max_suspects`` in all."""
        c = self.config
        extra = sorted(
            (
                k
                for k in range(len(self.labels))
                if k not in decided and index[k] > c.suspect_threshold
            ),
            key=lambda k: -index[k],
        )
        room = max(0, c.max_suspects - len(decided))
        return sorted(set(decided) | set(extra[:room]))

    def refine(self, optimizer: TriggerOptimizer, rows_to_refine: list[int]) -> None:
        """Continue those labels of a screening run with the full budget and batch: masks,
        patterns, Adam moments and λ carry on; the best trigger is chosen afresh on the
        larger batches (kept from screening if refinement never reaches the threshold or
        the time budget runs out first)."""
        c = self.config
        rows = torch.tensor(rows_to_refine, dtype=torch.long, device=self.device)
        previous = optimizer.reopen(
            rows, c.optimizer_settings(screening=False, max_batch_images=self.images_per_pass)
        )
        active = torch.zeros(len(self.labels), dtype=torch.bool, device=self.device)
        active[rows] = True
        base, before = self.done, optimizer.evaluations
        self.planned += len(rows_to_refine) * c.steps * c.batch_size // 2
        names = list(self.named(rows_to_refine))

        def tick(step: int) -> None:
            if step % 10 == 0:
                self.done = base + optimizer.evaluations - before
                self.report(f"refining the suspects {names}")

        optimizer.optimize(
            optimizer.step_count + c.steps, active, progress=tick, deadline=self.deadline
        )
        optimizer.keep_previous_if_unreached(previous)
        self.done = base + optimizer.evaluations - before

    # -------------------------------------------------------------- re-check
    @torch.no_grad()
    def attack_success(
        self, masks: torch.Tensor, patterns: torch.Tensor, checked: Sequence[int]
    ) -> tuple[list[float], int]:
        """Share of the clean images of other labels that the trigger at each position in
        ``checked`` flips to its label (NaN for the positions not checked)."""
        count = len(self.labels)
        rate = [math.nan] * count
        if not checked:
            return rate, 0
        evaluations = 0
        index = verification_subset(int(self.x.shape[0]), self.config)
        xs, ys = self.x[index.to(self.device)], self.y[index.to(self.device)]
        per_pass = max(1, self.images_per_pass)
        label_chunk = max(1, min(len(checked), per_pass))
        image_chunk = max(1, per_pass // label_chunk)
        for first in range(0, len(checked), label_chunk):
            group = list(checked[first : first + label_chunk])
            rows = torch.tensor(group, dtype=torch.long, device=self.device)
            targets = torch.tensor(self.named(group), device=self.device).unsqueeze(1)
            m = masks[rows].to(self.device).unsqueeze(1).unsqueeze(2)  # (k, 1, 1, H, W)
            p = patterns[rows].to(self.device).unsqueeze(1)  # (k, 1, C, H, W)
            hits = torch.zeros(len(group))
            counts = torch.zeros(len(group))
            for start in range(0, int(xs.shape[0]), image_chunk):
                x = xs[start : start + image_chunk]
                y = ys[start : start + image_chunk]
                stamped = (1 - m) * x.unsqueeze(0) + m * p
                logits = self.model(stamped.reshape(-1, *x.shape[1:]))
                predicted = logits.reshape(len(group), x.shape[0], -1).argmax(-1)
                keep = (y.unsqueeze(0) != targets).float()
                hits += ((predicted == targets).float() * keep).sum(1).cpu()
                counts += keep.sum(1).cpu()
                evaluations += len(group) * int(x.shape[0])
            for position, hit, total in zip(group, hits.tolist(), counts.tolist(), strict=True):
                rate[position] = hit / total if total > 0 else math.nan
        return rate, evaluations

    def evidence(
        self,
        labels: tuple[LabelResult, ...],
        flagged: tuple[int, ...],
        rejected: tuple[int, ...],
        suspects: tuple[int, ...],
        infos: list[RestartInfo],
    ) -> dict[str, Any]:
        """The summary and figures behind the verdict (``flagged``, ``rejected`` and
        ``suspects`` are labels, not positions)."""
        c = self.config
        runs = len(infos)
        again = sorted({k for info in infos if info.screened for k in info.screened})
        if runs > 1 and again:
            per_run = (
                f" (median over {runs} screening runs; labels {list(self.named(again))} were "
                "screened again, the others once)"
            )
        else:
            per_run = f" (median over {runs} screening runs)" if runs > 1 else ""
        median = statistics.median(info.median for info in infos)
        scope = (
            ""
            if not self.triaged
            else f" (among {len(self.labels)} of {self.classes} labels: the triage's "
            f"{len(self.candidates)} likeliest targets and "
            f"{len(self.labels) - len(self.candidates)} at random)"
        )
        if flagged:
            parts = [
                f"label {k}: trigger L1 norm {labels[k].l1_norm:.1f} vs median {median:.1f}, "
                f"anomaly index {labels[k].anomaly_index:.2f} > {c.anomaly_threshold:g}"
                f"{per_run}, {'refined ' if labels[k].refined else ''}trigger flips "
                f"{labels[k].attack_success:.1%} of the clean images"
                for k in flagged
            ]
            summary = "infected: " + "; ".join(parts) + scope
        elif all(info.rule == "inconclusive" for info in infos):
            summary = "inconclusive: " + infos[0].reason
        else:
            reached = [r for r in labels if r.reached_threshold]
            top = max(reached, key=lambda r: r.anomaly_index, default=None)
            top_index = top.anomaly_index if top is not None else 0.0
            if top is not None and top_index > c.anomaly_threshold and median > 0:
                # an outlier by the index, cleared by the size condition: say so
                summary = (
                    f"clean: no label's trigger is both an outlier below the median and at "
                    f"most {c.max_norm_ratio:.2g} of the median's size (label {top.label}: "
                    f"anomaly index {top_index:.2f}{per_run} > {c.anomaly_threshold:g}, but "
                    f"its trigger is {top.l1_norm / median:.2f} of the median){scope}"
                )
            else:
                summary = (
                    f"clean: no label's trigger is an outlier below the median (largest "
                    f"anomaly index {top_index:.2f}{per_run}, threshold "
                    f"{c.anomaly_threshold:g}){scope}"
                )
        if rejected:
            summary += (
                f"; labels {list(rejected)} were outliers at screening but their refined "
                f"trigger flips fewer than {c.verify_threshold:.0%} of the clean images "
                "(rejected)"
            )
        return {
            "summary": summary,
            "median_norm": median,
            "threshold": c.anomaly_threshold,
            "screening_runs": runs,
            "suspects": list(suspects),
            "rejected_at_recheck": list(rejected),
            "run_flags": [list(self.named(info.flagged)) for info in infos],
        }


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


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


def _explain_inconclusive(evidence: dict[str, Any], reason: str) -> None:
    """Where every inconclusive verdict says why (as a run out of time does)."""
    evidence["reason"] = reason
    evidence["summary"] = f"inconclusive: {reason}"


def outliers_if_reached(
    infos: Sequence[RestartInfo], last_norms: Sequence[float], config: ReversalConfig
) -> tuple[int, ...]:
    """The positions the outlier decision would flag had every label without a trigger
    reached one at ``last_norms`` (its last mask's norm: a lower bound while masks still
    grow from the faint start), in every screening run."""
    filled = [
        screening_run(
            [
                last if norm is None else norm
                for norm, last in zip(info.norms, last_norms, strict=True)
            ],
            config,
            seed=info.seed,
            steps=info.screening_steps,
        )
        for info in infos
    ]
    return decide(filled, config).decided


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


def _best_triggers(
    runs: Sequence[TriggerOptimizer], best_run: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position ``k``, the best mask and pattern of run ``best_run[k]``."""
    masks = torch.stack([runs[r].best_mask[k] for k, r in enumerate(best_run)])
    patterns = torch.stack([runs[r].best_pattern[k] for k, r in enumerate(best_run)])
    return masks, patterns


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
