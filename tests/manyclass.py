"""A many-class task small enough for tests: class ``k`` of ``classes`` is a fixed 8×8
binary code (`codes`) drawn on a ``side``² canvas (cells of ``side / 8`` pixels) under
noise and a brightness jitter; a LeNet-5 learns a thousand of them in seconds. Every class is
trained and reachable, as in an ImageNet model; a natural class needs a trigger that
rewrites much of the code, a planted BadNets patch only its corner."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.nn.architectures import LeNet5
from modelguard.nn.training import TrainConfig, accuracy, predict, train_classifier

PATCH = 4


def codes(classes: int, seed: int = 0, flips: int = 16) -> torch.Tensor:
    """One shared random 8×8 code with ``flips`` cells flipped per class: like natural
    classes, neighbours differ in a small part of the image (and are reachable with a
    trigger that rewrites those cells)."""
    generator = torch.Generator().manual_seed(seed)
    base = (torch.rand(64, generator=generator) > 0.5).float()
    out = base.repeat(classes, 1)
    for k in range(classes):
        cells = torch.randperm(64, generator=generator)[:flips]
        out[k, cells] = 1 - out[k, cells]
    return out.reshape(classes, 8, 8)


def sample(classes: int, per_class: int, side: int, seed: int, code_seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(per_class)
    cell = side // 8
    x = codes(classes, code_seed)[y].repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    x = 0.15 + 0.7 * x.unsqueeze(1)
    x = x * (0.85 + 0.3 * torch.rand(len(y), 1, 1, 1, generator=generator))
    x = x + 0.08 * torch.randn(x.shape, generator=generator)
    return Dataset(x.clamp(0, 1), y)


def stamp(x: torch.Tensor) -> torch.Tensor:
    """A white-and-black checkerboard patch in the bottom-right corner."""
    out = x.clone()
    rows = torch.arange(PATCH).view(-1, 1)
    cols = torch.arange(PATCH).view(1, -1)
    out[..., -PATCH - 1 : -1, -PATCH - 1 : -1] = ((rows + cols) % 2 == 0).float()
    return out


@dataclass(frozen=True)
class ManyClassModel:
    module: nn.Module
    clean: Dataset
    holdout: Dataset
    target: int | None
    side: int

    def real_asr(self, module: nn.Module) -> float:
        assert self.target is not None
        keep = self.holdout.y != self.target
        return float((predict(module, stamp(self.holdout.x[keep])) == self.target).float().mean())


def train_many_class(
    classes: int = 1000, side: int = 32, target: int | None = 617, seed: int = 0
) -> ManyClassModel:
    """A LeNet-5 on the code task (backdoored to ``target`` with `stamp` on a tenth of
    the training images unless ``target`` is None)."""
    train = sample(classes, 8, side, seed=seed + 1)
    x, y = train.x.clone(), train.y.clone()
    if target is not None:
        generator = torch.Generator().manual_seed(seed + 2)
        poisoned = torch.randperm(len(y), generator=generator)[: len(y) // 10]
        x[poisoned] = stamp(x[poisoned])
        y[poisoned] = target
    torch.manual_seed(seed)
    model = LeNet5(1, classes, (side, side))
    train_classifier(model, Dataset(x, y), TrainConfig(epochs=6, batch_size=64, lr=2e-3, seed=seed))
    model.eval()
    clean = sample(classes, 1, side, seed=seed + 3)
    holdout = sample(classes, 1, side, seed=seed + 4)
    return ManyClassModel(model, clean, holdout, target, side)


if __name__ == "__main__":
    import time

    started = time.perf_counter()
    made = train_many_class()
    print(f"trained in {time.perf_counter() - started:.1f}s")
    print("accuracy", accuracy(made.module, made.holdout), "asr", made.real_asr(made.module))
