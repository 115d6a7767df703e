"""Prunable layers of a model and a probe that reads or masks one layer's output.

A *neuron* is one output feature of an ``nn.Linear`` or one output channel of an
``nn.Conv2d``. Layers are named as in ``model.named_modules()`` (``fc1``,
``layer4.1.conv2``) and resolved the same way for eager ``nn.Module`` models and for
TorchScript archives (scripted or traced), whose submodules report their original class
through ``original_name``.

A Linear layer's *input* features are a site too, named ``<layer>:in`` (``fc:in``):
pruning input feature ``j`` zeroes column ``j`` of the weight. This is how a residual
network is repaired: the classifier's input is where every path, shortcuts included,
converges, while a convolution inside a residual block can be bypassed by its shortcut
(pruning a ResNet's last convolution removed nothing of the backdoor; see
`resolve_layer`).

`LayerProbe` gives the algorithms three operations on a layer's output ``z``:

* ``capture(x)``: ``z`` per sample, reduced to shape ``(N, n)``;
* ``masked_logits(x, keep)``: the logits under many candidate prunings at once, shape
  ``(P, N, K)`` for a keep-mask ``(P, n)``;
* ``logits(x)``: plain inference.

How it reaches ``z`` depends on the model:

``hook``
    eager modules: a forward hook. Masks are applied by *expanding* the layer's output to
    ``P·N`` rows inside the hook, so everything upstream of the layer runs once for all
    ``P`` prunings; models whose downstream code still refers to the original batch (a
    residual branch around the layer) fall back to repeating the input ``P`` times.
``graph``
    TorchScript: Python hooks do not run inside a ScriptModule, so the probe copies the
    inlined TorchScript graph of ``forward``, finds the ``aten::linear`` /
    ``aten::conv2d`` / ``aten::_convolution`` node whose weight is the layer's, and adds
    an output (capture) or a mask input (masking). The model itself is not modified.
    This uses ``torch._C`` graph APIs; when they fail (an unusual graph, the layer
    applied twice, a future torch) the probe falls back to ``weights``.
``weights``
    zero the pruned rows of the weight and bias in place, evaluate, restore: one forward
    pass per candidate pruning, and no activations (scoring then uses an ablation
    estimate; see `modelguard.repair.scoring`).

Inputs are raw samples in ``spec.value_range``; the probe applies the declared
normalisation itself.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from modelguard.errors import InvalidInput
from modelguard.spec import InputSpec

log = logging.getLogger(__name__)

LayerKind = Literal["linear", "conv2d"]
#: Which features of the layer are the neurons: its outputs or (Linear only) its inputs.
Side = Literal["output", "input"]
INPUT_SUFFIX = ":in"
ProbeMode = Literal["hook", "graph", "weights"]
#: Reduces a layer output ``(N, n, *spatial)`` to one value per sample and neuron.
Reducer = Callable[[torch.Tensor], torch.Tensor]

#: a longer list of layer names in an error message is cut in the middle
MAX_LISTED_LAYERS = 24

_LAYER_OPS = ("aten::linear", "aten::conv2d", "aten::_convolution")


@dataclass(frozen=True)
class LayerInfo:
    """A prunable site: ``neurons`` output features (Linear) or channels (Conv2d) of
    the module ``module``, or with ``side="input"`` the input features of a Linear layer
    (then ``name`` is ``module + ":in"``)."""

    name: str
    kind: LayerKind
    neurons: int
    module: str = ""
    side: Side = "output"
    #: why this site was chosen, for the repair's notes (empty: named by the user)
    reason: str = ""

    def __post_init__(self) -> None:
        if not self.module:
            object.__setattr__(self, "module", self.name)

    @property
    def weight_dim(self) -> int:
        """The weight dimension indexed by neuron: 0 (rows, filters) or 1 (columns)."""
        return 1 if self.side == "input" else 0


def is_scripted(model: nn.Module) -> bool:
    """True for TorchScript modules (scripted, traced or loaded with ``torch.jit.load``)."""
    return isinstance(model, torch.jit.ScriptModule)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name`` (``""`` is the model itself); works on
    ScriptModules, which lack ``get_submodule``."""
    try:
        module = functools.reduce(getattr, name.split("."), model) if name else model
    except AttributeError:
        raise InvalidInput(
            f"the model has no layer {name!r}; "
            + layer_choices(name, [info.name for info in list_prunable_layers(model)])
        ) from None
    if not isinstance(module, nn.Module):
        raise InvalidInput(f"{name!r} is not a layer of the model")
    return module


