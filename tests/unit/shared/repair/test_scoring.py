"""Neuron scoring and layer access: rankings on a hand-built model, eager and TorchScript
alike; layer resolution on the registered architectures; the batched layer probe."""

from __future__ import annotations

import io
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.triggers import ReversedTrigger
from modelguard.errors import InvalidInput
from modelguard.nn.architectures import build
from modelguard.nn.probe import (
    MAX_LISTED_LAYERS,
    LayerProbe,
    get_module,
    layer_choices,
    list_prunable_layers,
    resolve_layer,
    zeroed,
)
from modelguard.repair.scoring import ScoringConfig, as_reversed_triggers, score_neurons
from modelguard.spec import InputSpec


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FourNeurons(nn.Module):
    """``fc1`` over inputs (1, 4, 4):

    * 0: trigger detector ``relu(8·x[15])`` (silent on clean data, incoming norm 8);
    * 1: always on, ``relu(10 + x[0])`` (high activation everywhere, norm 1);
    * 2: clean feature ``relu(2·x[1])`` (norm 2);
    * 3: dead (norm 0.5, never positive).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 4)
        self.fc2 = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc1.weight.zero_()
            self.fc1.bias.zero_()
            self.fc1.weight[0, 15] = 8.0
            self.fc1.weight[1, 0] = 1.0
            self.fc1.bias[1] = 10.0
            self.fc1.weight[2, 1] = 2.0
            self.fc1.weight[3, 2] = -0.5
            self.fc2.weight.copy_(
                torch.tensor([[0.0, 0.1, 1.0, 0.0], [5.0, 0.1, 0, 0], [0, 0, 0, 0]])
            )
            self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


def data(n: int = 120) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 4, 4, generator=generator)
    x[:, 0, 3, 3] = 0.0
    return Dataset(x, torch.randint(3, (n,), generator=generator))


def trigger() -> ReversedTrigger:
    mask = torch.zeros(4, 4)
    mask[3, 3] = 1.0
    return ReversedTrigger(1, mask, torch.ones(1, 4, 4))


SPEC = InputSpec((1, 4, 4))


def script(model: nn.Module, example: torch.Tensor, traced: bool = False) -> nn.Module:
    module = torch.jit.trace(model, example) if traced else torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    loaded: nn.Module = torch.jit.load(buffer)
    return loaded


def test_rankings_on_a_known_model() -> None:
    scores = score_neurons(FourNeurons().eval(), data(), [trigger()], SPEC)
    assert scores.layer == "fc1" and scores.kind == "linear" and scores.source == "hook"
    assert scores.activation.shape == scores.weight.shape == (4,)
    # the trigger adds 8 to neuron 0 and nothing elsewhere: first by activation difference
    assert scores.activation_ranking[0] == 0
    assert float(scores.activation[0]) == pytest.approx(8.0)
    assert float(scores.activation_clean[0]) == 0.0
    assert scores.weight_ranking.tolist() == [0, 2, 1, 3]
    assert torch.allclose(scores.weight, torch.tensor([8.0, 1.0, 2.0, 0.5]))
    # the reference method's literal ranking (triggered activation) puts the always-on neuron first
    literal = score_neurons(
        FourNeurons().eval(), data(), [trigger()], SPEC, ScoringConfig(rank_by="triggered")
    )
    assert literal.activation_ranking[0] == 1
    assert sorted(literal.activation_ranking.tolist()) == [0, 1, 2, 3]
    document = scores.to_dict()
    assert document["activation_ranking"][0] == 0 and document["target_labels"] == [1]


def test_l1_weight_norm() -> None:
    scores = score_neurons(
        FourNeurons().eval(), data(), [trigger()], SPEC, ScoringConfig(weight_norm="l1")
    )
    assert torch.allclose(scores.weight, torch.tensor([8.0, 1.0, 2.0, 0.5]))


@pytest.mark.parametrize("traced", [False, True])
def test_torchscript_scores_equal_eager_scores(traced: bool) -> None:
    eager = FourNeurons().eval()
    scripted = script(eager, data().x[:2], traced)
    reference = score_neurons(eager, data(), [trigger()], SPEC)
    scores = score_neurons(scripted, data(), [trigger()], SPEC)
    assert scores.source == "graph"
    assert torch.allclose(scores.activation, reference.activation)
    assert torch.equal(scores.activation_ranking, reference.activation_ranking)
    assert torch.equal(scores.weight_ranking, reference.weight_ranking)


def test_weight_masking_fallback_ranks_by_ablation() -> None:
    scripted = script(FourNeurons().eval(), data().x[:2])
    probe = LayerProbe(scripted, None, SPEC, allow_graph=False)
    scores = score_neurons(scripted, data(), [trigger()], SPEC, probe=probe)
    assert scores.source == "ablation"
    assert scores.activation_ranking[0] == 0  # zeroing it costs the trigger the most
    assert torch.equal(scripted.fc1.weight, FourNeurons().fc1.weight)  # restored


def test_normalisation_is_applied() -> None:
    """A model trained on (x - 0.5) / 0.25 scores the same as its raw-input twin."""

    class Raw(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x * 0.25 + 0.5)  # type: ignore[no-any-return]

    normalised = Raw(FourNeurons()).eval()
    spec = InputSpec((1, 4, 4), mean=(0.5,), std=(0.25,))
    a = score_neurons(normalised, data(), [trigger()], spec, ScoringConfig(layer="inner.fc1"))
    b = score_neurons(FourNeurons().eval(), data(), [trigger()], SPEC)
    assert torch.allclose(a.activation, b.activation, atol=1e-5)


def test_trigger_forms() -> None:
    t = trigger()
    as_tuple = as_reversed_triggers((1, t.mask, t.pattern), SPEC)
    assert as_tuple[0].label == 1 and torch.equal(as_tuple[0].mask, t.mask)
    result = SimpleNamespace(
        masks=torch.stack([torch.zeros(4, 4), t.mask]),
        patterns=torch.stack([torch.zeros(1, 4, 4), t.pattern]),
        flagged=(1,),
    )
    from_result = as_reversed_triggers(result, SPEC)
    assert [x.label for x in from_result] == [1]
    with pytest.raises(InvalidInput):
        as_reversed_triggers([(1, torch.zeros(5, 5), torch.zeros(1, 5, 5))], SPEC)
    with pytest.raises(InvalidInput):
        as_reversed_triggers([], SPEC)


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize(
    ("arch", "default", "neurons"),
    [("lenet5", "fc1", 120), ("vgg_small", "fc1", 256), ("resnet18_small", "fc:in", 128)],
)
def test_default_layer(arch: str, default: str, neurons: int) -> None:
    spec = InputSpec((1, 28, 28))
    model = build(arch).eval()
    info = resolve_layer(model, None, spec)
    assert (info.name, info.neurons) == (default, neurons)
    # the choice is explained (the repair's notes carry it)
    assert ("input features" in info.reason) == default.endswith(":in") and info.reason
    scripted = script(model, torch.rand(2, 1, 28, 28))
    assert resolve_layer(scripted, None, spec) == info
    names = [layer.name for layer in list_prunable_layers(scripted)]
    assert names == [layer.name for layer in list_prunable_layers(model)]


def test_named_layers_and_errors() -> None:
    model = build("lenet5").eval()
    spec = InputSpec((1, 28, 28))
    conv = resolve_layer(model, "conv2", spec)
    assert (conv.kind, conv.neurons) == ("conv2d", 16)
    with pytest.raises(InvalidInput, match="not a prunable"):
        resolve_layer(model, "pool", spec)
    with pytest.raises(InvalidInput, match="fc1"):
        resolve_layer(model, "nope", spec)


def test_a_misnamed_layer_of_a_large_model_gets_the_close_names_and_a_short_list() -> None:
    names = [f"blocks.{i}.conv_pw" for i in range(60)] + [f"blocks.{i}.conv_dw" for i in range(60)]
    message = layer_choices("blocks.12.conv_pv", names)
    assert message.startswith("did you mean blocks.12.conv_pw")
    assert "the model has 120 prunable layers" in message
    listed = message.split(": ", 1)[1].split(", ")
    assert len(listed) == MAX_LISTED_LAYERS + 1  # the ellipsis between both ends
    assert listed[0] == names[0] and listed[-1] == names[-1] and "…" in listed
    # a short list is given whole, without a guess when nothing is close
    assert layer_choices("zzz", ["fc1", "fc2"]) == "choose one of: fc1, fc2"


@pytest.mark.parametrize("kind", ["eager", "script", "trace"])
@pytest.mark.parametrize(
    ("arch", "layer"),
    [
        ("lenet5", None),
        ("lenet5", "fc2:in"),
        ("resnet18_small", None),
        ("resnet18_small", "layer4.1.conv2"),
    ],
)
def test_batched_masks_equal_zeroed_weights(kind: str, arch: str, layer: str | None) -> None:
    torch.manual_seed(0)
    spec = InputSpec((1, 28, 28), mean=(0.1307,), std=(0.3081,))
    model = build(arch).eval()
    x = torch.rand(6, 1, 28, 28)
    if kind != "eager":
        model = script(model, x[:2], traced=kind == "trace")
    probe = LayerProbe(model, layer, spec)
    assert probe.mode == ("hook" if kind == "eager" else "graph") and probe.batched
    keep = (torch.rand(4, probe.neurons, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    batched = probe.masked_logits(x, keep)
    assert batched.shape == (4, 6, 10)
    module = get_module(model, probe.info.module)
    for row in range(4):
        pruned = torch.nonzero(keep[row] == 0).flatten().tolist()
        with zeroed(module, pruned, probe.info.side):
            expected = probe.logits(x)
        assert torch.allclose(batched[row], expected, atol=1e-4)
    _, activations = probe.capture(x)
    assert activations.shape == (6, probe.neurons)
