"""Small, deterministic training and evaluation loops shared by the attack toolkits,
repair fine-tuning and the demo. No I/O: tensors in, model and figures out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from modelguard.datasets import Dataset

log = logging.getLogger(__name__)

#: Extra loss term evaluated once per batch on the model (e.g. a malicious regulariser).
Regulariser = Callable[[nn.Module], torch.Tensor]
#: Batch transform applied before the forward pass (e.g. poisoning, augmentation).
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    l1: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs >= 0, batch_size >= 1 and lr > 0 are required")


def train_classifier(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig = TrainConfig(),
    *,
    regulariser: Regulariser | None = None,
    transform: BatchTransform | None = None,
    progress: Callable[[float], None] | None = None,
) -> nn.Module:
    """Adam + cross-entropy over ``data`` for ``config.epochs``; returns ``model`` (trained
    in place) in eval mode. Deterministic for a given seed."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = len(data)
    steps_per_epoch = max(1, (n + config.batch_size - 1) // config.batch_size)
    total = steps_per_epoch * config.epochs
    step = 0
    model.train()
    for _epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            x, y = data.x[index], data.y[index]
            if transform is not None:
                x, y = transform(x, y)
            loss = F.cross_entropy(model(x), y)
            if config.l1 > 0:
                loss = loss + config.l1 * sum(p.abs().sum() for p in model.parameters())
            if regulariser is not None:
                loss = loss + regulariser(model)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            if progress is not None and step % 20 == 0:
                progress(step / total)
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels (N,)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 1000) -> float:
    if len(data) == 0:
        return 0.0
    return float((predict(model, data.x, batch_size) == data.y).float().mean())
