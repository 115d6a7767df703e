"""ONNX models (``.onnx``): a protobuf graph of standard operators, converted to torch with
onnx2torch for the gradient-based stages (its Conv and Gemm nodes become ``nn.Conv2d`` and
``nn.Linear`` layers, which probes and pruning find by node name).

Loading an ONNX model runs no code, but a tensor can keep its data in another file named
by a path (``data_location: EXTERNAL``): the scan refuses every such reference (a
submitted model is one file, and a path outside it would read the server's disk), and
tensors whose declared size disagrees with their bytes or is absurd. ``load`` names every
operator onnx2torch cannot convert. ``save`` exports with ``torch.onnx.export`` (see
`_export` for which exporter), with a dynamic batch dimension when the graph allows it.

onnx2torch is installed without its dependencies (``scripts/setup.sh``): it would pull a
torchvision that cannot be imported beside our torch. Only its NonMaxSuppression and
RoiAlign converters use torchvision, so it is imported against a stand-in (`_onnx2torch`)
and those two operators are refused as unsupported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import posixpath
import sys
import threading
import types
import warnings
from collections.abc import Iterator, Sized
from typing import TYPE_CHECKING, Any, ClassVar

from modelguard.errors import InvalidInput, ModelGuardError, UnsafeArtifact
from modelguard.formats.base import ScanResult, first_line

if TYPE_CHECKING:
    import onnx
    from torch import nn

    from modelguard.spec import InputSpec

#: The pin of scripts/setup.sh and the Dockerfile (installed without its dependencies).
ONNX2TORCH_VERSION = "1.5.15"
#: The highest default-domain opset onnx2torch 1.5 converts: newer models are converted
#: down to it (``onnx.version_converter``) when they use newer operator versions.
CONVERTIBLE_OPSET = 17
#: The opset ``save`` writes (the dynamo exporter's lowest native one, for both exporters).
EXPORT_OPSET = 18
MAX_TENSOR_ELEMENTS = 1 << 31
MAX_OPSET = 1000
#: Operators whose onnx2torch converters need torchvision, which is not installed.
TORCHVISION_OPERATORS = frozenset({"NonMaxSuppression", "RoiAlign"})
#: Operator versions newer than onnx2torch's whose only change is new element types
#: (float8 in opset 19, 4-bit integers in 21, …): each is converted as the version before
#: it (the versions in ascending order: a 21 resolves to the 19 or 20 registered before
#: it), which computes the same on the types torch has. torch's exporter writes opset 20
#: by default, so a model converts without the opset down-conversion where it can.
SAME_AS_BEFORE: dict[str, tuple[int, ...]] = {
    "Cast": (19, 21),
    "Constant": (19, 21),
    "ConstantOfShape": (20, 21),
    "Equal": (19,),
    "Flatten": (21,),
    "Identity": (19, 21),
    "IsInf": (20,),
    "IsNaN": (20,),
    "Reshape": (19, 21),
    "Shape": (19, 21),
    "Transpose": (21,),
    "Unsqueeze": (21,),
}
#: What GELU is made of, for the opset down-conversion (Gelu exists from opset 20 only).
GELU_CONSTANTS = {
    "half": 0.5,
    "one": 1.0,
    "inverse_sqrt2": 1 / math.sqrt(2),
    "tanh_scale": math.sqrt(2 / math.pi),
    "cubic": 0.044715,
}
_IMPORTING = threading.RLock()
_registered = False

#: Fields of ModelProto: number -> wire type (0 varint, 2 length-delimited).
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
#: Bits per element of each TensorProto data type (STRING has no fixed size).
_ELEMENT_BITS = {
    1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64,
    14: 64, 15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8,
    25: 2, 26: 2, 27: 6, 28: 6,
}  # fmt: skip


class Onnx:
    name: ClassVar[str] = "onnx"
    label: ClassVar[str] = "ONNX"
    media_type: ClassVar[str] = "application/vnd.modelguard.onnx"
    extension: ClassVar[str] = ".onnx"
    needs_arch: ClassVar[bool] = False

    def sniff(self, data: bytes) -> bool:
        return _model_fields(data) is not None

    def scan(self, data: bytes) -> ScanResult:
        fields = _model_fields(data)
        if fields is None or not fields[1]:
            raise InvalidInput("ONNX model is truncated (its last field runs past the end)")
        model = _parse(data)
        if model.ir_version < 3:
            raise InvalidInput(f"ONNX IR version {model.ir_version} is too old (3 or later)")
        if not model.graph.node:
            raise InvalidInput("the ONNX model has no graph")
        for opset in model.opset_import:
            if not 1 <= opset.version <= MAX_OPSET:
                raise InvalidInput(
                    f"the ONNX model imports opset {opset.version} of {opset.domain or 'ai.onnx'}"
                )
        tensors = 0
        for where, tensor in _tensors(model):
            _check_tensor(where, tensor)
            tensors += 1
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
        return ScanResult(
            self.name,
            [
                f"ONNX IR {model.ir_version}, opsets {opsets or 'none'}",
                f"{len(model.graph.node)} nodes; {tensors} tensors, all inside the file",
            ],
        )

    def load(self, data: bytes, spec: InputSpec, arch: str) -> nn.Module:
        # the file is the whole model: arch is not needed
        model = _parse(data)
        try:
            return _module(model, spec)
        except ModelGuardError:
            raise
        except Exception as err:  # a defect the checks did not foresee
            raise InvalidInput(f"the ONNX model could not be loaded: {first_line(err)}") from err

    def load_weights(self, data: bytes) -> nn.Module:
        import torch
        from onnx import numpy_helper

        from modelguard.formats.weights import module_from_state_dict

        state: dict[str, torch.Tensor] = {}
        for tensor in _parse(data).graph.initializer:
            try:
                state[tensor.name] = torch.from_numpy(numpy_helper.to_array(tensor).copy())
            except (TypeError, ValueError):
                continue  # a data type torch has no dtype for (the leak scan reads floats)
        return module_from_state_dict(state)

    def save(self, module: nn.Module) -> bytes:
        from modelguard.formats.programs import ProgramModule

        if not isinstance(module, ProgramModule):
            raise InvalidInput(
                "only a model loaded from an ONNX file (or wrapped in ProgramModule with its "
                "input shape) can be exported as ONNX"
            )
        return _export(module).SerializeToString()


# --------------------------------------------------------------------------------------
# Sniff and scan
# --------------------------------------------------------------------------------------


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]  # IndexError at the end: truncated
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _model_fields(data: bytes) -> tuple[set[int], bool] | None:
    """The ModelProto fields at the top level of ``data`` and whether the last one ends
    with the file (False: truncated), or None when ``data`` is not a ModelProto: it must
    start with ``ir_version`` (every writer orders fields by number) and hold only
    ModelProto's fields with their wire types, and a complete file holds a graph. Reads
    tags and lengths only, never a payload."""
    if data[:1] != b"\x08":
        return None
    fields: set[int] = set()
    position = 0
    try:
        while position < len(data):
            tag, position = _varint(data, position)
            number, wire = tag >> 3, tag & 7
            if _MODEL_FIELDS.get(number) != wire:
                return None
            value, position = _varint(data, position)
            if number == 1 and not 1 <= value <= 64:
                return None
            if wire == 2:
                position += value
            fields.add(number)
    except IndexError:
        return fields, False
    except ValueError:
        return None
    if position > len(data):
        return fields, False
    return (fields, True) if 7 in fields else None


def _parse(data: bytes) -> onnx.ModelProto:
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise InvalidInput(f"ONNX model is truncated or corrupt ({first_line(err)})") from err
    return model


def _graphs(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, onnx.GraphProto]]:
    """``graph`` and every subgraph of its nodes' attributes (If, Loop, Scan bodies)."""
    yield where, graph
    for node in graph.node:
        for attribute in node.attribute:
            inner = [attribute.g] if attribute.HasField("g") else []
            for index, sub in enumerate([*inner, *attribute.graphs]):
                yield from _graphs(
                    sub, f"{where} > {node.op_type} {node.name!r}.{attribute.name}[{index}]"
                )


