"""Memory layout of a model's convolution weights.

oneDNN, which runs torch's CPU convolutions, is faster on many convolutional networks when
the weights are channels-last (NHWC): the activations then stay channels-last through the
network and the depthwise and pointwise convolutions of mobile architectures read memory
in order. Whether it is faster for a given model is measured, not assumed (see
`modelguard.detection.budget.faster_layout`). The layout changes only the strides of the
weights, never their values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

CONTIGUOUS = "contiguous"
CHANNELS_LAST = "channels_last"
LAYOUTS = {CONTIGUOUS: torch.contiguous_format, CHANNELS_LAST: torch.channels_last}


def has_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` has a 4-D weight (a 2-D convolution), the only kind the layout
    changes."""
    return any(parameter.dim() == 4 for parameter in model.parameters())


@contextmanager
def weight_layout(model: nn.Module, layout: str) -> Iterator[None]:
    """Every 4-D parameter of ``model`` in ``layout`` (a name of `LAYOUTS`) for the
    duration; the original tensors are put back after, so the model leaves exactly as it
    came (a repaired model saved later keeps its own layout). The parameters stay the same
    objects: only their ``data`` is swapped."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    originals = [(p, p.data) for p in model.parameters() if p.dim() == 4]
    try:
        for parameter, data in originals:
            parameter.data = data.contiguous(memory_format=LAYOUTS[layout])
        yield
    finally:
        for parameter, data in originals:
            parameter.data = data