def layer_choices(name: str, names: list[str]) -> str:
    """What to tell a user who named no layer of the model: the names closest to
    ``name`` first, and the list cut short on models with hundreds of layers."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    if len(names) <= MAX_LISTED_LAYERS:
        return hint + "choose one of: " + ", ".join(names)
    half = MAX_LISTED_LAYERS // 2
    shown = ", ".join(names[:half]) + ", …, " + ", ".join(names[-half:])
    return hint + f"the model has {len(names)} prunable layers: {shown}"


def _layer_kind(module: nn.Module) -> LayerKind | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    original = getattr(module, "original_name", None) if is_scripted(module) else None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if original == "Linear" and weight.dim() == 2:
        return "linear"
    if original == "Conv2d" and weight.dim() == 4:
        return "conv2d"
    return None


def list_prunable_layers(model: nn.Module) -> list[LayerInfo]:
    """Every Linear and Conv2d layer (outputs) in registration order, then the inputs of
    every Linear layer (``<name>:in``)."""
    layers, inputs = [], []
    for name, module in model.named_modules():
        kind = _layer_kind(module)
        if kind is not None and name:
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            layers.append(LayerInfo(name, kind, int(weight.shape[0])))
            if kind == "linear":
                inputs.append(
                    LayerInfo(name + INPUT_SUFFIX, kind, int(weight.shape[1]), name, "input")
                )
    return layers + inputs


def forward_order(model: nn.Module, spec: InputSpec) -> list[str]:
    """Names of the prunable layers in the order a forward pass reaches them (hooks for
    eager modules, the inlined graph for TorchScript); registration order when neither
    works."""
    names = [info.name for info in list_prunable_layers(model) if info.side == "output"]
    order: list[str] = []
    try:
        if is_scripted(model):
            graph = _inlined_graph(model)
            for node in _layer_nodes(graph):
                path = _weight_path(node)
                if path is not None and path not in order:
                    order.append(path)
        else:
            handles = []

            def hook_for(layer_name: str) -> Callable[..., None]:
                def hook(_module: nn.Module, _inputs: Any, _output: Any) -> None:
                    if layer_name not in order:
                        order.append(layer_name)

                return hook

            for name in names:
                handles.append(get_module(model, name).register_forward_hook(hook_for(name)))
            try:
                with torch.no_grad():
                    model(normalise(_probe_input(spec), spec))
            finally:
                for handle in handles:
                    handle.remove()
    except Exception as err:  # an unusual model: fall back to registration order
        log.debug("forward order unavailable (%s); using registration order", err)
        return names
    return [name for name in order if name in names] + [n for n in names if n not in order]


def resolve_layer(model: nn.Module, name: str | None, spec: InputSpec) -> LayerInfo:
    """The named site, or by default the first fully-connected layer that is not the
    classifier (the rollback method: the first fully-connected layer). When the only Linear layer
    is the classifier
    (e.g. ResNet's ``fc``), pruning its outputs would delete classes, so the default is
    its *input* features (``fc:in``, the pooled penultimate features). Not the last
    convolution, which Fine-Pruning (Liu et al. 2018) prunes on plain CNNs: in a residual
    block the shortcut bypasses it, and on a residual model pruning ``fc``'s inputs
    removes a patch trigger's effect where pruning the last convolution's channels does
    not."""
    layers = {info.name: info for info in list_prunable_layers(model)}
    if not layers:
        raise InvalidInput("the model has no Linear or Conv2d layer to prune")
    if name:
        if name not in layers:
            raise InvalidInput(
                f"layer {name!r} is not a prunable (Linear or Conv2d) layer of the model; "
                + layer_choices(name, list(layers))
            )
        return layers[name]
    order = forward_order(model, spec)
    linears = [n for n in order if layers[n].kind == "linear"]
    classes = num_outputs(model, spec)
    if linears and layers[linears[-1]].neurons == classes:
        classifier = linears[-1]
        linears = linears[:-1]
    else:
        classifier = ""
    if linears:
        return replace(
            layers[linears[0]],
            reason="the first fully-connected layer that is not the classifier (the "
            "neurons closest to the decision that are not classes themselves)",
        )
    if classifier:
        site = layers[classifier + INPUT_SUFFIX]
        return replace(
            site,
            reason=f"the {site.neurons} input features of the classifier {classifier} (the "
            "pooled penultimate features; the classifier is the only fully-connected "
            "layer and its outputs are the classes)",
        )
    convs = [n for n in order if layers[n].kind == "conv2d"]
    if convs:
        log.info(
            "no hidden fully-connected layer; defaulting to the last convolution %s", convs[-1]
        )
        return replace(
            layers[convs[-1]],
            reason="the channels of the last convolution (the model has no fully-connected layer)",
        )
    raise InvalidInput(
        "the model has no hidden Linear layer and no convolution: name a layer explicitly"
    )


def num_outputs(model: nn.Module, spec: InputSpec) -> int:
    with torch.no_grad():
        out = model(normalise(_probe_input(spec), spec))
    return int(out.shape[-1])


def _probe_input(spec: InputSpec) -> torch.Tensor:
    low, high = spec.value_range
    return torch.full((2, *spec.shape), (low + high) / 2)


def normalise(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """``(x - mean) / std`` as declared by ``spec`` (identity when not normalised)."""
    if not spec.normalised:
        return x
    channels = spec.channels
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device)
    shape = (1, channels, 1, 1)
    return (x - mean.expand(channels).reshape(shape)) / std.expand(channels).reshape(shape)


def spatial_mean(z: torch.Tensor) -> torch.Tensor:
    """``(N, n, *spatial)`` → ``(N, n)``."""
    return z.flatten(2).mean(2) if z.dim() > 2 else z


# --------------------------------------------------------------------------- graphs


def _inlined_graph(model: nn.Module) -> Any:
    graph = model.forward.graph.copy()  # type: ignore[attr-defined]
    torch._C._jit_pass_inline(graph)
    return graph


def _layer_nodes(graph: Any) -> Iterator[Any]:
    def walk(block: Any) -> Iterator[Any]:
        for node in block.nodes():
            for sub in node.blocks():
                yield from walk(sub)
            if node.kind() in _LAYER_OPS:
                yield node

    yield from walk(graph.block())


def _weight_path(node: Any) -> str | None:
    """Dotted module path of the weight a linear/conv node reads, e.g. ``fc1``."""
    value = list(node.inputs())[1]
    names = []
    producer = value.node()
    while producer.kind() == "prim::GetAttr":
        names.append(producer.s("name"))
        value = producer.input()
        producer = value.node()
    if len(names) < 2 or names[0] != "weight":
        return None
    return ".".join(reversed(names[1:]))


def _const_int(graph: Any, value: int) -> Any:
    node = graph.create("prim::Constant")
    node.i_("value", value)
    node.output().setType(torch._C.IntType.get())
    return node


class _GraphProbe:
    """Functions compiled from a copy of a ScriptModule's graph with the layer's output
    exposed (``capture``) or multiplied by a mask input (``masked``, ``expanded``)."""

    def __init__(self, model: nn.Module, layer: str, side: Side = "output") -> None:
        self.model = model
        self.layer = layer
        self.side = side
        graph = _inlined_graph(model)
        nodes = [n for n in _layer_nodes(graph) if _weight_path(n) == layer]
        if len(nodes) != 1:
            raise ValueError(f"layer {layer} appears {len(nodes)} times in the graph")
        if nodes[0].owningBlock() != graph.block():
            raise ValueError(f"layer {layer} is applied inside a control-flow block")
        self._capture: Any = None
        self._masked: Any = None
        self._expanded: Any = None

    def _graph_and_node(self) -> tuple[Any, Any]:
        graph = _inlined_graph(self.model)
        (node,) = [n for n in _layer_nodes(graph) if _weight_path(n) == self.layer]
        return graph, node

    def _site(self, node: Any) -> Any:
        """The value holding the site's features: the node's output or its input."""
        return next(iter(node.inputs())) if self.side == "input" else node.output()

    def _splice(self, graph: Any, node: Any, ops: list[Any]) -> None:
        """Insert ``ops`` (a chain ending in the edited value) where the site's value is
        produced, and route its consumers through the chain's last output: every later
        use for an output site, only the layer itself for an input site."""
        if self.side == "input":
            for op in ops:
                op.insertBefore(node)
            node.replaceInput(0, ops[-1].output())
        else:
            anchor = node
            for op in ops:
                op.insertAfter(anchor)
                anchor = op
            node.output().replaceAllUsesAfterNodeWith(ops[-1], ops[-1].output())

    def capture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._capture is None:
            graph, node = self._graph_and_node()
            out, site = next(iter(graph.outputs())), self._site(node)
            tup = graph.create("prim::TupleConstruct", [out, site])
            graph.appendNode(tup)
            tup.output().setType(torch._C.TupleType([out.type(), site.type()]))
            graph.eraseOutput(0)
            graph.registerOutput(tup.output())
            self._capture = torch._C._create_function_from_graph("mg_capture", graph)
        logits, z = self._capture(self.model._c, x)
        return logits, z

    def masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``z * mask`` with ``mask`` broadcastable to ``z``."""
        if self._masked is None:
            graph, node = self._graph_and_node()
            mask_in = graph.addInput("mg_mask")
            mask_in.setType(torch._C.TensorType.get())
            mul = graph.create("aten::mul", [self._site(node), mask_in])
            self._splice(graph, node, [mul])
            self._masked = torch._C._create_function_from_graph("mg_masked", graph)
        return self._masked(self.model._c, x, mask)  # type: ignore[no-any-return]

    def expanded(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(z.unsqueeze(0) * mask).flatten(0, 1)`` for ``mask`` of shape
        ``(P, 1, n, *ones)``: the rest of the network runs on ``P·N`` rows."""
        if self._expanded is None:
            graph, node = self._graph_and_node()
            mask_in = graph.addInput("mg_mask")
            mask_in.setType(torch._C.TensorType.get())
            zero, one = _const_int(graph, 0), _const_int(graph, 1)
            unsqueeze = graph.create("aten::unsqueeze", [self._site(node), zero.output()])
            mul = graph.create("aten::mul", [unsqueeze.output(), mask_in])
            flat = graph.create("aten::flatten", [mul.output(), zero.output(), one.output()])
            self._splice(graph, node, [zero, one, unsqueeze, mul, flat])
            self._expanded = torch._C._create_function_from_graph("mg_expanded", graph)
        return self._expanded(self.model._c, x, mask)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- probe


class LayerProbe:
    """Reads and masks the output of one layer of ``model`` (see the module docstring).

    ``model`` is the raw model (normalisation not applied); it is never modified except
    transiently in ``weights`` mode, where every change is undone before returning.
    ``max_rows`` bounds the rows of one forward pass (``P·N`` for batched masks).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None,
        spec: InputSpec,
        *,
        max_rows: int = 4096,
        allow_graph: bool = True,
    ) -> None:
        self.model = model
        self.spec = spec
        self.info = resolve_layer(model, layer, spec)
        self.module = get_module(model, self.info.module)
        self.max_rows = max(1, int(max_rows))
        self._graph: _GraphProbe | None = None
        self._expand_ok: bool | None = None
        self._cut: nn.Module | None = None
        self.mode: ProbeMode
        if not is_scripted(model):
            self.mode = "hook"
        else:
            self.mode = "weights"
            if allow_graph:
                try:
                    self._graph = _GraphProbe(model, self.info.module, self.info.side)
                    self._check_graph()
                    self.mode = "graph"
                except Exception as err:
                    self._graph = None
                    log.warning(
                        "TorchScript graph probe unavailable for %s (%s): falling back to "
                        "weight masking, one forward pass per candidate pruning",
                        self.info.name,
                        err,
                    )
        #: number of forward passes run through the model (for cost reports).
        self.forward_passes = 0

    @property
    def neurons(self) -> int:
        return self.info.neurons

    @property
    def batched(self) -> bool:
        """Whether many prunings are evaluated in one forward pass."""
        return self.mode != "weights"

    @property
    def can_capture(self) -> bool:
        return self.mode != "weights"

    def _check_graph(self) -> None:
        assert self._graph is not None
        x = normalise(_probe_input(self.spec), self.spec)
        with torch.no_grad(), evaluating(self.model):
            reference = self.model(x)
            logits, z = self._graph.capture(x)
        if not torch.allclose(logits, reference, atol=1e-4, rtol=1e-4):
            raise ValueError("graph copy does not reproduce the model's output")
        if z.dim() < 2 or z.shape[1] != self.info.neurons:
            raise ValueError(f"layer output has shape {list(z.shape)}")

    # -- plain inference

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with evaluating(self.model):
            return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(x), self.max_rows):
            out.append(self.model(normalise(x[start : start + self.max_rows], self.spec)))
            self.forward_passes += 1
        return torch.cat(out) if out else torch.empty(0)

    # -- activations

    @torch.no_grad()
    def capture(
        self, x: torch.Tensor, reduce: Reducer = spatial_mean
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(N, K)`` and ``reduce(z)`` ``(N, n)`` of the layer output ``z``."""
        if not self.can_capture:
            raise RuntimeError("activations are not observable in weight-masking mode")
        with evaluating(self.model):
            return self._capture(x, reduce)

    def _capture(self, x: torch.Tensor, reduce: Reducer) -> tuple[torch.Tensor, torch.Tensor]:
        all_logits, all_z = [], []
        seen: list[torch.Tensor] = []

        def hook(_m: nn.Module, inputs: Any, output: torch.Tensor | None = None) -> None:
            seen.append((inputs[0] if output is None else output).detach())

        for start in range(0, len(x), self.max_rows):
            batch = normalise(x[start : start + self.max_rows], self.spec)
            self.forward_passes += 1
            if self.mode == "graph":
                assert self._graph is not None
                logits, z = self._graph.capture(batch)
            else:
                seen.clear()
                handle = (
                    self.module.register_forward_pre_hook(hook)
                    if self.info.side == "input"
                    else self.module.register_forward_hook(hook)
                )
                try:
                    logits = self.model(batch)
                finally:
                    handle.remove()
                if len(seen) != 1:
                    raise InvalidInput(
                        f"layer {self.info.name} runs {len(seen)} times per forward pass; "
                        "choose a layer applied once"
                    )
                z = seen[0]
            all_logits.append(logits)
            all_z.append(reduce(z))
        return torch.cat(all_logits), torch.cat(all_z)

    # -- masked evaluation

    @torch.no_grad()
    def masked_logits(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Logits ``(P, N, K)`` of the model with the layer's output multiplied by each
        row of ``keep`` ``(P, n)`` (1 keeps a neuron, 0 prunes it)."""
        keep = keep.to(torch.float32)
        if keep.dim() != 2 or keep.shape[1] != self.info.neurons:
            raise ValueError(f"keep must be (P, {self.info.neurons}); got {list(keep.shape)}")
        with evaluating(self.model):
            return self._masked_logits(x, keep)

    def _masked_logits(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        count, n_samples = keep.shape[0], len(x)
        if count == 0 or n_samples == 0:
            return torch.empty(count, n_samples, 0)
        if self.mode == "graph":
            try:
                return self._batched(x, keep)
            except Exception as err:  # a graph the rewrite does not handle: degrade
                log.warning(
                    "batched masks failed on the TorchScript graph of %s (%s): falling back "
                    "to weight masking",
                    self.info.name,
                    err,
                )
                self.mode = "weights"
        if self.mode == "weights":
            return torch.stack([self._weight_masked(x, row) for row in keep])
        return self._batched(x, keep)

    def _batched(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        count, n_samples = keep.shape[0], len(x)
        if self._expand_ok is None:
            self._expand_ok = self._check_expand(x[:2])
        x_norm = normalise(x, self.spec)
        # chunk over samples so that one chunk of P masks fits in max_rows
        sample_chunk = max(1, min(n_samples, self.max_rows))
        mask_chunk = max(1, self.max_rows // sample_chunk)
        parts = []
        for s0 in range(0, n_samples, sample_chunk):
            xs = x_norm[s0 : s0 + sample_chunk]
            rows = []
            for p0 in range(0, count, mask_chunk):
                ks = keep[p0 : p0 + mask_chunk]
                rows.append(self._run_masked(xs, ks, expand=bool(self._expand_ok)))
            parts.append(torch.cat(rows, 0))
        return torch.cat(parts, 1)

    def _mask_shape(self, count: int) -> tuple[int, ...]:
        extra = (1, 1) if self.info.kind == "conv2d" else ()
        return (count, self.info.neurons, *extra)

    def _run_masked(self, x: torch.Tensor, keep: torch.Tensor, *, expand: bool) -> torch.Tensor:
        count, n_samples = keep.shape[0], x.shape[0]
        self.forward_passes += 1
        if expand and self._cut is None:
            mask = keep.view(count, 1, *self._mask_shape(1)[1:])
            if self.mode == "graph":
                assert self._graph is not None
                out = self._graph.expanded(x, mask)
            else:
                out = self._hooked(
                    x, {self.module: lambda z: (z.unsqueeze(0) * mask).flatten(0, 1)}
                )
        else:
            mask = keep.repeat_interleave(n_samples, 0).view(self._mask_shape(count * n_samples))
            if expand and self._cut is not None:
                # repeat the batch at an upstream module: what precedes it runs once
                out = self._hooked(
                    x,
                    {
                        self._cut: lambda h: h.repeat(count, *([1] * (h.dim() - 1))),
                        self.module: lambda z: z * mask,
                    },
                )
            elif self.mode == "graph":
                assert self._graph is not None
                repeated = x.repeat(count, *([1] * (x.dim() - 1)))
                out = self._graph.masked(repeated, mask)
            else:
                repeated = x.repeat(count, *([1] * (x.dim() - 1)))
                out = self._hooked(repeated, {self.module: lambda z: z * mask})
        return out.view(count, n_samples, -1)

    def _hooked(
        self, x: torch.Tensor, edits: dict[nn.Module, Callable[[torch.Tensor], torch.Tensor]]
    ) -> torch.Tensor:
        calls = dict.fromkeys(edits, 0)

        def hook_for(module: nn.Module) -> Callable[..., torch.Tensor]:
            edit = edits[module]

            def hook(_m: nn.Module, _i: Any, output: torch.Tensor) -> torch.Tensor:
                calls[module] += 1
                return edit(output)

            return hook

        def pre_hook_for(module: nn.Module) -> Callable[..., tuple[Any, ...]]:
            edit = edits[module]

            def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
                calls[module] += 1
                return (edit(inputs[0]), *inputs[1:])

            return hook

        handles = [
            module.register_forward_pre_hook(pre_hook_for(module))
            if module is self.module and self.info.side == "input"
            else module.register_forward_hook(hook_for(module))
            for module in edits
        ]
        try:
            out = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        if any(count != 1 for count in calls.values()):
            raise InvalidInput(
                f"layer {self.info.name} runs {calls[self.module]} times per forward pass; "
                "choose a layer applied once"
            )
        return out  # type: ignore[no-any-return]

    def _check_expand(self, x: torch.Tensor) -> bool:
        """Whether a batch of masks can share the computation upstream of the layer, and
        where: expanding the batch at the layer's output, else (eager models) repeating it
        at the latest upstream module after which the network is a chain (e.g. the block
        before a residual block). Each candidate is checked against repeating the input."""
        generator = torch.Generator().manual_seed(0)
        keep = (torch.rand(2, self.info.neurons, generator=generator) > 0.5).float()
        x = normalise(x, self.spec)
        slow = self._run_masked(x, keep, expand=False)
        candidates: list[nn.Module | None] = [None]
        if self.mode == "hook":
            candidates += self._upstream_modules(x)[:8]
        for cut in candidates:
            self._cut = cut
            try:
                fast = self._run_masked(x, keep, expand=True)
            except Exception as err:
                log.debug("batched masks at %s unavailable: %s", cut, err)
                continue
            if fast.shape == slow.shape and torch.allclose(fast, slow, atol=1e-4, rtol=1e-4):
                return True
        self._cut = None
        log.debug("no shared upstream computation for %s; repeating inputs", self.info.name)
        return False

    def _upstream_modules(self, x: torch.Tensor) -> list[nn.Module]:
        """Modules that finish, once, before the layer starts: latest first."""
        finished: list[nn.Module] = []
        calls: dict[int, int] = {}
        started = [False]

        def pre(_m: nn.Module, _i: Any) -> None:
            started[0] = True

        def post_for(module: nn.Module) -> Callable[..., None]:
            def post(_m: nn.Module, _i: Any, output: Any) -> None:
                calls[id(module)] = calls.get(id(module), 0) + 1
                if not started[0] and isinstance(output, torch.Tensor):
                    finished.append(module)

            return post

        handles = [self.module.register_forward_pre_hook(pre)]
        for _name, module in self.model.named_modules():
            if module is not self.model and module is not self.module:
                handles.append(module.register_forward_hook(post_for(module)))
        try:
            self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return [m for m in reversed(finished) if calls.get(id(m)) == 1]

    def _weight_masked(self, x: torch.Tensor, keep_row: torch.Tensor) -> torch.Tensor:
        pruned = torch.nonzero(keep_row < 0.5).flatten().tolist()
        with zeroed(self.module, pruned, self.info.side):
            return self._logits(x)


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """``requires_grad`` off on every parameter for the duration, each restored after: an
    optimisation of the *input* (a trigger) then computes no weight gradients."""
    needed_grad = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in needed_grad:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, requires_grad in needed_grad:
            parameter.requires_grad_(requires_grad)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (dropout off, batch-norm running statistics)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def zeroed(module: nn.Module, indices: list[int], side: Side = "output") -> Iterator[None]:
    """Temporarily zero the weight rows / output channels ``indices`` and their bias, or
    with ``side="input"`` the weight columns (input features; the bias is untouched)."""
    weight = module.weight
    bias = getattr(module, "bias", None) if side == "output" else None
    assert isinstance(weight, torch.Tensor)
    dim = 1 if side == "input" else 0
    index = torch.as_tensor(indices, dtype=torch.long)
    saved_w = weight.data.index_select(dim, index)
    saved_b = bias.data[index].clone() if isinstance(bias, torch.Tensor) else None
    try:
        with torch.no_grad():
            weight.data.index_fill_(dim, index, 0)
            if isinstance(bias, torch.Tensor):
                bias.data[index] = 0
        yield
    finally:
        with torch.no_grad():
            weight.data.index_copy_(dim, index, saved_w)
            if isinstance(bias, torch.Tensor) and saved_b is not None:
                bias.data[index] = saved_b
