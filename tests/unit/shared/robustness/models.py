"""Tiny models whose attacks can be computed by hand."""

from __future__ import annotations

import torch
from torch import nn

from modelguard.datasets import Dataset


def binary_linear(bias_margin: float = 0.8) -> nn.Module:
    """Two classes on inputs ``(N, 1, 1, 3)``: ``z0 − z1 = (2, −3, 0)·x + bias_margin``, so
    an L∞ step of ε lowers the margin by at most ``‖(2, −3, 0)‖₁ ε = 5ε`` and an L2 step
    by ``√13 ε``; the third input is ignored (its gradient is exactly zero)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [-1.0, 1.0, 0.0]]))
        model[1].bias.copy_(torch.tensor([bias_margin, 0.0]))
    return model.eval()


class OneFeaturePerClass(nn.Module):
    """Three classes on ``(N, 1, 1, 3)``: logit ``k`` is ``4 · x_k``. An image of class
    ``c`` in [0, 1] is robust at L∞ ε exactly when ``x_c − max_{j≠c} x_j > 2ε`` (while
    no coordinate is clamped): the attack lowers ``x_c`` and raises ``x_j`` by ε each."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4.0 * x.flatten(1)


class Quantised(nn.Module):
    """`OneFeaturePerClass` on inputs rounded to quarters: the rounding has a zero
    gradient, so every gradient-based attack is blind (gradient masking by design)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4.0 * (torch.round(x * 4) / 4).flatten(1)


class Saturated(nn.Module):
    """`OneFeaturePerClass` with logits ten thousand times larger: the softmax is one-hot
    in float32 and the cross-entropy's gradient exactly zero (masking by saturation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4e4 * x.flatten(1)


def three_class_data(count: int = 60, seed: int = 0) -> Dataset:
    """Images in [0.2, 0.8] (no clamping at ε ≤ 0.2), labelled with their largest feature."""
    generator = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(count, 1, 1, 3, generator=generator)
    return Dataset(x, x.flatten(1).argmax(1))


def robust_by_hand(data: Dataset, eps: float) -> float:
    """`OneFeaturePerClass`'s exact robust accuracy at L∞ ε on ``data``."""
    flat = data.x.flatten(1)
    own = flat.gather(1, data.y.view(-1, 1)).squeeze(1)
    others = flat.scatter(1, data.y.view(-1, 1), -1.0).max(1).values
    return float(((own - others) > 2 * eps).float().mean())
