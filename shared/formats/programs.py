"""What the graph formats (torch.export programs, ONNX models) share: a graph converted to
torch behind the usual module surface (`ProgramModule`).

The audit stages hook layers by name, prune their weights in place and run batches of any
size; a graph traced for a fixed batch size may refuse other sizes. So the converted graph's
layers become the wrapper's own children (same names, same parameters), and a program
traced for batches of exactly B either runs other sizes as they are, when a check at load
shows that gives the same outputs (most graphs: convolutions, ``flatten(x, 1)``), or runs
them as zero-padded chunks of B (a graph with B baked into a reshape). Chunking keeps
detection, gradients and the leak scan working; a layer probe then sees one call per
chunk, so repairing such a model needs batches of B or a re-export with a dynamic batch.
"""

from __future__ import annotations

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
        out = self.program(x)
        if isinstance(out, (tuple, list)) and len(out) == 1:
            out = out[0]  # a graph's single output often comes back as a 1-tuple
        return out  # type: ignore[no-any-return]

    def example(self, batch: int | None = None) -> torch.Tensor:
        """An input to trace the program with (the export in ``save``)."""
        return torch.zeros(batch or self.example_batch, *self.input_shape)


def fit_batch(program: nn.Module, input_shape: tuple[int, ...], batch: int | None) -> ProgramModule:
    """``program`` wrapped for inputs of any batch size: ``batch`` is the batch size the
    graph was traced for (None: any). A fixed-batch graph that gives the same outputs on
    another batch size runs as it is; otherwise it runs in chunks of ``batch``."""
    if batch is None:
        return ProgramModule(program, input_shape)
    chunked = ProgramModule(program, input_shape, example_batch=batch, chunk=batch)
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(batch + 1, *input_shape, generator=generator)
    with torch.no_grad():
        reference = chunked(probe)
        try:
            direct = chunked._run(probe)
        except Exception:  # a reshape with the batch size baked in, typically
            return chunked
    if (
        isinstance(direct, torch.Tensor)
        and direct.shape == reference.shape
        and torch.allclose(direct, reference, rtol=1e-4, atol=1e-5)
    ):
        return ProgramModule(program, input_shape, example_batch=batch)
    return chunked