def _tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor the model holds: initializers, sparse initializers and attribute
    tensors of the graph, its subgraphs, its functions and its training graphs."""
    graphs = [("graph", model.graph)]
    for info in model.training_info:
        graphs += [("training initialization", info.initialization)]
        graphs += [("training algorithm", info.algorithm)]
    nodes: list[tuple[str, onnx.NodeProto]] = []
    for top, graph in graphs:
        for where, sub in _graphs(graph, top):
            for tensor in sub.initializer:
                yield f"{where} initializer {tensor.name!r}", tensor
            for sparse in sub.sparse_initializer:
                yield f"{where} sparse initializer {sparse.values.name!r}", sparse.values
                yield f"{where} sparse initializer {sparse.values.name!r} indices", sparse.indices
            nodes += [(where, node) for node in sub.node]
    for function in model.functions:
        nodes += [(f"function {function.name!r}", node) for node in function.node]
    for where, node in nodes:
        for attribute in node.attribute:
            named = f"{where} {node.op_type} {node.name!r} attribute {attribute.name!r}"
            if attribute.HasField("t"):
                yield named, attribute.t
            for tensor in attribute.tensors:
                yield named, tensor
            sparse_tensors = (
                [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
            )
            for sparse in [*sparse_tensors, *attribute.sparse_tensors]:
                yield named, sparse.values
                yield named, sparse.indices


def _check_tensor(where: str, tensor: onnx.TensorProto) -> None:
    import onnx

    if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        normal = posixpath.normpath(location.replace("\\", "/"))
        if location.startswith(("/", "\\")) or normal.startswith("..") or ":" in location:
            raise UnsafeArtifact(
                f"{where} reads its data from {location!r}, outside the model's folder "
                "(path traversal); refused"
            )
        raise UnsafeArtifact(
            f"{where} keeps its data in another file ({location!r}); a model is submitted as "
            "one file: save it with onnx.save(model, path, save_as_external_data=False)"
        )
    if any(d < 0 for d in tensor.dims):
        raise InvalidInput(f"{where} has negative dimensions {list(tensor.dims)}")
    elements = 1
    for d in tensor.dims:
        elements *= d
    if elements > MAX_TENSOR_ELEMENTS:
        raise InvalidInput(f"{where} declares {elements} elements; refused")
    bits = _ELEMENT_BITS.get(tensor.data_type)
    if tensor.HasField("raw_data") and bits is not None:
        expected = (elements * bits + 7) // 8
        if len(tensor.raw_data) != expected:
            raise InvalidInput(
                f"{where} declares dims {list(tensor.dims)} ({expected} bytes) but holds "
                f"{len(tensor.raw_data)} bytes"
            )
    typed: dict[int, Sized] = {
        1: tensor.float_data,
        6: tensor.int32_data,
        7: tensor.int64_data,
        11: tensor.double_data,
    }
    values = typed.get(tensor.data_type)
    if not tensor.HasField("raw_data") and values is not None and len(values) != elements:
        raise InvalidInput(
            f"{where} declares dims {list(tensor.dims)} ({elements} values) but holds {len(values)}"
        )


# --------------------------------------------------------------------------------------
# Load and save
# --------------------------------------------------------------------------------------


def _module(model: onnx.ModelProto, spec: InputSpec) -> nn.Module:
    from modelguard.formats.programs import fit_batch

    batch = _input_batch(model, spec)
    _relax_reshapes(model)
    model = _convertible(model)
    graph = _convert(model)

    def relaxed() -> nn.Module | None:
        free = _free_batch(model, batch)
        return _convert(free) if free is not None else None

    return fit_batch(graph, spec.shape, batch, relaxed).eval()


def _onnx2torch() -> types.ModuleType:
    """onnx2torch, imported against a stand-in torchvision when none is installed: its
    package imports every converter, two of which import torchvision. The stand-in is
    removed again, so that nothing else mistakes it for torchvision."""
    if importlib.util.find_spec("onnx2torch") is None:
        raise ModelGuardError(
            f"onnx2torch is not installed: run scripts/setup.sh (pip install --no-deps "
            f"onnx2torch=={ONNX2TORCH_VERSION})"
        )
    with _IMPORTING:  # the stand-in below must not be seen by another thread's import
        return _import_onnx2torch()


def _import_onnx2torch() -> types.ModuleType:
    if "onnx2torch" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return _with_newer_operators(importlib.import_module("onnx2torch"))

    def missing(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("torchvision is not installed")

    stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = missing  # type: ignore[attr-defined]
    stub.ops = ops  # type: ignore[attr-defined]
    sys.modules.update({"torchvision": stub, "torchvision.ops": ops})
    try:
        return _with_newer_operators(importlib.import_module("onnx2torch"))
    finally:
        for name, module in (("torchvision", stub), ("torchvision.ops", ops)):
            if sys.modules.get(name) is module:
                del sys.modules[name]


def _with_newer_operators(onnx2torch: types.ModuleType) -> types.ModuleType:
    """``onnx2torch`` with converters for `SAME_AS_BEFORE`'s operator versions and for
    ``Gelu`` (opset 20), registered once per process (its registry is global, and refuses
    a second registration; called under `_IMPORTING`)."""
    global _registered
    if _registered:
        return onnx2torch
    from onnx2torch.node_converters.registry import add_converter, get_converter

    def registered(operation: str, version: int) -> bool:
        try:
            get_converter(operation_type=operation, version=version)
        except NotImplementedError:
            return False
        return True

    for operation, versions in SAME_AS_BEFORE.items():
        for version in versions:
            if not registered(operation, version):
                add_converter(operation_type=operation, version=version)(
                    get_converter(operation_type=operation, version=version - 1)
                )
    if not registered("Gelu", 20):
        add_converter(operation_type="Gelu", version=20)(_gelu)
    _registered = True
    return onnx2torch


def _gelu(node: Any, graph: Any) -> Any:
    """ONNX ``Gelu`` (opset 20) as ``nn.GELU``, with its ``approximate`` (``none`` or
    ``tanh``), which the two share."""
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node
    from torch import nn

    approximate = node.attributes.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise InvalidInput(f"Gelu with approximate={approximate!r} is not a GELU torch has")
    return OperationConverterResult(
        torch_module=nn.GELU(approximate=approximate),
        onnx_mapping=onnx_mapping_from_node(node),
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Warnings and torch.onnx's log lines (torchvision operators skipped, shape
    inference) stay out of the user's terminal."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph's real inputs (older exporters also list the initializers)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _input_batch(model: onnx.ModelProto, spec: InputSpec) -> int | None:
    """The model's fixed batch size (None: symbolic), after checking that it takes one
    tensor of the declared shape."""
    inputs = _inputs(model)
    if len(inputs) != 1:
        raise InvalidInput(
            f"the ONNX model takes {len(inputs)} inputs; one image tensor (N, C, H, W) is supported"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    declared = list(spec.shape)
    if len(fixed) != 4 or any(
        d is not None and d != s for d, s in zip(fixed[1:], declared, strict=True)
    ):
        shown = [d if d is not None else "N" for d in fixed]
        raise InvalidInput(
            f"the ONNX model takes inputs of shape {shown}; the declared input shape is "
            f"{','.join(map(str, declared))}"
        )
    return fixed[0] or None


def _relax_reshapes(model: onnx.ModelProto) -> None:
    """Drop ``allowzero=1`` from Reshape nodes whose target shape is a constant without
    zeros, where it changes nothing: torch's ONNX exporter writes it on every reshape and
    onnx2torch does not implement it."""
    from onnx import numpy_helper

    constants = _constants(model.graph)
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        for attribute in list(node.attribute):
            if attribute.name == "allowzero" and attribute.i == 1:
                shape = numpy_helper.to_array(constants[node.input[1]]).ravel().tolist()
                if 0 not in shape:
                    node.attribute.remove(attribute)


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The graph's constant tensors by name: initializers and Constant nodes' outputs."""
    constants = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            constants[node.output[0]] = node.attribute[0].t
    return constants


