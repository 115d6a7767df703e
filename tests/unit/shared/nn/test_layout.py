"""The weight layout of a model's convolutions: changed for a while, put back exactly."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import nn

from modelguard.nn.layout import AS_LOADED, CHANNELS_LAST, layout_matters, weight_layout


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(torch.relu(self.norm(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class Features(nn.Module):
    """The convolutions' output itself, to see the layout a forward ran in."""

    def __init__(self, net: ConvNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def convnet() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def reloaded(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


X = torch.rand(4, 3, 20, 20)
AS_USERS_LOAD: dict[str, Callable[[nn.Module], nn.Module]] = {
    "eager": lambda model: model,
    "traced-and-loaded": lambda model: reloaded(torch.jit.trace(model, X)),
    "scripted-and-loaded": lambda model: reloaded(torch.jit.script(model)),
}


@pytest.mark.parametrize("kind", list(AS_USERS_LOAD))
def test_the_forward_runs_channels_last_inside_and_the_model_leaves_exactly_as_it_came(
    kind: str,
) -> None:
    features = AS_USERS_LOAD[kind](Features(convnet()))
    model = AS_USERS_LOAD[kind](convnet())
    expected, expected_features = model(X), features(X)
    assert expected_features.is_contiguous()
    before = [(id(p), p.data_ptr(), p.stride()) for p in model.parameters()]
    with weight_layout(model, CHANNELS_LAST), weight_layout(features, CHANNELS_LAST):
        stem = next(p for p in model.parameters() if p.dim() == 4)
        assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
        # the forward (a TorchScript one too) reads the swapped weights: its activations
        # come out channels-last
        inside = features(X)
        assert inside.is_contiguous(memory_format=torch.channels_last)
        assert not inside.is_contiguous()
        torch.testing.assert_close(inside, expected_features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-5)
    assert [(id(p), p.data_ptr(), p.stride()) for p in model.parameters()] == before
    assert torch.equal(model(X), expected)
    assert features(X).is_contiguous()


def test_the_weights_are_put_back_when_the_block_raises() -> None:
    model = convnet()
    pointers = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inside"), weight_layout(model, CHANNELS_LAST):
        raise RuntimeError("inside")
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(p.is_contiguous() for p in model.parameters())


def test_as_loaded_changes_nothing_and_an_unknown_layout_is_refused() -> None:
    model = convnet()
    before = [(p.data_ptr(), p.stride()) for p in model.parameters()]
    with weight_layout(model, AS_LOADED):
        assert [(p.data_ptr(), p.stride()) for p in model.parameters()] == before
    with (
        pytest.raises(ValueError, match="as_loaded, channels_last"),
        weight_layout(model, "nhwc"),  # type: ignore[arg-type]
    ):
        raise AssertionError("the block must not run")


def test_the_layout_matters_only_where_a_weight_would_change() -> None:
    assert layout_matters(convnet())
    assert not layout_matters(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))
    # depthwise (O, 1, k, k) and pointwise (O, I, 1, 1) weights are laid out alike
    mobile = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1))
    assert not layout_matters(mobile)
    model = convnet()
    with weight_layout(model, CHANNELS_LAST):
        assert not layout_matters(model)  # already channels-last
        with weight_layout(model, CHANNELS_LAST):  # nested: nothing more to change
            assert not layout_matters(model)
    assert layout_matters(model)
