"""The weight layout of a model's convolutions: changed for a while, put back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelguard.nn.layout import CHANNELS_LAST, has_convolutions, weight_layout


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def four_d(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.dim() == 4]


@pytest.mark.parametrize("script", [False, True], ids=["eager", "torchscript"])
def test_channels_last_weights_give_the_same_logits_and_are_put_back_exactly(
    script: bool,
) -> None:
    x = torch.rand(4, 3, 20, 20)
    eager = convnet()
    model = torch.jit.trace(eager, x) if script else eager
    expected = model(x)
    before = [(p, p.data_ptr(), p.stride()) for p in model.parameters()]
    with weight_layout(model, CHANNELS_LAST):
        # the scripted forward reads the same parameters: their layout changed under it
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d(model))
        assert not all(p.is_contiguous() for p in four_d(model))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    after = list(model.parameters())
    assert [(p, p.data_ptr(), p.stride()) for p in after] == before
    assert torch.equal(model(x), expected)


def test_the_weights_are_put_back_when_the_block_raises() -> None:
    model = convnet()
    pointers = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inside"), weight_layout(model, CHANNELS_LAST):
        raise RuntimeError("inside")
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(p.is_contiguous() for p in model.parameters())


def test_an_unknown_layout_is_refused_and_a_model_without_convolutions_is_told_apart() -> None:
    with (
        pytest.raises(ValueError, match="contiguous, channels_last"),
        weight_layout(convnet(), "nhwc"),
    ):
        raise AssertionError("the block must not run")
    assert has_convolutions(convnet())
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert not has_convolutions(linear)
    x = torch.rand(2, 3, 2, 2)
    with weight_layout(linear, CHANNELS_LAST):  # nothing to lay out
        assert torch.equal(linear(x), linear[1](x.flatten(1)))