def _free_batch(model: onnx.ModelProto, batch: int | None) -> onnx.ModelProto | None:
    """A copy of ``model`` whose Reshape nodes to a constant shape of ``batch`` rows copy
    the row count from their input instead (a 0 in the shape): what an export for a fixed
    batch writes for ``x.view(x.size(0), -1)``. None when there is none;
    `modelguard.formats.programs.fit_batch` checks the copy's outputs."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    free = onnx.ModelProto()
    free.CopyFrom(model)
    constants = _constants(free.graph)
    changed = False
    for index, node in enumerate(free.graph.node):
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        if any(a.name == "allowzero" and a.i == 1 for a in node.attribute):
            continue  # a 0 would mean an empty dimension
        shape = numpy_helper.to_array(constants[node.input[1]]).astype(np.int64).ravel()
        if batch is None or shape.size < 2 or shape[0] != batch:
            continue
        shape[0] = 0
        name = f"modelguard_free_batch_shape_{index}"
        free.graph.initializer.append(numpy_helper.from_array(shape, name))
        node.input[1] = name
        changed = True
    return free if changed else None


def _convert(model: onnx.ModelProto) -> nn.Module:
    try:
        with _quiet():
            graph: nn.Module = _onnx2torch().convert(model)
    except Exception as err:  # onnx2torch raises what its converters raise
        raise InvalidInput(f"the ONNX model could not be converted: {first_line(err)}") from err
    return graph


def _unsupported(model: onnx.ModelProto) -> list[str]:
    """The graph's operators (``type``, or ``type (domain, opset N)`` when it matters)
    that onnx2torch has no converter for."""
    get_converter = _onnx2torch().node_converters.get_converter
    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: dict[str, None] = {}
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        version = opsets.get(domain)
        label = node.op_type if not domain else f"{domain}.{node.op_type}"
        if version is None:
            missing[f"{label} (domain {domain!r} not imported)"] = None
            continue
        if (
            not domain
            and node.op_type in TORCHVISION_OPERATORS
            and "torchvision" not in sys.modules
        ):
            missing[f"{label} (needs torchvision)"] = None
            continue
        try:
            get_converter(operation_type=node.op_type, version=version, domain=domain)
        except (NotImplementedError, TypeError, ValueError):  # TypeError: absurd versions
            missing[label if not domain else f"{label} (opset {version})"] = None
    return list(missing)


def _convertible(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, converted down to `CONVERTIBLE_OPSET` when onnx2torch lacks converters
    for newer operator versions; ``InvalidInput`` naming the operators it cannot
    convert at all."""
    import onnx.version_converter

    unsupported = _unsupported(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if unsupported and opset > CONVERTIBLE_OPSET:
        without_gelu = _without_gelu(model)  # a Gelu of an unknown form is named here
        try:
            with _quiet():
                older = onnx.version_converter.convert_version(without_gelu, CONVERTIBLE_OPSET)
            _relax_reshapes(older)
            if len(_unsupported(older)) < len(unsupported):
                model, unsupported = older, _unsupported(older)
        except Exception:  # no adapter for some operator: name what is unsupported as is
            pass
    if unsupported:
        raise InvalidInput(
            "the ONNX model uses operators that cannot be converted to torch: "
            + ", ".join(unsupported)
        )
    return model


def _without_gelu(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every ``Gelu`` node of its graph written out in the operators it is
    made of (x · (1 + erf(x / √2)) / 2, or the tanh form), with float32 constants (a
    float32 model's; the top-level graph: onnx2torch converts no subgraph operators): the
    opset down-conversion has no older ``Gelu`` to convert to. ``model`` itself if it has
    none; ``InvalidInput`` for a Gelu of another form."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    def is_gelu(node: onnx.NodeProto) -> bool:
        return node.op_type == "Gelu" and node.domain in ("", "ai.onnx")

    if not any(is_gelu(node) for node in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    taken |= {name for node in graph.node for name in node.output}
    prefix = "modelguard_gelu"
    while any(name.startswith(prefix) for name in taken):
        prefix += "_"
    constant = {name: f"{prefix}_{name}" for name in GELU_CONSTANTS}
    for name, number in GELU_CONSTANTS.items():
        scalar = np.array(number, np.float32)
        graph.initializer.append(numpy_helper.from_array(scalar, constant[name]))
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        approximate = next(
            (a.s.decode() for a in node.attribute if a.name == "approximate"), "none"
        )
        if not is_gelu(node):
            nodes.append(node)
            continue
        if approximate not in ("none", "tanh"):
            raise InvalidInput(f"Gelu with approximate={approximate!r} is not a GELU torch has")
        x, y = node.input[0], node.output[0]

        def temp(name: str, index: int = index) -> str:
            return f"{prefix}{index}_{name}"

        def op(kind: str, inputs: list[str], output: str) -> None:
            nodes.append(helper.make_node(kind, inputs, [output]))

        if approximate == "tanh":
            op("Mul", [x, x], temp("square"))
            op("Mul", [temp("square"), x], temp("cube"))
            op("Mul", [temp("cube"), constant["cubic"]], temp("cubic"))
            op("Add", [x, temp("cubic")], temp("inner"))
            op("Mul", [temp("inner"), constant["tanh_scale"]], temp("scaled"))
            op("Tanh", [temp("scaled")], temp("curve"))
        else:
            op("Mul", [x, constant["inverse_sqrt2"]], temp("scaled"))
            op("Erf", [temp("scaled")], temp("curve"))
        op("Add", [temp("curve"), constant["one"]], temp("gate"))
        op("Mul", [x, temp("gate")], temp("gated"))
        op("Mul", [temp("gated"), constant["half"]], y)
    del graph.node[:]
    graph.node.extend(nodes)
    return copy


def _export(module: nn.Module) -> onnx.ModelProto:
    """``module`` (a `ProgramModule`) exported with torch.onnx, with a dynamic batch
    dimension unless the graph ties it to its batch size (``chunk``).

    The TorchScript-based exporter first, deprecated but still in torch 2.13: it traces,
    running the branches on tensor values that a converted model's modules take (onnx2torch's
    Reshape checks its target shape for zeros), which the dynamo exporter cannot trace. The
    dynamo exporter (onnxscript) is the fallback, for modules tracing cannot handle."""
    import io

    import onnx
    import torch

    from modelguard.formats.programs import ProgramModule

    assert isinstance(module, ProgramModule)
    module.eval()
    program = module.program.train(False)
    dynamic = module.chunk is None
    example = module.example(2 if dynamic else None)
    buffer = io.BytesIO()
    try:
        with _quiet(), contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(
                program,
                (example,),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to buffers too
                dynamo=False,
                opset_version=EXPORT_OPSET,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None,
            )
        return onnx.load_from_string(buffer.getvalue())
    except Exception as err:  # a module tracing cannot handle
        failure: Exception = err
    try:
        with _quiet(), contextlib.redirect_stdout(sys.stderr):
            exported = torch.onnx.export(
                program,
                (example,),
                dynamo=True,
                opset_version=EXPORT_OPSET,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},) if dynamic else None,
                external_data=False,
                verbose=False,
            )
        assert exported is not None
        return exported.model_proto
    except Exception as err:
        raise InvalidInput(
            f"the model could not be exported as ONNX: {first_line(failure)}; with the "
            f"dynamo exporter: {first_line(err)}"
        ) from err
