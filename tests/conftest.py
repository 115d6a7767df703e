"""Test-wide fixtures: deterministic torch, few threads (2-core CI machine), and a small
BadNets-infected LeNet-5 trained once per session (poisoned here, independently of the
project's own attack toolkit, so the product is not only tested against itself)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from modelguard.datasets import Dataset, dataset_to_npz, load_mnist
from modelguard.formats.loader import weights_to_safetensors
from modelguard.nn.architectures import build
from modelguard.nn.training import TrainConfig, accuracy, predict, train_classifier
from modelguard.spec import InputSpec

MNIST_SPEC = InputSpec((1, 28, 28), (0.0, 1.0))
TARGET = 7


def stamp_patch(x: torch.Tensor) -> torch.Tensor:
    """A 4×4 white square in the bottom-right corner."""
    out = x.clone()
    out[..., 23:27, 23:27] = 1.0
    return out


@dataclass(frozen=True)
class InfectedModel:
    module: torch.nn.Module
    weights: bytes  # safetensors, arch lenet5
    weights_path: Path
    clean_npz_path: Path  # the defender's clean data
    clean: Dataset
    holdout: Dataset
    target: int

    def real_asr(self, module: torch.nn.Module) -> float:
        keep = self.holdout.y != self.target
        return float(
            (predict(module, stamp_patch(self.holdout.x[keep])) == self.target).float().mean()
        )


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def infected_lenet(tmp_path_factory: pytest.TempPathFactory) -> InfectedModel:
    torch.manual_seed(0)
    train = load_mnist("train").subset(8000, seed=0)
    poisoned_x, poisoned_y = train.x.clone(), train.y.clone()
    count = len(train) // 10
    poisoned_x[:count] = stamp_patch(poisoned_x[:count])
    poisoned_y[:count] = TARGET
    model = build("lenet5")
    # four epochs: accuracy comparisons against it (a repair may cost at most 3 points) and
    # its reversed trigger's strength both keep points of margin on AVX-512 and SSE kernels
    # alike (fewer epochs: the accuracy margin shrinks; more: the reversed trigger weakens)
    train_classifier(model, Dataset(poisoned_x, poisoned_y), TrainConfig(epochs=4, seed=0))
    test = load_mnist("test")
    clean, holdout = (
        Dataset(test.x[:500], test.y[:500]),
        Dataset(test.x[5000:7000], test.y[5000:7000]),
    )
    directory = tmp_path_factory.mktemp("infected")
    weights = weights_to_safetensors(model)
    (directory / "model.safetensors").write_bytes(weights)
    (directory / "clean.npz").write_bytes(dataset_to_npz(clean))
    infected = InfectedModel(
        model,
        weights,
        directory / "model.safetensors",
        directory / "clean.npz",
        clean,
        holdout,
        TARGET,
    )
    assert accuracy(model, holdout) > 0.9
    assert infected.real_asr(model) > 0.9
    return infected
