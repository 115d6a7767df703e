"""Neuron scoring under a reversed trigger (pruning with rollback).

Clean inputs are stamped with the reversed trigger ``x' = (1 - m) ⊙ x + m ⊙ δ`` (mask
``m`` of shape ``(H, W)`` in [0, 1], pattern ``δ`` of shape ``(C, H, W)`` in the input's
value range). At the chosen layer every neuron (output feature of a Linear layer, output
channel of a Conv2d layer, spatially averaged) gets

* its mean activation on the stamped inputs (and, for reference, on the same inputs
  without the trigger), and
* the magnitude of its incoming weights (the weight row / filter),

and the two rankings, high to low, that the rollback pruning alternates between.

``rank_by="difference"`` (the default) ranks by the activation the trigger *adds*
(stamped minus clean), as Neural Cleanse does for its neuron pruning (Wang et al. 2019,
§VI-B): it separates the neurons the trigger drives from neurons that are merely always
active. ``rank_by="triggered"`` is the reference method's literal ranking by triggered activation.
``NeuronScores.activation`` is the triggered activation either way.

For TorchScript models the activations come from a rewritten copy of the TorchScript graph
(`layers.LayerProbe`); when that is impossible, the activation score is replaced by an
ablation estimate (the drop of the target-class margin on stamped inputs when the neuron
alone is zeroed), and ``NeuronScores.source`` says ``"ablation"``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from modelguard.datasets import Dataset
from modelguard.detection.triggers import ReversedTrigger
from modelguard.errors import InvalidInput
from modelguard.nn.probe import LayerProbe, get_module
from modelguard.spec import InputSpec

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- triggers


class TriggerLike(Protocol):
    """Anything with a target ``label``, a ``mask`` ``(H, W)`` and a ``pattern``
    ``(C, H, W)``, e.g. `modelguard.detection.triggers.ReversedTrigger`."""

    @property
    def label(self) -> int: ...

    @property
    def mask(self) -> torch.Tensor: ...

    @property
    def pattern(self) -> torch.Tensor: ...


#: A reversed trigger, a ``(label, mask, pattern)`` tuple, or a list of either.
Triggers = (
    TriggerLike
    | tuple[int, torch.Tensor, torch.Tensor]
    | Sequence[TriggerLike | tuple[int, torch.Tensor, torch.Tensor]]
)


def as_reversed_triggers(triggers: Any, spec: InputSpec | None = None) -> list[ReversedTrigger]:
    """Normalise the accepted trigger forms to a list of `ReversedTrigger`, checking
    shapes against ``spec``. Also accepts a trigger-reversal result carrying ``masks``
    ``(K, H, W)``, ``patterns`` ``(K, C, H, W)`` and its flagged labels."""
    if hasattr(triggers, "masks") and hasattr(triggers, "patterns"):
        flagged = None
        for name in ("flagged", "flagged_labels", "infected_labels", "infected"):
            value = getattr(triggers, name, None)
            if value is not None and not isinstance(value, bool):
                flagged = [int(v) for v in value]
                break
        rows = list(
            getattr(triggers, "labels_with_triggers", ()) or range(int(triggers.masks.shape[0]))
        )
        labels = flagged if flagged is not None else rows
        for k in labels:
            if k not in rows:
                raise InvalidInput(f"label {k} has no reversed trigger")
        items: list[Any] = [
            (k, triggers.masks[rows.index(k)], triggers.patterns[rows.index(k)]) for k in labels
        ]
    elif (isinstance(triggers, tuple) and len(triggers) == 3 and isinstance(triggers[0], int)) or (
        hasattr(triggers, "mask") and hasattr(triggers, "pattern")
    ):
        items = [triggers]
    else:
        items = list(triggers)
    out = []
    for item in items:
        if isinstance(item, tuple):
            label, mask, pattern = item
        else:
            label, mask, pattern = item.label, item.mask, item.pattern
        mask = torch.as_tensor(mask, dtype=torch.float32).detach()
        pattern = torch.as_tensor(pattern, dtype=torch.float32).detach()
        if mask.dim() == 3 and mask.shape[0] == 1:
            mask = mask[0]
        if pattern.dim() == 2:
            pattern = pattern.unsqueeze(0)
        if mask.dim() != 2 or pattern.dim() != 3:
            raise InvalidInput(
                f"a reversed trigger needs a mask (H, W) and a pattern (C, H, W); got "
                f"{list(mask.shape)} and {list(pattern.shape)}"
            )
        if spec is not None:
            channels, height, width = spec.shape
            if tuple(mask.shape) != (height, width) or pattern.shape[1:] != (height, width):
                raise InvalidInput(
                    f"trigger for label {label} is {list(pattern.shape)} / mask "
                    f"{list(mask.shape)}; the input is {list(spec.shape)}"
                )
            if pattern.shape[0] not in (1, channels):
                raise InvalidInput(f"trigger pattern has {pattern.shape[0]} channels")
        out.append(ReversedTrigger(int(label), mask.clamp(0, 1), pattern))
    if not out:
        raise InvalidInput("no reversed trigger given: nothing to score or repair against")
    return out


@dataclass(frozen=True)
class AttackSet:
    """Clean samples stamped with each reversed trigger; samples whose label is already
    the trigger's target are left out (they say nothing about the attack).

    ``x`` ``(M, C, H, W)`` stamped inputs, ``clean`` ``(M, C, H, W)`` the same inputs
    without the trigger, ``target`` ``(M,)`` the trigger's label, ``group`` ``(M,)`` the
    trigger's index in ``labels``.
    """

    x: torch.Tensor
    clean: torch.Tensor
    target: torch.Tensor
    group: torch.Tensor
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def _per_trigger(self, hits: torch.Tensor) -> torch.Tensor:
        """Mean of ``hits`` ``(..., M)`` within each trigger's rows → ``(..., T)``."""
        out = []
        for index in range(len(self.labels)):
            rows = self.group == index
            out.append(hits[..., rows].float().mean(-1))
        return torch.stack(out, -1)

    def asr(self, logits: torch.Tensor) -> torch.Tensor:
        """Attack success rate per trigger ``(..., T)`` from logits ``(..., M, K)``."""
        return self._per_trigger(logits.argmax(-1) == self.target)

    def soft_asr(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean softmax probability of the target class per trigger ``(..., T)``: a smooth
        companion of the ASR that moves even when no prediction flips."""
        prob = F.softmax(logits, -1).gather(
            -1, self.target.expand(*logits.shape[:-1]).unsqueeze(-1)
        )
        return self._per_trigger(prob.squeeze(-1))

    def margin(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean target logit minus the best other logit ``(...)`` over all rows."""
        target = self.target.expand(*logits.shape[:-1]).unsqueeze(-1)
        chosen = logits.gather(-1, target).squeeze(-1)
        others = logits.scatter(-1, target, float("-inf")).amax(-1)
        return (chosen - others).mean(-1)


def build_attack_set(
    data: Dataset | torch.Tensor,
    triggers: Any,
    spec: InputSpec | None = None,
    *,
    samples: int | None = None,
    seed: int = 0,
) -> AttackSet:
    """Stamp up to ``samples`` clean samples per trigger (seeded choice)."""
    items = as_reversed_triggers(triggers, spec)
    if isinstance(data, torch.Tensor):
        x, y = data, None
    else:
        x, y = data.x, data.y
    generator = torch.Generator().manual_seed(seed)
    xs, cleans, targets, groups = [], [], [], []
    for index, trigger in enumerate(items):
        eligible = (
            torch.arange(len(x)) if y is None else torch.nonzero(y != trigger.label).flatten()
        )
        if eligible.numel() == 0:
            raise InvalidInput(
                f"the clean data has no sample outside label {trigger.label}: cannot measure "
                "that trigger's attack success"
            )
        order = eligible[torch.randperm(eligible.numel(), generator=generator)]
        if samples is not None:
            order = order[:samples]
        base = x[order]
        stamped = trigger.stamp(base)
        if spec is not None:
            stamped = stamped.clamp(*spec.value_range)
        xs.append(stamped)
        cleans.append(base)
        targets.append(torch.full((len(order),), trigger.label, dtype=torch.long))
        groups.append(torch.full((len(order),), index, dtype=torch.long))
    return AttackSet(
        x=torch.cat(xs),
        clean=torch.cat(cleans),
        target=torch.cat(targets),
        group=torch.cat(groups),
        labels=tuple(t.label for t in items),
    )


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ScoringConfig:
    """Hyper-parameters of `score_neurons`.

    ``layer``: a Linear or Conv2d layer by name; ``None`` takes the first hidden
    fully-connected layer (see `layers.resolve_layer`). ``samples``: clean samples stamped
    per trigger. ``activation``: the elementwise map applied to the layer output before
    averaging (``relu``: how strongly a neuron fires, as after the usual ReLU; ``raw``;
    ``abs``). ``rank_by``: ``difference`` (stamped minus clean activation) or
    ``triggered``. ``weight_norm``: ``l2`` or ``l1`` norm of a neuron's incoming weights.
    """

    layer: str | None = None
    samples: int = 500
    activation: Literal["relu", "raw", "abs"] = "relu"
    rank_by: Literal["difference", "triggered"] = "difference"
    weight_norm: Literal["l1", "l2"] = "l2"
    seed: int = 0
    max_rows: int = 4096

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if self.activation not in ("relu", "raw", "abs"):
            raise ValueError(f"activation must be relu, raw or abs; got {self.activation!r}")
        if self.rank_by not in ("difference", "triggered"):
            raise ValueError(f"rank_by must be difference or triggered; got {self.rank_by!r}")
        if self.weight_norm not in ("l1", "l2"):
            raise ValueError(f"weight_norm must be l1 or l2; got {self.weight_norm!r}")
        if self.max_rows < 1:
            raise ValueError("max_rows must be >= 1")


@dataclass(frozen=True)
class NeuronScores:
    """Per-neuron scores of one layer; every tensor has shape ``(n,)``.

    ``activation``: mean activation on stamped inputs; ``activation_clean``: on the same
    inputs unstamped; ``weight``: incoming-weight norm; the rankings are neuron indices,
    high to low. ``source``: how activations were observed (``hook``, ``graph`` or
    ``ablation``; see the module docstring).
    """

    layer: str
    kind: str
    activation: torch.Tensor
    activation_clean: torch.Tensor
    weight: torch.Tensor
    activation_ranking: torch.Tensor
    weight_ranking: torch.Tensor
    source: str
    target_labels: tuple[int, ...] = ()

    @property
    def neurons(self) -> int:
        return int(self.activation.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "source": self.source,
            "target_labels": list(self.target_labels),
            "activation": [float(v) for v in self.activation],
            "activation_clean": [float(v) for v in self.activation_clean],
            "weight": [float(v) for v in self.weight],
            "activation_ranking": [int(i) for i in self.activation_ranking],
            "weight_ranking": [int(i) for i in self.weight_ranking],
        }


@dataclass(frozen=True)
class NeuronRanking:
    """The neuron-scoring stage's rankings of one site, as the repair consumes them (the
    twin of the ``NeuronRanking`` bus message; `modelguard.repair.ranking_proto` converts).

    ``layer``: the resolved site (``fc1``, ``fc:in``); ``neurons``: its width ``n``; the
    rankings are permutations of ``0..n-1``, high to low; ``shapley``: one value per
    neuron, empty when not estimated; ``source``: how activations were observed
    (`NeuronScores.source`); ``target_labels``: the triggers' labels; ``data_split``: the
    clean data it was computed on (`modelguard.repair.context.split_label`, or ``"all"``).
    Malformed rankings (wrong lengths, not permutations) are refused with
    ``InvalidInput``: they arrive from the bus.
    """

    layer: str
    neurons: int
    activation_ranking: tuple[int, ...]
    weight_ranking: tuple[int, ...]
    shapley: tuple[float, ...] = ()
    source: str = ""
    target_labels: tuple[int, ...] = ()
    data_split: str = ""

    def __post_init__(self) -> None:
        if not self.layer:
            raise InvalidInput("a neuron ranking needs its layer")
        if self.neurons < 1:
            raise InvalidInput(f"a neuron ranking of {self.neurons} neurons")
        for name in ("activation_ranking", "weight_ranking"):
            order = getattr(self, name)
            # lengths first: ``neurons`` may come from an untrusted message
            if len(order) != self.neurons or sorted(order) != list(range(self.neurons)):
                raise InvalidInput(
                    f"the {name} of {self.layer} is not a permutation of its {self.neurons} neurons"
                )
        if self.shapley and len(self.shapley) != self.neurons:
            raise InvalidInput(
                f"{len(self.shapley)} Shapley values for the {self.neurons} neurons of {self.layer}"
            )

    @classmethod
    def from_scores(
        cls,
        scores: NeuronScores,
        *,
        shapley: Sequence[float] | torch.Tensor | None = None,
        data_split: str = "",
    ) -> NeuronRanking:
        return cls(
            layer=scores.layer,
            neurons=scores.neurons,
            activation_ranking=tuple(int(i) for i in scores.activation_ranking),
            weight_ranking=tuple(int(i) for i in scores.weight_ranking),
            shapley=() if shapley is None else tuple(float(v) for v in shapley),
            source=scores.source,
            target_labels=tuple(int(label) for label in scores.target_labels),
            data_split=data_split,
        )

    def interleaved(self) -> list[int]:
        """The order the rollback pruning tries neurons in (`interleave`)."""
        return interleave(self.activation_ranking, self.weight_ranking)


def interleave(
    first: torch.Tensor | Sequence[int], second: torch.Tensor | Sequence[int]
) -> list[int]:
    """``a0, b0, a1, b1, …`` without repeats."""
    a = first.tolist() if isinstance(first, torch.Tensor) else list(first)
    b = second.tolist() if isinstance(second, torch.Tensor) else list(second)
    out: list[int] = []
    seen: set[int] = set()
    for x, y in zip(a, b, strict=True):
        for index in (int(x), int(y)):
            if index not in seen:
                seen.add(index)
                out.append(index)
    return out


def weight_magnitude(module: nn.Module, norm: str = "l2", side: str = "output") -> torch.Tensor:
    """Norm of each neuron's weights: rows of a Linear weight ``(n, in)``, filters of a
    Conv2d weight ``(n, in, kh, kw)`` → ``(n,)``; for an input site the columns (the
    weights through which each input feature reaches the layer)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    flat = weight.detach().t() if side == "input" else weight.detach().flatten(1)
    return flat.abs().sum(1) if norm == "l1" else flat.norm(dim=1)


def _elementwise(kind: str) -> Any:
    def reduce(z: torch.Tensor) -> torch.Tensor:
        if kind == "relu":
            z = z.clamp_min(0)
        elif kind == "abs":
            z = z.abs()
        return z.flatten(2).mean(2) if z.dim() > 2 else z

    return reduce


def ranking(values: torch.Tensor) -> torch.Tensor:
    """Indices high to low; ties keep index order (stable)."""
    return torch.sort(values, descending=True, stable=True).indices


def score_neurons(
    model: nn.Module,
    data: Dataset | torch.Tensor,
    triggers: Any,
    spec: InputSpec,
    config: ScoringConfig = ScoringConfig(),
    *,
    probe: LayerProbe | None = None,
) -> NeuronScores:
    """Score the neurons of ``config.layer`` of ``model`` (raw model: ``spec``'s
    normalisation is applied here) on ``data`` (clean samples ``(N, C, H, W)`` in
    ``spec.value_range``, with labels when a `Dataset`) stamped with ``triggers``.

    The model is not modified.
    """
    probe = probe or LayerProbe(model, config.layer, spec, max_rows=config.max_rows)
    attack = build_attack_set(data, triggers, spec, samples=config.samples, seed=config.seed)
    module = get_module(model, probe.info.module)
    weight = weight_magnitude(module, config.weight_norm, probe.info.side)
    if probe.can_capture:
        reduce = _elementwise(config.activation)
        _, triggered = probe.capture(attack.x, reduce)
        _, clean = probe.capture(attack.clean, reduce)
        activation, activation_clean = triggered.mean(0), clean.mean(0)
        source: str = probe.mode
        key = activation - activation_clean if config.rank_by == "difference" else activation
    else:
        # weight-masking fallback: the drop of the target margin when a neuron alone is
        # zeroed stands in for its activation (n forward passes)
        base = attack.margin(probe.logits(attack.x))
        drops = []
        for index in range(probe.neurons):
            keep = torch.ones(1, probe.neurons)
            keep[0, index] = 0
            drops.append(base - attack.margin(probe.masked_logits(attack.x, keep))[0])
        activation = torch.stack(drops)
        activation_clean = torch.zeros_like(activation)
        key = activation
        source = "ablation"
        log.warning("activations of %s are not observable: ranked by ablation", probe.info.name)
    return NeuronScores(
        layer=probe.info.name,
        kind=probe.info.kind,
        activation=activation,
        activation_clean=activation_clean,
        weight=weight,
        activation_ranking=ranking(key),
        weight_ranking=ranking(weight),
        source=source,
        target_labels=attack.labels,
    )
