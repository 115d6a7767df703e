"""What a repair returns: the repaired model, the pruned neurons, before/after figures and
the pruning curve."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

Action = Literal["kept", "rolled_back"]


@dataclass(frozen=True)
class CurveStep:
    """One pruning decision. ``asr``: the reversed trigger's attack success rate (max over
    triggers) and ``agreement``: share of validation samples on which the model agrees with
    the original, both measured right after pruning ``index`` (before any fine-tuning).
    ``reason`` says why a prune was rolled back (``asr_not_dropped``,
    ``agreement_below_q0``, ``accuracy_drop``). ``neurons``: every neuron pruned together
    in this step when a large site is swept in groups (``index`` is the first)."""

    step: int
    layer: str
    index: int
    asr: float
    agreement: float
    action: Action
    reason: str = ""
    neurons: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": self.step,
            "layer": self.layer,
            "index": self.index,
            "asr": self.asr,
            "agreement": self.agreement,
            "action": self.action,
        }
        if self.reason:
            out["reason"] = self.reason
        if len(self.neurons) > 1:
            out["neurons"] = list(self.neurons)
        return out


@dataclass(frozen=True)
class Measure:
    """Model figures on the defender's validation split. ``reversed_asr``: max over the
    reversed triggers; ``per_trigger_asr``: one per trigger; ``accuracy``: against the
    labels; ``agreement``: with the original model's predictions."""

    agreement: float
    reversed_asr: float
    accuracy: float
    per_trigger_asr: tuple[float, ...] = ()
    soft_asr: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "agreement": self.agreement,
            "reversed_asr": self.reversed_asr,
            "accuracy": self.accuracy,
            "per_trigger_asr": list(self.per_trigger_asr),
        }


@dataclass
class RepairResult:
    """Outcome of `modelguard.repair.registry.repair`.

    ``model``: the repaired copy, in the submitted format (TorchScript stays
    TorchScript). ``pruned``: ``(layer, index)`` in pruning order. ``evaluations``: model
    evaluations spent (one = one candidate pruning scored on the stamped or validation
    set). ``neurons``: size of the pruned layer. ``edit``: the classifier edit made at the
    end, if any (a large model's repair may edit its classifier and prune nothing).
    ``notes``: anything a user should know (fallbacks, budget exhausted, bar not reached).
    """

    mode: str
    layer: str
    target_labels: list[int]
    pruned: list[tuple[str, int]]
    before: Measure
    after: Measure
    curve: list[CurveStep]
    evaluations: int
    seconds: float
    neurons: int
    model: nn.Module | None = None
    finetune_steps: int = 0
    probe_mode: str = ""
    shapley_values: list[float] | None = None
    notes: list[str] = field(default_factory=list)
    edit: str = ""

    @property
    def pruned_fraction(self) -> float:
        """Share of the layer's neurons pruned."""
        return len(self.pruned) / self.neurons if self.neurons else 0.0

    @property
    def repaired(self) -> bool:
        return self.after.reversed_asr < self.before.reversed_asr

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the model is not included)."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "layer": self.layer,
            "target_labels": list(self.target_labels),
            "pruned": [{"layer": layer, "index": index} for layer, index in self.pruned],
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "curve": [step.to_dict() for step in self.curve],
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "neurons": self.neurons,
            "pruned_fraction": self.pruned_fraction,
            "finetune_steps": self.finetune_steps,
            "probe_mode": self.probe_mode,
            "notes": list(self.notes),
        }
        if self.edit:
            out["edit"] = self.edit
        if self.shapley_values is not None:
            out["shapley_values"] = list(self.shapley_values)
        return out
