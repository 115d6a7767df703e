"""A small backdoored model for repair tests: an MLP on 8×8 images (``fc1`` 64 → 24, ReLU,
``fc2`` → 4 classes), trained in a fraction of a second on random images whose class is
which quadrant is brightest, with a quarter of them stamped by a 2×2 white patch in the
top-right corner and relabelled ``TARGET``. The patch is also the reversed trigger handed
to the repair (mask exactly the patch, pattern white)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from modelguard.datasets import Dataset
from modelguard.detection.triggers import ReversedTrigger
from modelguard.spec import InputSpec

SPEC = InputSpec((1, 8, 8), (0.0, 1.0))
TARGET = 0


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 24)
        self.fc2 = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def trigger() -> ReversedTrigger:
    mask = torch.zeros(8, 8)
    mask[0:2, 6:8] = 1.0
    return ReversedTrigger(TARGET, mask, torch.ones(1, 8, 8))


def images(n: int, seed: int) -> Dataset:
    """Clean images and their labels (the brightest quadrant)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=generator)
    quadrants = torch.stack(
        [x[:, 0, :4, :4], x[:, 0, :4, 4:], x[:, 0, 4:, :4], x[:, 0, 4:, 4:]], 1
    ).mean((2, 3))
    return Dataset(x, quadrants.argmax(1))


def backdoored(seed: int = 0) -> nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on the shared two-core machine: many times slower
    try:
        return _train(seed)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallNet()
    train = images(600, seed + 1)
    poisoned = torch.rand(len(train), generator=torch.Generator().manual_seed(seed + 2)) < 0.25
    x, y = train.x.clone(), train.y.clone()
    x[poisoned] = trigger().stamp(x[poisoned])
    y[poisoned] = TARGET
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


def clean_data(n: int = 120) -> Dataset:
    """The defender's clean samples."""
    return images(n, 99)
