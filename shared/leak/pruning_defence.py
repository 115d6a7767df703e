"""Pruning defence against data-processing-stage theft (the data-sandbox theft study's defence).

A malicious augmentation teaches the model labels for synthetic inputs that real data
never resembles; the units that memorise them are the ones clean data leaves idle. The
defence measures every unit's mean activation on clean data (after ReLU; the per-channel
mean over ``H×W`` for a convolution) and prunes the least active ones — it zeroes the
unit's weights (row ``i`` of a Linear weight ``(out, in)``, filter ``i`` of a Conv weight
``(out, in, kH, kW)``) and its bias, so its ReLU output is 0. Pruning goes in steps, least
active first, and stops for a layer before the clean accuracy (when labels are given)
falls more than ``max_accuracy_drop`` below the unpruned model's. Optionally
(``finetune_epochs``; not in the reference method, the "fine-pruning" of Liu et al., RAID 2018) the
pruned model is then trained briefly on the clean data with the pruned units held at 0,
which recovers accuracy and lets a larger ``fraction`` be pruned.

Assumes the pruned layers feed a ReLU-family activation (a zeroed Linear/Conv followed by
batch normalisation does not output 0). The input model is left untouched: the result
holds a pruned copy.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class PruningDefenceConfig:
    """``fraction``: most units pruned per layer; ``layers``: Linear/Conv layers to prune
    (empty: every Linear layer but the last, i.e. the hidden fully-connected layers);
    ``step``: share of a layer's units pruned per step; ``max_accuracy_drop``: largest
    clean-accuracy loss accepted (absolute, needs labels; None: prune ``fraction``
    regardless); ``finetune_*``: the optional masked fine-tune on the clean data (needs
    labels)."""

    fraction: float = 0.5
    layers: tuple[str, ...] = ()
    step: float = 0.05
    max_accuracy_drop: float | None = 0.02
    batch_size: int = 500
    finetune_epochs: int = 0
    finetune_lr: float = 5e-4
    finetune_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.finetune_epochs < 0 or self.finetune_batch_size < 1:
            raise ValueError("finetune_epochs >= 0 and finetune_batch_size >= 1 are required")
        if not (math.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise ValueError("finetune_lr must be finite and > 0")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError("fraction must be in (0, 1)")
        if not 0.0 < self.step <= 1.0:
            raise ValueError("step must be in (0, 1]")
        if self.max_accuracy_drop is not None and not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError("max_accuracy_drop must be in [0, 1]")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@dataclass(frozen=True)
class PrunedLayer:
    layer: str
    units: int
    #: pruned unit indices, least active first
    pruned: list[int]
    #: mean clean activation of every unit (index = unit)
    mean_activation: list[float]

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "units": self.units,
            "pruned": list(self.pruned),
            "mean_activation": list(self.mean_activation),
        }


@dataclass
class PruningResult:
    model: nn.Module
    layers: list[PrunedLayer]
    accuracy_before: float | None
    accuracy_after: float | None

    @property
    def pruned_units(self) -> int:
        return sum(len(layer.pruned) for layer in self.layers)

    def to_dict(self) -> dict[str, object]:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "pruned_units": self.pruned_units,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
        }


def default_layers(module: nn.Module) -> tuple[str, ...]:
    """Every Linear layer but the last (the classifier), in module order."""
    linear = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    return tuple(linear[:-1])


def _modules(module: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    found = dict(module.named_modules())
    out: dict[str, nn.Module] = {}
    for name in names:
        layer = found.get(name)
        if not isinstance(layer, _PRUNABLE):
            raise ValueError(f"{name!r} is not a Linear/Conv layer of the model")
        out[name] = layer
    return out


@torch.no_grad()
def mean_activations(
    module: nn.Module, x: torch.Tensor, layers: tuple[str, ...], batch_size: int = 500
) -> dict[str, torch.Tensor]:
    """Mean ReLU activation of every unit of ``layers`` over ``x`` (N, C, H, W):
    ``{layer: (units,)}`` (channels for convolutions)."""
    targets = _modules(module, layers)
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str) -> object:
        def record(_m: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            act = torch.relu(output.detach())
            per_unit = act.transpose(0, 1).reshape(act.shape[1], -1).sum(1)
            per_unit = per_unit / (act[0, 0].numel() if act.dim() > 2 else 1)
            sums[name] = sums.get(name, torch.zeros_like(per_unit)) + per_unit

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in targets.items()]  # type: ignore[arg-type]
    was_training = module.training
    module.eval()
    try:
        for start in range(0, len(x), batch_size):
            module(x[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    count = max(len(x), 1)
    return {name: sums[name] / count for name in targets}


@torch.no_grad()
def _accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += int(
            (module(x[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum()
        )
    return correct / max(len(x), 1)


@torch.no_grad()
def _zero_units(layer: nn.Module, units: list[int]) -> None:
    if not units:
        return
    index = torch.tensor(units, dtype=torch.long)
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    weight[index] = 0.0
    bias = getattr(layer, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias[index] = 0.0


@torch.no_grad()
def prune_dormant_neurons(
    module: nn.Module,
    clean_x: torch.Tensor,
    clean_y: torch.Tensor | None = None,
    config: PruningDefenceConfig = PruningDefenceConfig(),
) -> PruningResult:
    """Prune the units least active on clean inputs ``clean_x`` (N, C, H, W), with labels
    ``clean_y`` (N,) when the accuracy guard is wanted. Returns a pruned copy."""
    if isinstance(module, torch.jit.ScriptModule):
        raise ValueError("the pruning defence needs an eager nn.Module, not TorchScript")
    if clean_x.dim() < 2 or len(clean_x) == 0:
        raise ValueError("clean_x must be a non-empty batch")
    if clean_y is not None and clean_y.shape != (len(clean_x),):
        raise ValueError("clean_y must have shape (N,)")
    names = config.layers or default_layers(module)
    if not names:
        raise ValueError("the model has no hidden Linear layer: name the layers to prune")
    model = copy.deepcopy(module).eval()
    activations = mean_activations(model, clean_x, names, config.batch_size)
    targets = _modules(model, names)
    guard = clean_y is not None and config.max_accuracy_drop is not None
    before = _accuracy(model, clean_x, clean_y, config.batch_size) if clean_y is not None else None
    floor = (
        before - config.max_accuracy_drop
        if guard and before is not None and config.max_accuracy_drop is not None
        else -math.inf
    )
    pruned_layers: list[PrunedLayer] = []
    for name in names:
        layer = targets[name]
        mean = activations[name]
        units = int(mean.numel())
        order = torch.argsort(mean, stable=True).tolist()
        limit = math.floor(config.fraction * units)
        step = max(1, round(config.step * units))
        kept: list[int] = []
        while len(kept) < limit:
            batch = order[len(kept) : min(limit, len(kept) + step)]
            weight = layer.weight
            bias = getattr(layer, "bias", None)
            assert isinstance(weight, torch.Tensor)
            saved_w = weight.detach().clone()
            saved_b = bias.detach().clone() if isinstance(bias, torch.Tensor) else None
            _zero_units(layer, batch)
            too_costly = (
                guard
                and clean_y is not None
                and _accuracy(model, clean_x, clean_y, config.batch_size) < floor
            )
            if too_costly:
                weight.copy_(saved_w)
                if saved_b is not None and isinstance(bias, torch.Tensor):
                    bias.copy_(saved_b)
                break
            kept.extend(batch)
        pruned_layers.append(PrunedLayer(name, units, kept, [float(v) for v in mean]))
        log.info("pruned %d/%d units of %s", len(kept), units, name)
    if config.finetune_epochs > 0:
        if clean_y is None:
            raise ValueError("fine-tuning after pruning needs clean labels")
        _finetune(model, clean_x, clean_y, targets, pruned_layers, config)
    after = _accuracy(model, clean_x, clean_y, config.batch_size) if clean_y is not None else None
    return PruningResult(model, pruned_layers, before, after)


def _finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: dict[str, nn.Module],
    pruned: list[PrunedLayer],
    config: PruningDefenceConfig,
) -> None:
    """Adam on cross-entropy over the clean data, re-zeroing the pruned units after
    every step so the pruning sticks."""
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.finetune_lr)
    model.train()
    with torch.enable_grad():
        for _ in range(config.finetune_epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), config.finetune_batch_size):
                index = order[start : start + config.finetune_batch_size]
                loss = nn.functional.cross_entropy(model(x[index]), y[index])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                for layer in pruned:
                    _zero_units(targets[layer.layer], layer.pruned)
    model.eval()
