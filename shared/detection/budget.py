"""What a reversal may spend: memory and time, and how a model's cost per image is measured.

A trigger step pushes ``labels × images`` stamped images through the model and back.
Activation memory grows with that product (a 224² EfficientNet keeps about a hundred
megabytes per image for the backward pass), so the number of images in one forward pass
is derived from the memory budget and the model's own measured cost, never fixed. The
cost is measured once per reversal on a single image:

* ``bytes_per_image`` — the tensors autograd saves for the backward pass (counted with
  `torch.autograd.graph.saved_tensors_hooks`, exact and independent of the allocator),
  times ``TRANSIENT_FACTOR`` for the buffers a pass allocates besides them;
* ``seconds_per_image`` — the wall time of one forward and backward pass of a small batch;
* ``largest_bytes_per_image`` — the largest single saved tensor, which bounds how many
  images a pass may hold before its tensors stop fitting in reused memory (below).

The time figure feeds the plan (is a full screening of every label affordable?) and the
progress messages' estimate of the time left. The same timing can veto the channels-last
layout of the convolution weights a reversal runs with (`faster_layout`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from modelguard.errors import InvalidInput
from modelguard.nn.layout import (
    AS_LOADED,
    CHANNELS_LAST,
    LAYOUTS,
    Layout,
    layout_matters,
    weight_layout,
)

log = logging.getLogger(__name__)

#: Buffers a pass allocates besides the saved activations (gradients of the activations,
#: the convolution workspaces), as a multiple of the saved bytes.
TRANSIENT_FACTOR = 2.0
#: Largest block glibc's malloc serves from memory it reuses. A larger tensor gets fresh
#: pages from the kernel (mmap) that are zeroed on first touch and returned when freed, so
#: a pass whose activations are larger pays a page fault per 4 kB on every pass: with a
#: 224² model and a few dozen images a pass that costs more than the arithmetic. Passes
#: are sized to keep the largest activation below this (glibc's largest dynamic mmap
#: threshold on 64-bit systems; other allocators merely get smaller passes).
REUSED_BLOCK_BYTES = 32 << 20
#: Smallest input (height × width) that runs channels-last (see `faster_layout`);
#: smaller inputs keep the model's own layout.
CHANNELS_LAST_MIN_PIXELS = 64 * 64
#: Images of each timed pass of `faster_layout`: a few, so that per-pass costs (a weight
#: reordered) weigh as little as in a reversal's passes of several images.
LAYOUT_PROBE_IMAGES = 4
#: How much slower a pass with channels-last weights must be measured for
#: `faster_layout` to keep the weights as loaded (a near tie keeps channels-last).
LAYOUT_TOLERANCE = 0.10
#: Memory a reversal keeps outside the model's passes: the interpreter, torch, the model,
#: the clean images and the triggers' optimiser state (counted separately).
BASELINE_BYTES = 1 << 30


@dataclass(frozen=True)
class PassCost:
    """The measured cost of one image through the model and back."""

    bytes_per_image: int
    seconds_per_image: float
    largest_bytes_per_image: int = 0

    def images_within(self, memory_bytes: int) -> int:
        """How many images one pass may hold within ``memory_bytes`` (at least 1)."""
        return max(1, int(memory_bytes // max(1, self.bytes_per_image)))

    def images_per_pass(self, memory_bytes: int) -> int:
        """Images one pass should hold: within ``memory_bytes``, and no more than keep its
        largest activation in reused memory (`REUSED_BLOCK_BYTES`; at least 1)."""
        reused = max(1, REUSED_BLOCK_BYTES // max(1, self.largest_bytes_per_image))
        return min(self.images_within(memory_bytes), reused)


def measure_pass_cost(
    model: nn.Module, example: torch.Tensor, repeats: int = 2, images: int = 2
) -> PassCost:
    """Measure ``model``'s activation memory and time per image on ``example`` ``(N, C, H,
    W)`` (its first ``images`` images). The model's parameters get no gradient."""
    x = example[:images].detach().float().clone().requires_grad_(True)
    saved = largest = 0
    # weights saved for the backward pass are not activations: they do not grow with
    # the images in a pass
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved, largest
        size = tensor.numel() * tensor.element_size()
        saved += size
        if tensor.untyped_storage().data_ptr() not in weights:
            largest = max(largest, size)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    (grad,) = torch.autograd.grad(out.float().logsumexp(1).sum(), [x])
    del grad
    images = int(x.shape[0])
    best = math.inf
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        out = model(x)
        torch.autograd.grad(out.float().logsumexp(1).sum(), [x])
        best = min(best, time.perf_counter() - started)
    per_image = int(saved * TRANSIENT_FACTOR / images) + x[0].numel() * x.element_size() * 4
    return PassCost(
        bytes_per_image=per_image,
        seconds_per_image=best / images,
        largest_bytes_per_image=max(1, largest // images),
    )


def faster_layout(model: nn.Module, example: torch.Tensor, rounds: int = 3) -> Layout:
    """The weight layout (`modelguard.nn.layout`) a reversal of ``model`` runs with:
    channels-last, unless a forward and backward pass on up to `LAYOUT_PROBE_IMAGES` of
    ``example`` is measured `LAYOUT_TOLERANCE` slower with channels-last weights. Passes in
    either layout are timed alternately (the order swapped every round), ``rounds`` each,
    and the best of each compared. Channels-last is the default because it is faster on
    the convolutional networks measured (EfficientNet-Lite0–2, `bench.bench_pass_layout`;
    by hand, the three model formats and a ResNet-18), and a probe of a few images is too
    noisy to choose between near-equal layouts: a near tie must not make the run's
    layout, hence its floats, vary from run to run; the timing only catches a model on
    which channels-last is clearly slower. The model keeps its own layout unmeasured when
    the layout would change none of its weights, or when its inputs are under
    `CHANNELS_LAST_MIN_PIXELS` (its passes cost milliseconds); and, with a warning,
    when a pass fails channels-last (code that reshapes a weight with ``view``)."""
    if not layout_matters(model) or example[0, 0].numel() < CHANNELS_LAST_MIN_PIXELS:
        return AS_LOADED
    images = example[:LAYOUT_PROBE_IMAGES]
    best: dict[Layout, float] = {AS_LOADED: math.inf, CHANNELS_LAST: math.inf}
    for round_ in range(max(1, rounds)):
        order = LAYOUTS if round_ % 2 == 0 else LAYOUTS[::-1]
        for layout in order:
            try:
                with weight_layout(model, layout):
                    cost = measure_pass_cost(model, images, repeats=1, images=len(images))
            except Exception as err:  # any failure: the model's own layout
                if layout == AS_LOADED:
                    raise
                log.warning("the model fails with channels-last weights (%s): kept as loaded", err)
                return AS_LOADED
            best[layout] = min(best[layout], cost.seconds_per_image)
    slower = best[AS_LOADED] * (1 + LAYOUT_TOLERANCE) < best[CHANNELS_LAST]
    return AS_LOADED if slower else CHANNELS_LAST


def trigger_state_bytes(shape: tuple[int, int, int]) -> int:
    """Memory one label's optimisation state holds: mask and pattern parameters, their Adam
    moments, the best and the last step's trigger (float32), about 20 planes of ``H × W``
    for three channels."""
    channels, height, width = shape
    return 4 * height * width * (5 * (channels + 1))


def pass_memory(memory_budget_mb: int, labels_held: int, shape: tuple[int, int, int]) -> int:
    """Bytes left for one pass's activations once the baseline and the state of
    ``labels_held`` labels are set aside; ``InvalidInput`` if nothing is left."""
    total = memory_budget_mb << 20
    left = total - BASELINE_BYTES - labels_held * trigger_state_bytes(shape)
    if left <= 0:
        raise InvalidInput(
            f"a memory budget of {memory_budget_mb} MB cannot hold the optimisation state of "
            f"{labels_held} labels at input shape {list(shape)}: raise the budget"
        )
    return left
