"""Memory layout of a model's convolution weights.

oneDNN, which runs torch's CPU convolutions, is faster on many convolutional networks when
the activations are channels-last (NHWC): the depthwise and pointwise convolutions of
mobile architectures then read memory in order. A convolution's output follows its
weight's layout, so laying out the full convolutions' weights channels-last (the stem and
the like; depthwise and pointwise weights are laid out the same either way) carries the
whole network over. A reversal runs that way unless timing both on the model finds it
clearly slower (`modelguard.detection.budget.faster_layout`). The layout changes only the
strides of the weights, never their values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

#: ``as_loaded``: the weights as the model came (nothing is changed); ``channels_last``:
#: every 4-D weight channels-last.
Layout = Literal["as_loaded", "channels_last"]
AS_LOADED: Layout = "as_loaded"
CHANNELS_LAST: Layout = "channels_last"
LAYOUTS: tuple[Layout, ...] = (AS_LOADED, CHANNELS_LAST)


def _relaid(model: nn.Module) -> list[nn.Parameter]:
    """The 4-D parameters whose channels-last copy differs from them."""
    return [
        parameter
        for parameter in model.parameters()
        if parameter.dim() == 4 and not parameter.is_contiguous(memory_format=torch.channels_last)
    ]


def layout_matters(model: nn.Module) -> bool:
    """Whether `CHANNELS_LAST` would change any of ``model``'s weights (a model without
    full 2-D convolutions, or already channels-last, runs the same under both layouts)."""
    return bool(_relaid(model))


@contextmanager
def weight_layout(model: nn.Module, layout: Layout) -> Iterator[None]:
    """``model``'s weights in ``layout`` for the duration. The original tensors are put
    back after, so the model leaves exactly as it came; the block must therefore not
    change the weights (a change would be dropped). The parameters stay the same objects:
    only their ``data`` is swapped, which a TorchScript module's forward sees too."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    originals = [(p, p.data) for p in _relaid(model)] if layout == CHANNELS_LAST else []
    try:
        for parameter, data in originals:
            parameter.data = data.contiguous(memory_format=torch.channels_last)
        yield
    finally:
        for parameter, data in originals:
            parameter.data = data
