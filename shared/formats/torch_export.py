"""``torch.export`` programs (``.pt2``, ``torch.export.save``): the graph travels with the
weights, as ATen operators.

``torch.export.load`` is not a weights-only reader, so the scan stands in front of it. In
torch 2.13 it unpickles pickled weights and constants with ``weights_only=False``, reads
the sample inputs with ``weights_only=True`` but falls back to ``weights_only=False`` when
that refuses them, unpickles "opaque" constants with ``pickle.loads``, and evaluates every
symbolic-shape expression with ``sympy.sympify`` (Python ``eval``); ``module()`` then
``exec``s the program's guard code, and call targets resolve by attribute lookup anywhere
under ``torch``. The scan therefore allows only: the entry names ``torch.export.save``
writes (no AOTInductor native code, no pickled objects); pickles (the sample inputs,
pickled tensors) that pass the weights-only rules of `modelguard.formats.pickles`; call
targets among the ATen and prims operators and a few Python arithmetic functions; shape
expressions made of sympy's and torch's shape functions over integers and shape symbols;
guards that compare input sizes with integers; raw tensors that lie inside their entry.

Loaded, the program's ``module()`` (guards not generated) has its ``aten.linear`` and
``aten.conv2d`` calls on its own weights turned back into ``nn.Linear``/``nn.Conv2d``
modules holding the same parameters, so layer probes and pruning find them by name
(``fc1``), and goes behind `modelguard.formats.programs.ProgramModule` for batch sizes
other than a fixed one it was exported with. ``save`` re-exports with a dynamic batch
dimension when the graph allows it.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from typing import TYPE_CHECKING, Any, ClassVar

from modelguard.errors import InvalidInput, ModelGuardError, UnsafeArtifact
from modelguard.formats.base import ScanResult, first_line
from modelguard.formats.scan import (
    is_zip,
    open_zip,
    read_entry,
    scan_zip,
    zip_holds_program,
)

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

    from modelguard.spec import InputSpec

MAX_PROGRAM_JSON = 64 << 20
MAX_EXPRESSION = 4096

#: Entry names (below the archive's folder) that ``torch.export.save`` writes for one
#: program without AOTInductor artifacts.
_ENTRIES = tuple(
    re.compile(p)
    for p in (
        r"archive_format",
        r"archive_version",
        r"byteorder",
        r"\.data/version",
        r"\.data/serialization_id",
        r"\.format_version",
        r"\.storage_alignment",
        r"models/model\.json",
        r"data/weights/model_weights_config\.json",
        r"data/weights/weight_\d+",
        r"data/constants/model_constants_config\.json",
        r"data/constants/tensor_\d+",
        r"data/sample_inputs/model\.pt",
        r"extra/[A-Za-z0-9_.-]+",
    )
)
#: Entries that exist in the format but carry code or arbitrary objects.
_REFUSED = (
    ("data/aotinductor/", "AOTInductor-compiled native code (a shared library torch would run)"),
    ("data/constants/custom_obj_", "a TorchBind object (a C++ class torch would instantiate)"),
    ("data/constants/opaque_obj_", "an opaque Python object that torch unpickles with pickle"),
)
_CONFIGS = {
    "data/weights/model_weights_config.json": ("data/weights/", "weight_"),
    "data/constants/model_constants_config.json": ("data/constants/", "tensor_"),
}

#: Call targets: ATen and prims operators (minus file access) and these Python functions
#: (symbolic-size arithmetic, tuple indexing).
_OPERATOR = re.compile(r"torch\.ops\.(aten|prims)\.(_?[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*)\.[A-Za-z]\w*")
_FORBIDDEN_OPERATORS = frozenset({"from_file"})
_PYTHON_TARGETS = frozenset(
    {f"_operator.{name}" for name in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")}
    | {f"torch.{name}" for name in (
        "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum",
        "_sym_sqrt")}
    | {f"math.{name}" for name in ("ceil", "floor", "trunc", "sqrt")}
)  # fmt: skip

#: What a symbolic-shape expression (``sympy.srepr`` text) may name: sympy's classes and
#: torch's shape functions (no powers or shifts: sizes blow up), assumption keywords and
#: shape symbols (``s0``, ``u1``).
_SYMPY_NAMES = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Mod", "Max", "Min", "Abs",
        "Not", "And", "Or", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
        "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "true", "false",
        "True", "False", "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "IntInfinity",
        "NegativeIntInfinity", "One", "Zero", "NegativeOne", "Half", "FloorDiv",
        "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
        "CeilDiv", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
        "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
        "infinite", "nonzero", "zero", "even", "odd", "extended_real", "commutative",
        "precision",
    }
)  # fmt: skip
_SHAPE_SYMBOL = re.compile(r"[a-z]{1,4}\d{1,9}")
_EXPRESSION_TOKEN = re.compile(
    r"\s+|(?P<name>[A-Za-z_]\w*)|\d{1,30}(?:\.\d{1,30})?(?:[eE][+-]?\d{1,4})?"
    r"|'[A-Za-z0-9_.+-]{0,64}'|//|==|!=|<=|>=|[-+*/%(),=<>]"
)
#: A guard (``ExportedProgram.module()`` pastes it into code it ``exec``s): an input size
#: or integer compared with another.
_GUARD_TERM = (
    r"(?:L(?:\['[A-Za-z_]\w*'\]|\[\d+\])+(?:\.size\(\)\[\d+\]|\.stride\(\)\[\d+\])?|-?\d+)"
)
_GUARD = re.compile(rf"{_GUARD_TERM}\s*(?:==|!=|<=|>=|<|>)\s*{_GUARD_TERM}")
_STATE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")

#: Bytes per element of the serialized ``ScalarType`` values.
_ELEMENT_BYTES = {
    1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2,
    28: 2, 29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8,
}  # fmt: skip


class TorchExport:
    name: ClassVar[str] = "torch-export"
    label: ClassVar[str] = "a torch.export program"
    media_type: ClassVar[str] = "application/vnd.modelguard.torch-export"
    extension: ClassVar[str] = ".pt2"
    needs_arch: ClassVar[bool] = False

    def sniff(self, data: bytes) -> bool:
        return is_zip(data) and zip_holds_program(data)

    def scan(self, data: bytes) -> ScanResult:
        return ScanResult(self.name, scan_program(data))

    def load(self, data: bytes, spec: InputSpec, arch: str) -> nn.Module:
        # the archive is the whole model: arch is not needed
        program = self._read(data)
        try:
            return _module(program, spec)
        except ModelGuardError:
            raise
        except Exception as err:  # a graph torch deserialized but cannot rebuild or run
            raise InvalidInput(
                f"torch.export program could not be loaded: {first_line(err)}"
            ) from err

    def load_weights(self, data: bytes) -> nn.Module:
        from modelguard.formats.weights import module_from_state_dict

        return module_from_state_dict(dict(self._read(data).state_dict))

    def save(self, module: nn.Module) -> bytes:
        import torch

        from modelguard.formats.programs import ProgramModule

        if not isinstance(module, ProgramModule):
            raise InvalidInput(
                "only a model loaded from a torch.export program (or wrapped in ProgramModule "
                "with its input shape) can be exported again"
            )
        program = _export(module)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.save(program, buffer)
        return buffer.getvalue()

    def _read(self, data: bytes) -> torch.export.ExportedProgram:
        import torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.load(io.BytesIO(data))
        except Exception as err:  # deserialization raises many kinds for one defect
            raise InvalidInput(
                f"torch.export program could not be loaded: {first_line(err)}"
            ) from err


# --------------------------------------------------------------------------------------
# Scan
# --------------------------------------------------------------------------------------


def scan_program(data: bytes) -> list[str]:
    """Full scan of a ``torch.export.save`` archive; one detail line per checked entry."""
    archive, infos = open_zip(data)
    files = [i for i in infos if not i.is_dir()]
    names = {i.filename for i in files}
    if "serialized_exported_program.json" in names:
        raise InvalidInput(
            "the archive is torch.export's older zip layout (serialized_exported_program.json); "
            "load it with the torch that wrote it and save it again with torch.export.save"
        )
    prefixes = {n.split("/", 1)[0] for n in names}
    if len(prefixes) != 1 or any("/" not in n for n in names):
        raise UnsafeArtifact(
            f"zip archive has {len(prefixes)} top-level entries; a torch.export archive has "
            "exactly one folder"
        )
    entries: dict[str, zipfile.ZipInfo] = {i.filename.split("/", 1)[1]: i for i in files}
    for rel, info in entries.items():
        for prefix, what in _REFUSED:
            if rel.startswith(prefix):
                raise UnsafeArtifact(f"archive entry {info.filename!r} is {what}; refused")
        if not any(p.fullmatch(rel) for p in _ENTRIES):
            raise UnsafeArtifact(
                f"archive entry {info.filename!r} is not part of a torch.export program; refused"
            )
    for required in ("archive_format", "models/model.json", "data/sample_inputs/model.pt"):
        if required not in entries:
            raise InvalidInput(f"the torch.export archive has no {required} entry (truncated?)")
    if read_entry(archive, entries["archive_format"]).strip() != b"pt2":
        raise InvalidInput("the archive's archive_format is not pt2")
    details = [_check_program(archive, entries["models/model.json"])]
    for config, (folder, prefix) in _CONFIGS.items():
        if config in entries:
            details += _check_payloads(archive, entries, config, folder, prefix)
    details.append(_check_nested(archive, entries["data/sample_inputs/model.pt"]))
    return details


def _load_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    if info.file_size > MAX_PROGRAM_JSON:
        raise InvalidInput(f"archive entry {info.filename!r} has {info.file_size} bytes; refused")
    try:
        return json.loads(read_entry(archive, info))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InvalidInput(f"archive entry {info.filename!r} is not valid JSON ({err})") from err


def _check_program(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """Call targets, shape expressions and guards of the serialized program."""
    document = _load_json(archive, info)
    where = f"archive entry {info.filename!r}"
    if not isinstance(document, dict) or not isinstance(document.get("graph_module"), dict):
        raise InvalidInput(f"{where} is not a serialized ExportedProgram")
    targets: set[str] = set()
    stack: list[Any] = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("target", "as_operator") and isinstance(item, str):
                    targets.add(item)
                elif key == "expr_str":
                    _check_expression(item, where)
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
    for target in sorted(targets):
        refusal = _target_refusal(target)
        if refusal:
            raise UnsafeArtifact(f"{where} {refusal}; refused without loading")
    guards = document.get("guards_code") or []
    if not isinstance(guards, list):
        raise InvalidInput(f"{where} has malformed guards_code")
    for guard in guards:
        if not isinstance(guard, str) or not _GUARD.fullmatch(guard.strip()):
            raise UnsafeArtifact(
                f"{where} has guard code {str(guard)[:80]!r}, which is not a comparison of input "
                "sizes (ExportedProgram.module() would exec it); refused"
            )
    return f"{info.filename}: {len(targets)} operators, all allowed"


def _target_refusal(target: str) -> str | None:
    if target in _PYTHON_TARGETS:
        return None
    match = _OPERATOR.fullmatch(target)
    if match is None:
        return f"calls {target[:120]!r}, which is not an ATen operator"
    if match.group(2) in _FORBIDDEN_OPERATORS:
        return f"calls {target} (file access)"
    return None


def _check_expression(text: object, where: str) -> None:
    """A symbolic-shape expression, which ``torch.export.load`` evaluates with
    ``sympy.sympify``: only the names and tokens of shape arithmetic."""
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION:
        raise UnsafeArtifact(f"{where} has a malformed symbolic-shape expression; refused")
    position = 0
    while position < len(text):
        token = _EXPRESSION_TOKEN.match(text, position)
        name = token.group("name") if token else None
        if (
            token is None
            or (name is not None and name not in _SYMPY_NAMES and not _SHAPE_SYMBOL.fullmatch(name))
            or text.startswith("**", position)
        ):
            raise UnsafeArtifact(
                f"{where} has a symbolic-shape expression {text[:80]!r} that is not shape "
                "arithmetic (torch.export.load would evaluate it as Python); refused"
            )
        position = token.end()


def _check_payloads(
    archive: zipfile.ZipFile,
    entries: dict[str, zipfile.ZipInfo],
    config: str,
    folder: str,
    prefix: str,
) -> list[str]:
    """A weights or constants config: every payload is a raw tensor lying inside its entry
    or a ``torch.save`` archive that passes the weights-only scan."""
    document = _load_json(archive, entries[config])
    where = f"archive entry {entries[config].filename!r}"
    payloads = document.get("config") if isinstance(document, dict) else None
    if not isinstance(payloads, dict):
        raise InvalidInput(f"{where} is not a payload config")
    details = []
    for fqn, meta in payloads.items():
        if not _STATE_NAME.fullmatch(fqn) or "__" in fqn:
            raise UnsafeArtifact(f"{where} names a tensor {fqn[:80]!r}; refused")
        path = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(path, str) or not re.fullmatch(rf"{prefix}\d+", path):
            raise UnsafeArtifact(f"{where}: {fqn!r} is stored as {str(path)[:80]!r}; refused")
        info = entries.get(folder + path)
        if info is None:
            raise InvalidInput(f"{where}: the entry of {fqn!r} ({path}) is missing (truncated?)")
        if meta.get("use_pickle"):
            details.append(_check_nested(archive, info))
        else:
            _check_tensor(meta.get("tensor_meta"), info, f"{where}: {fqn!r}")
    details.append(f"{entries[config].filename}: {len(payloads)} tensors inside their entries")
    return details


def _check_tensor(meta: object, info: zipfile.ZipInfo, where: str) -> None:
    """A raw tensor's sizes, strides and offset must address its entry's bytes only (an
    empty entry would be allocated as zeros of the declared size)."""

    def ints(values: object) -> list[int] | None:
        if not isinstance(values, list):
            return None
        out = [v.get("as_int") if isinstance(v, dict) else None for v in values]
        return [v for v in out if isinstance(v, int) and v >= 0] if None not in out else None

    if not isinstance(meta, dict):
        raise InvalidInput(f"{where} has no tensor metadata")
    sizes, strides = ints(meta.get("sizes")), ints(meta.get("strides"))
    offset = ints([meta.get("storage_offset")])
    element = _ELEMENT_BYTES.get(meta.get("dtype"))  # type: ignore[arg-type]
    if sizes is None or strides is None or offset is None or element is None:
        raise InvalidInput(f"{where} has malformed tensor metadata")
    if len(sizes) != len(strides) or len(sizes) > 16:
        raise InvalidInput(f"{where} has {len(sizes)} sizes and {len(strides)} strides")
    extent = (
        0
        if 0 in sizes
        else offset[0] + 1 + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))
    )
    if extent * element > info.file_size:
        raise InvalidInput(
            f"{where} addresses {extent * element} bytes but its entry holds {info.file_size} "
            "(truncated or corrupt)"
        )


def _check_nested(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """A ``torch.save`` archive inside the program (sample inputs, pickled tensors), which
    torch may unpickle with ``weights_only=False``: it must pass the weights-only scan."""
    try:
        nested = scan_zip(read_entry(archive, info))
        if nested.script:
            raise UnsafeArtifact("it holds TorchScript code")
    except ModelGuardError as err:
        kind = type(err) if isinstance(err, UnsafeArtifact) else InvalidInput
        raise kind(f"archive entry {info.filename!r} (a torch.save archive): {err}") from err
    return f"{info.filename}: a torch.save archive whose pickles are all weights-only"


# --------------------------------------------------------------------------------------
# Load and save
# --------------------------------------------------------------------------------------


def _module(program: torch.export.ExportedProgram, spec: InputSpec) -> nn.Module:
    from modelguard.formats.programs import fit_batch

    graph = program.module(check_guards=False)  # no exec of guard code
    # module() forbids train()/eval(): the mode is baked into the graph, which we check
    # instead (`_check_eval_mode`); the wrapper's children switch as usual.
    for method in ("train", "eval"):
        graph.__dict__.pop(method, None)
    graph.__dict__["validate_inputs"] = False  # sizes checked here, batches fitted below
    _check_eval_mode(graph)
    batch = _input_batch(graph, spec)
    _lift_layers(graph)
    return fit_batch(graph, spec.shape, batch, lambda: _free_batch(graph, batch)).eval()


def _check_eval_mode(graph: fx.GraphModule) -> None:
    """A program exported from a model in training mode keeps dropout and batch statistics
    on whatever mode it is later put in: refused with the fix."""
    import torch

    aten = torch.ops.aten
    training = {
        aten.dropout.default: 2,
        aten.feature_dropout.default: 2,
        aten.alpha_dropout.default: 2,
        aten.feature_alpha_dropout.default: 2,
        aten.batch_norm.default: 5,
        aten.native_batch_norm.default: 5,
    }
    always = {
        aten.native_dropout.default,
        aten._native_batch_norm_legit.default,
        aten._native_batch_norm_legit_functional.default,
    }
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        flag = training.get(node.target)
        if node.target in always or (
            flag is not None and len(node.args) > flag and node.args[flag] is True
        ):
            raise InvalidInput(
                "the program was exported from a model in training mode (dropout or batch "
                "statistics are active in its graph); export model.eval() instead"
            )


def _input_batch(graph: fx.GraphModule, spec: InputSpec) -> int | None:
    """The program's fixed batch size (None: dynamic), after checking that it takes one
    tensor of the declared shape."""
    import torch

    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("val") for n in placeholders]
    if len(values) != 1 or not isinstance(values[0], torch.Tensor):
        raise InvalidInput(
            f"the program takes {len(values)} inputs; one image tensor (N, C, H, W) is supported"
        )
    shape = list(values[0].shape)
    declared = list(spec.shape)
    fixed = [d if isinstance(d, int) else None for d in shape]
    if len(shape) != 4 or any(
        d is not None and d != s for d, s in zip(fixed[1:], declared, strict=True)
    ):
        shown = ["N" if d is None else d for d in fixed]
        raise InvalidInput(
            f"the program takes inputs of shape {shown}; the declared input shape is "
            f"{','.join(map(str, declared))}"
        )
    return fixed[0]


def _lift_layers(graph: fx.GraphModule) -> None:
    """Turn ``aten.linear``/``aten.conv2d`` calls on weights that nothing else uses into
    calls of ``nn.Linear``/``nn.Conv2d`` modules holding the same parameters, at the
    weights' own path (``fc1``): what layer probes and pruning look for."""
    import torch
    from torch import nn
    from torch.fx.operator_schemas import normalize_function

    aten = torch.ops.aten
    lifted = False
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target not in (
            aten.linear.default,
            aten.conv2d.default,
        ):
            continue
        normalized = normalize_function(
            node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
        )
        if normalized is None:
            continue
        kwargs = dict(normalized.kwargs)
        owner = _weights_owner(graph, node, kwargs.get("weight"), kwargs.get("bias"))
        if owner is None:
            continue
        path, weight, bias = owner
        layer: nn.Linear | nn.Conv2d
        if node.target is aten.linear.default and weight.dim() == 2:
            layer = nn.Linear(
                weight.shape[1], weight.shape[0], bias=bias is not None, device="meta"
            )
        elif node.target is aten.conv2d.default and weight.dim() == 4:
            groups = int(kwargs.get("groups", 1))
            layer = nn.Conv2d(
                weight.shape[1] * groups,
                weight.shape[0],
                (weight.shape[2], weight.shape[3]),
                stride=_pair(kwargs.get("stride", 1)),
                padding=_pair(kwargs.get("padding", 0)),
                dilation=_pair(kwargs.get("dilation", 1)),
                groups=groups,
                bias=bias is not None,
                device="meta",
            )
        else:
            continue
        layer.weight = weight
        if bias is not None:
            layer.bias = bias
        parent, _, leaf = path.rpartition(".")
        setattr(graph.get_submodule(parent), leaf, layer)
        with graph.graph.inserting_before(node):
            call = graph.graph.call_module(path, (kwargs["input"],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.graph.erase_node(node)
        lifted = True
    if lifted:
        graph.graph.eliminate_dead_code()
        graph.recompile()


def _free_batch(graph: fx.GraphModule, batch: int | None) -> fx.GraphModule | None:
    """A copy of ``graph`` (sharing its modules and weights) whose reshapes of a tensor of
    ``batch`` rows to ``batch`` rows take the row count from the tensor: what tracing
    ``x.view(x.size(0), -1)`` for a fixed batch recorded as the constant. None when the
    graph has none; `modelguard.formats.programs.fit_batch` checks the copy's outputs."""
    import torch
    from torch import fx

    aten = torch.ops.aten
    reshapes = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
    copied = fx.Graph()
    copied.set_codegen(graph.graph._codegen)  # inputs and outputs as the program's own
    copied.output(copied.graph_copy(graph.graph, {}))
    changed = False
    for node in list(copied.nodes):
        if node.op != "call_function" or node.target not in reshapes or len(node.args) < 2:
            continue
        source, size = node.args[0], node.args[1]
        value = source.meta.get("val") if isinstance(source, fx.Node) else None
        if not (
            isinstance(size, (list, tuple))
            and size
            and size[0] == batch
            and isinstance(value, torch.Tensor)
            and value.dim() > 0
            and value.shape[0] == batch
        ):
            continue
        with copied.inserting_before(node):
            rows = copied.call_function(aten.sym_size.int, (source, 0))
        node.args = (source, [rows, *size[1:]], *node.args[2:])
        changed = True
    return fx.GraphModule(graph, copied) if changed else None


def _pair(value: object) -> tuple[int, int]:
    """A conv2d argument (``int[2]`` in the schema, one value meaning both) as a pair."""
    if isinstance(value, int):
        return (value, value)
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidInput(f"a convolution argument {value!r} is not a size")
    return (int(value[0]), int(value[-1]))


def _weights_owner(
    graph: fx.GraphModule, node: fx.Node, weight: object, bias: object
) -> tuple[str, nn.Parameter, nn.Parameter | None] | None:
    """The module path holding ``weight`` (and ``bias``), and those parameters, when it
    holds nothing else and only ``node`` reads them."""
    import torch
    from torch import fx

    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    path, _, leaf = str(weight.target).rpartition(".")
    if not path or leaf != "weight":
        return None
    if bias is not None and not (
        isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{path}.bias"
    ):
        return None
    holder = graph.get_submodule(path)
    parameters = holder._parameters
    if (
        type(holder) is not torch.nn.Module
        or next(holder.children(), None) is not None
        or next(holder.buffers(recurse=False), None) is not None
        or set(parameters) - {"weight", "bias"}
        or (bias is None and parameters.get("bias") is not None)
    ):
        return None
    readers = [
        n for n in graph.graph.nodes if n.op == "get_attr" and str(n.target).startswith(f"{path}.")
    ]
    if any(set(reader.users) != {node} for reader in readers):
        return None
    weight_parameter, bias_parameter = parameters.get("weight"), parameters.get("bias")
    if not isinstance(weight_parameter, torch.nn.Parameter):
        return None
    return path, weight_parameter, bias_parameter


def _export(module: nn.Module) -> torch.export.ExportedProgram:
    """``module`` (a `ProgramModule`) exported again: with a dynamic batch dimension, or
    for its fixed batch size when the graph ties it."""
    import torch

    from modelguard.formats.programs import ProgramModule

    assert isinstance(module, ProgramModule)
    module.eval()
    program = module.program.train(False)
    attempts: list[tuple[torch.Tensor, Any]] = []
    if module.chunk is None:
        batch = torch.export.Dim("batch", min=1)
        attempts.append((module.example(2), ({0: batch},)))
    attempts.append((module.example(), None))
    failure: Exception = InvalidInput("nothing to export")
    for example, dynamic in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.export(program, (example,), dynamic_shapes=dynamic)
        except Exception as err:  # a graph tied to its batch size: try the fixed size
            failure = err
    raise InvalidInput(f"the model could not be exported with torch.export: {first_line(failure)}")
