"""What the graph formats (torch.export programs, ONNX models) share: a graph converted to
torch behind the usual module surface (`ProgramModule`).

The audit stages hook layers by name, prune their weights in place and run batches of any
size; a graph traced for a fixed batch size may refuse other sizes. So the converted graph's
layers become the wrapper's own children (same names, same parameters), and a program
traced for batches of exactly B runs other sizes as it is when a check at load shows that
gives the same outputs (most graphs: convolutions, ``flatten(x, 1)``), or as a copy whose
reshapes take the batch size from their input instead of the constant B (the usual
``x.view(x.size(0), -1)``, which a trace records as ``view(x, [B, n])``) when that passes
the same check, or else as zero-padded chunks of B. Chunking keeps detection, gradients
and the leak scan working, but a layer probe then sees one call per chunk: repairing such
a model needs a re-export with a dynamic batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ProgramModule(nn.Module):
    """``program`` (a converted graph: an ``fx.GraphModule``, or any module) for inputs of
    shape ``(N, *input_shape)``. ``example_batch``: the batch size the graph was traced
    with (what `save` exports a fixed-batch graph with); ``chunk``: set when the graph only
    runs batches of that size, then other sizes run in zero-padded chunks."""

    program: nn.Module

    def __init__(
        self,
        program: nn.Module,
        input_shape: tuple[int, ...],
        example_batch: int = 2,
        chunk: int | None = None,
    ) -> None:
        super().__init__()
        # The program is not a child: its children, parameters and buffers are ours, so
        # layers keep their names ("fc1", not "program.fc1") and share their tensors.
        object.__setattr__(self, "program", program)
        for name, child in program.named_children():
            self.add_module(name, child)
        for name, parameter in program._parameters.items():
            if parameter is not None:
                self.register_parameter(name, parameter)
        for name, buffer in program._buffers.items():
            if buffer is not None:
                persistent = name not in program._non_persistent_buffers_set
                self.register_buffer(name, buffer, persistent=persistent)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.example_batch = int(example_batch)
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk is None or x.shape[0] == self.chunk:
            return self._run(x)
        size = self.chunk
        outputs = []
        for start in range(0, x.shape[0], size):
            part = x[start : start + size]
            missing = size - part.shape[0]
            if missing:
                part = torch.cat([part, part.new_zeros(missing, *part.shape[1:])])
            outputs.append(self._run(part)[: size - missing])
        return torch.cat(outputs)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return _call(self.program, x)

    def example(self, batch: int | None = None) -> torch.Tensor:
        """An input to trace the program with (the export in ``save``)."""
        return torch.zeros(batch or self.example_batch, *self.input_shape)


def fit_batch(
    program: nn.Module,
    input_shape: tuple[int, ...],
    batch: int | None,
    relaxed: Callable[[], nn.Module | None] | None = None,
) -> ProgramModule:
    """``program`` wrapped for inputs of any batch size: ``batch`` is the batch size the
    graph was traced for (None: any). A fixed-batch graph runs other sizes as it is when
    that gives the same outputs as chunks of ``batch``; else what ``relaxed`` makes does
    (a copy of the graph whose reshapes take the batch size from their input instead of
    the traced one, or None) when it gives the same outputs on both sizes; else the graph
    runs in chunks."""
    if batch is None:
        return ProgramModule(program, input_shape)
    chunked = ProgramModule(program, input_shape, example_batch=batch, chunk=batch)
    generator = torch.Generator().manual_seed(0)
    traced = torch.rand(batch, *input_shape, generator=generator)
    other = torch.rand(batch + 1, *input_shape, generator=generator)
    try:
        with torch.no_grad():
            expected = [(traced, chunked(traced)), (other, chunked(other))]
    except Exception:  # it does not run: the loader's input check says why
        return chunked
    if all(_same(program, x, y) for x, y in expected):
        return ProgramModule(program, input_shape, example_batch=batch)
    candidate = relaxed() if relaxed is not None else None
    if candidate is not None and all(_same(candidate, x, y) for x, y in expected):
        return ProgramModule(candidate, input_shape, example_batch=batch)
    return chunked


def _same(program: nn.Module, x: torch.Tensor, expected: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            out = _call(program, x)
    except Exception:  # a reshape with the batch size baked in, typically
        return False
    return (
        isinstance(out, torch.Tensor)
        and out.shape == expected.shape
        and torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
    )


def _call(program: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = program(x)
    if isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]  # a graph's single output often comes back as a 1-tuple
    return out  # type: ignore[no-any-return]
