"""Pruning TorchScript models: zeroing survives saving, fine-tuning keeps pruned neurons
at zero, and a repaired TorchScript model stays a loadable archive with the same
input/output contract."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.triggers import ReversedTrigger
from modelguard.formats.loader import LoadedModel, load_model, save_model
from modelguard.nn.architectures import build
from modelguard.nn.probe import LayerProbe, resolve_layer
from modelguard.repair.context import FineTuneConfig, Pruner, copy_model, fine_tune
from modelguard.repair.registry import repair
from modelguard.repair.rollback import RollbackConfig
from modelguard.repair.shapley import ShapleyConfig
from modelguard.repair.shapley_prune import ShapleyPruneConfig
from modelguard.spec import InputSpec


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def roundtrip(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    loaded: nn.Module = torch.jit.load(buffer)
    return loaded


class ToyNet(nn.Module):
    """``fc1`` neuron 0 detects the trigger (pixel 15) and pushes class 1; neuron 1 is the
    clean feature (pixel 0 > 0.5 → class 1); neurons 2-3 are spare capacity."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 4)
        self.fc2 = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc1.weight.zero_()
            self.fc1.bias.zero_()
            self.fc1.weight[0, 15] = 10.0
            self.fc1.weight[1, 0] = 20.0
            self.fc1.bias[1] = -10.0
            self.fc1.weight[2:, 0] = 0.1
            self.fc2.weight.zero_()
            self.fc2.bias.copy_(torch.tensor([2.0, 0.0]))
            self.fc2.weight[1, 0] = 20.0
            self.fc2.weight[1, 1] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


def toy_data(n: int = 400, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=generator) * 0.3
    y = torch.randint(2, (n,), generator=generator)
    x[:, 0, 0, 0] = torch.where(y == 1, 0.7 + 0.3 * torch.rand(n, generator=generator), 0.3)
    x[:, 0, 3, 3] = 0.0
    return Dataset(x, y)


def toy_trigger() -> ReversedTrigger:
    mask = torch.zeros(4, 4)
    mask[3, 3] = 1.0
    return ReversedTrigger(1, mask, torch.ones(1, 4, 4))


SPEC = InputSpec((1, 4, 4))
SPEC_28 = InputSpec((1, 28, 28))


def test_prune_unprune_and_save_on_a_script_module() -> None:
    scripted = roundtrip(torch.jit.script(build("lenet5").eval()))
    original = scripted.fc1.weight.detach().clone()
    original_bias = scripted.fc1.bias.detach().clone()
    pruner = Pruner(scripted, "fc1")
    pruner.prune(5)
    pruner.prune(17)
    assert pruner.is_zero() and pruner.pruned == [5, 17]
    reloaded = roundtrip(scripted)
    assert torch.all(reloaded.fc1.weight[[5, 17]] == 0)
    assert torch.all(reloaded.fc1.bias[[5, 17]] == 0)
    assert isinstance(reloaded, torch.jit.ScriptModule)
    pruner.unprune(5)
    assert torch.equal(scripted.fc1.weight[5], original[5])
    assert torch.equal(scripted.fc1.bias[5], original_bias[5])
    assert pruner.pruned == [17]


def test_conv_channels_are_pruned_in_a_traced_module() -> None:
    model = build("lenet5").eval()
    traced = roundtrip(torch.jit.trace(model, torch.rand(2, 1, 28, 28)))
    pruner = Pruner(traced, "conv2")
    pruner.prune(3)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        model.conv2.weight[3] = 0
        model.conv2.bias[3] = 0
        assert torch.allclose(traced(x), model(x), atol=1e-5)


def test_input_features_are_pruned_as_weight_columns() -> None:
    """``fc:in`` of a ResNet: pruning feature j zeroes column j of ``fc`` (bias kept),
    in a TorchScript archive and after saving; fine-tuning keeps the column at zero;
    unpruning restores it exactly."""
    model = build("resnet18_small").eval()
    scripted = roundtrip(torch.jit.script(model))
    original = scripted.fc.weight.detach().clone()
    bias = scripted.fc.bias.detach().clone()
    probe = LayerProbe(scripted, None, InputSpec((1, 28, 28)))
    assert (probe.info.name, probe.info.side, probe.neurons) == ("fc:in", "input", 128)
    pruner = Pruner(scripted, probe.info)
    assert pruner.neurons == 128
    pruner.prune(7)
    pruner.prune(100)
    assert pruner.is_zero()
    reloaded = roundtrip(scripted)
    assert torch.all(reloaded.fc.weight[:, [7, 100]] == 0)
    assert torch.equal(reloaded.fc.bias, bias)
    assert torch.equal(reloaded.fc.weight[:, 8], original[:, 8])
    # the probe's masked logits equal the pruned model's
    x = torch.rand(3, 1, 28, 28)
    keep = torch.ones(1, 128)
    keep[0, [7, 100]] = 0
    with torch.no_grad():
        pruned_logits = scripted(x)
    pruner.unprune(7)
    pruner.unprune(100)
    assert torch.equal(scripted.fc.weight, original)
    assert torch.allclose(probe.masked_logits(x, keep)[0], pruned_logits, atol=1e-5)
    # fine-tuning (eager copy, so gradients flow through the hooks-free model)
    eager = build("resnet18_small").eval()
    tuner = Pruner(eager, resolve_layer(eager, "fc:in", SPEC_28))
    tuner.prune(3)
    data = Dataset(torch.rand(64, 1, 28, 28), torch.randint(10, (64,)))
    fine_tune(eager, data, SPEC_28, [tuner], FineTuneConfig(lr=1e-2), steps=3)
    assert tuner.is_zero()
    assert bool((eager.fc.weight[:, 4] != 0).any())


def test_fine_tuning_keeps_pruned_neurons_at_zero() -> None:
    scripted = roundtrip(torch.jit.script(ToyNet().eval()))
    pruner = Pruner(scripted, "fc1")
    pruner.prune(2)
    before = scripted.fc1.weight.detach().clone()
    steps = fine_tune(
        scripted,
        toy_data(),
        SPEC,
        [pruner],
        FineTuneConfig(lr=1e-2),
        steps=20,
        triggers=[toy_trigger()],
    )
    assert steps == 20
    assert pruner.is_zero()
    assert not torch.equal(scripted.fc1.weight, before)  # the rest did train
    assert not scripted.training


@pytest.mark.parametrize("mode", ["rollback", "shapley"])
def test_repair_keeps_the_torchscript_format(mode: str) -> None:
    scripted = roundtrip(torch.jit.script(ToyNet().eval()))
    untouched = scripted.fc1.weight.detach().clone()
    config = (
        RollbackConfig()
        if mode == "rollback"
        else ShapleyPruneConfig(shapley=ShapleyConfig(max_evaluations=400), per_round=1)
    )
    result = repair(scripted, toy_data(), SPEC, [toy_trigger()], mode=mode, config=config)
    assert result.probe_mode == "graph"
    assert ("fc1", 0) in result.pruned
    assert result.before.reversed_asr == 1.0 and result.after.reversed_asr < 0.1
    assert result.after.agreement >= 0.97
    repaired = result.model
    assert isinstance(repaired, torch.jit.ScriptModule)
    assert repaired is not scripted
    assert torch.equal(scripted.fc1.weight, untouched)  # the submitted model is untouched
    # the archive reloads with torch.jit.load and honours the same contract
    reloaded = roundtrip(repaired)
    x = toy_data(8, seed=5).x
    assert reloaded(x).shape == scripted(x).shape == (8, 2)
    for _, index in result.pruned:
        assert torch.all(reloaded.fc1.weight[index] == 0) and reloaded.fc1.bias[index] == 0
    stamped = toy_trigger().stamp(x)
    assert bool((reloaded(stamped).argmax(1) == 1).float().mean() < 1.0)


def test_saved_through_modelio_it_stays_torchscript() -> None:
    scripted = roundtrip(torch.jit.script(ToyNet().eval()))
    result = repair(scripted, toy_data(), SPEC, [toy_trigger()], mode="rollback")
    assert result.model is not None
    blob = save_model(LoadedModel(result.model, "torchscript", "", 2))
    loaded = load_model(blob, SPEC)
    assert loaded.format == "torchscript" and loaded.num_classes == 2
    assert torch.all(loaded.module.fc1.weight[0] == 0)


def test_copy_model_is_independent() -> None:
    scripted = roundtrip(torch.jit.script(ToyNet().eval()))
    copied = copy_model(scripted)
    with torch.no_grad():
        copied.fc1.weight.zero_()
    assert scripted.fc1.weight.abs().sum() > 0
    assert isinstance(copied, torch.jit.ScriptModule)
