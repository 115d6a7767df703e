"""Inspect an untrusted model file *before* anything parses it as a model.

Nothing here unpickles or imports anything a file names. Pickle streams are decoded with
``pickletools.genops`` (which only decodes) and run through a *symbolic* pickle machine:
it tracks the stack and the memo well enough to know exactly which global every
``GLOBAL``/``STACK_GLOBAL`` resolves to (also when the module and name strings come from
the memo, or when decoy strings were pushed and popped), and what every ``REDUCE``,
``NEWOBJ``, ``OBJ``, ``INST`` and ``BUILD`` is applied to. A stream is accepted only when
every global is on an exact allow-list (torch's own weights-only list, plus TorchScript's
list builders and ``__torch__`` classes inside TorchScript archives), every call is made on
an allowed constructor, and every ``BUILD`` sets the state of an object such a constructor
made.

Zip archives (TorchScript and ``torch.save``) are checked for structure before any entry
is read: one top-level folder, only the entry names torch writes, no duplicate,
absolute or ``..`` names, no encryption, no overlapping entries, a bounded number of
entries and a bounded expansion (zip bombs); every pickle inside is analysed; any other
entry that is itself a zip or a pickle stream is refused (nested payloads); TorchScript
code may only call the standard operator namespaces. Safetensors headers are validated
(JSON object without duplicate keys, known dtypes, offsets that match the shapes, lie
inside the file and do not overlap).

A file is classified as ``safetensors``, ``torchscript`` or ``torch-zip`` (a ``torch.save``
archive, to be read with ``weights_only=True``), or refused: ``UnsafeArtifact`` with a
reason naming what was found, or ``InvalidInput`` for corrupt, truncated, oversized or
unknown files. The scanner never raises anything else.
"""

from __future__ import annotations

import gc
import io
import itertools
import json
import pickletools
import re
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from shared.errors import InvalidInput, ModelGuardError, UnsafeArtifact

SAFETENSORS = "safetensors"
TORCHSCRIPT = "torchscript"
TORCH_ZIP = "torch-zip"

# --------------------------------------------------------------------------------------
# Allow-lists
# --------------------------------------------------------------------------------------

_STORAGE_KINDS = (
    "BFloat16|Bool|Byte|Char|ComplexDouble|ComplexFloat|Double|Float|Half|Int|Long|"
    "QInt32|QInt8|QUInt2x4|QUInt4x2|QUInt8|Short"
)
#: Names that are only *referenced* (dtypes, storage and tensor classes, layouts), as in
#: ``torch._weights_only_unpickler._get_allowed_globals``.
_REFERENCE_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(rf"torch(\.cuda)?(\.sparse)?\.({_STORAGE_KINDS})(Storage|Tensor)"),
    re.compile(
        r"torch\.(bfloat16|bool|bits(16|1x8|2x4|4x2|8)|complex(32|64|128)|float(16|32|64)"
        r"|float8_e4m3fn(uz)?|float8_e5m2(fnuz)?|float8_e8m0fnu|float4_e2m1fn_x2"
        r"|u?int([1-7]|8|16|32|64)|q(u)?int(8|32|2x4|4x2))"
    ),
    re.compile(
        r"torch\.per_(tensor|channel)_(affine|symmetric)|torch\.per_channel_affine_float_qparams"
    ),
    re.compile(r"torch\.storage\.(Typed|Untyped)Storage"),
)
#: Constructors a weights-only pickle may call (REDUCE/NEWOBJ) and whose results it may
#: ``BUILD``.
SAFE_CALLABLES: frozenset[str] = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.set",
        "builtins.frozenset",
        "builtins.complex",
        "torch._tensor._rebuild_from_type_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "torch._utils._rebuild_nested_tensor",
        "torch._utils._rebuild_wrapper_subclass",
        "torch._utils._rebuild_device_tensor_from_numpy",
        "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    }
)
#: TorchScript's own pickles (read by its C++ unpickler, which never runs Python) also
#: use these list builders and ``__torch__.*`` class names (the scripted modules).
TORCHSCRIPT_CALLABLES: frozenset[str] = frozenset(
    {
        "torch.jit._pickle.build_intlist",
        "torch.jit._pickle.build_tensorlist",
        "torch.jit._pickle.build_doublelist",
        "torch.jit._pickle.build_boollist",
        "torch.jit._pickle.build_genericlist",
        "torch.jit._pickle.build_tensor_from_id",
        "torch.jit._pickle.restore_type_tag",
    }
)
TORCHSCRIPT_CLASS_PREFIX = "__torch__."

#: Kept for callers of the previous version: the globals a safe pickle may reference
#: start with one of these (the exact checks above decide).
SAFE_GLOBAL_PREFIXES: tuple[str, ...] = (
    "torch._utils._rebuild_",
    "torch.",
    "collections.OrderedDict",
    "__torch__.",
    "_codecs.encode",
    "builtins.set",
    "builtins.frozenset",
    "builtins.bytearray",
    "builtins.complex",
)
#: torch namespaces that reach code execution or the file system; never allowed.
FORBIDDEN_TORCH = (
    "torch.load",
    "torch.save",
    "torch.jit",
    "torch.ops",
    "torch.hub",
    "torch.package",
    "torch.serialization",
    "torch._C",
    "torch.classes",
    "torch.autograd",
    "torch.fx",
    "torch.utils",
    "torch.distributed",
    "torch._dynamo",
    "torch._inductor",
    "torch.compile",
    "torch.export",
    "torch.library",
    "torch.onnx",
    "torch.multiprocessing",
    "torch.testing",
    "torch.backends",
    "torch.cuda",
)

MAX_PICKLE_OPS = 5_000_000
MAX_PICKLE_BYTES = 256 << 20
MAX_STACK = 1_000_000
MAX_ZIP_ENTRIES = 65_536
#: An entry may expand at most this much (torch stores its entries uncompressed).
MAX_COMPRESSION_RATIO = 200
MAX_SAFETENSORS_HEADER = 100 << 20
TORCHSCRIPT_OP_NAMESPACES = frozenset({"aten", "prim", "quantized", "prepacked", "_quantized"})

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x01\x02", b"PK\x07\x08")


@dataclass(frozen=True)
class ScanResult:
    kind: str
    #: what was inspected (pickles and globals), for reports.
    details: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Symbolic pickle machine
# --------------------------------------------------------------------------------------


class _Mark:
    __slots__ = ()


class _Value:
    """A value on the symbolic stack: a string constant, a global, an object made by a
    call, or anything else (numbers, containers, persistent ids)."""

    __slots__ = ("kind", "text")

    def __init__(self, kind: str, text: str = "") -> None:
        self.kind = kind  # "str" | "global" | "call" | "other"
        self.text = text

    def describe(self) -> str:
        if self.kind == "global":
            return f"global {self.text}"
        if self.kind == "call":
            return f"the result of calling {self.text}"
        if self.kind == "str":
            return f"the string {self.text[:40]!r}"
        return "a non-callable value"


_MARK = _Mark()
_OTHER = _Value("other")
_PUSH_OTHER = frozenset(
    {
        "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "BINBYTES",
        "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE", "NEWTRUE", "NEWFALSE", "FLOAT",
        "BINFLOAT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_SET", "NEXT_BUFFER",
        "PERSID",
    }
)  # fmt: skip
_PUSH_STR = frozenset(
    {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
     "SHORT_BINSTRING"}
)  # fmt: skip
_CALLS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"})


@dataclass(frozen=True)
class PickleReport:
    """What a pickle stream would do: the globals it imports, the callables it calls and
    the structural problems found (each a sentence)."""

    globals: list[str]
    calls: list[str]
    problems: list[str]
    opcodes: int


class _Machine:
    def __init__(self) -> None:
        self.stack: list[_Value | _Mark] = []
        self.memo: dict[int, _Value | _Mark] = {}
        self.globals: list[str] = []
        self.calls: list[str] = []
        self.problems: list[str] = []

    # stack helpers ------------------------------------------------------------------
    def push(self, value: _Value | _Mark) -> None:
        if len(self.stack) >= MAX_STACK:
            raise UnsafeArtifact("pickle stack grows beyond any model's needs; refused")
        self.stack.append(value)

    def pop(self) -> _Value:
        if not self.stack:
            raise ValueError("stack underflow")
        value = self.stack.pop()
        if isinstance(value, _Mark):
            raise ValueError("MARK where a value was expected")
        return value

    def pop_mark(self) -> list[_Value]:
        items: list[_Value] = []
        while True:
            if not self.stack:
                raise ValueError("no MARK on the stack")
            value = self.stack.pop()
            if isinstance(value, _Mark):
                items.reverse()
                return items
            items.append(value)

    def top(self) -> _Value | _Mark:
        if not self.stack:
            raise ValueError("stack underflow")
        return self.stack[-1]

    # calls --------------------------------------------------------------------------
    def call(self, opcode: str, target: _Value, allowed: frozenset[str], script: bool) -> None:
        if target.kind != "global":
            self.problems.append(f"{opcode} calls {target.describe()}")
            self.push(_Value("call", "<unknown>"))
            return
        name = target.text
        self.calls.append(name)
        if not _is_allowed_callable(name, allowed, script):
            self.problems.append(f"{opcode} calls {name}")
        self.push(_Value("call", name))

    def global_(self, name: str) -> None:
        self.globals.append(name)
        self.push(_Value("global", name))

    def step(self, name: str, arg: object, allowed: frozenset[str], script: bool) -> None:
        if name in _PUSH_OTHER:
            if name == "PERSID":
                self.push(_Value("other", "persistent"))
            else:
                self.push(_OTHER)
        elif name in _PUSH_STR:
            text = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
            self.push(_Value("str", text))
        elif name in ("PROTO", "FRAME"):
            return
        elif name == "STOP":
            self.pop()
        elif name == "MARK":
            self.push(_MARK)
        elif name == "POP":
            if self.stack and isinstance(self.stack[-1], _Mark):
                self.stack.pop()  # POP of a MARK is what pickle does too
            else:
                self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            self.push(self.top())
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            index = int(str(arg))
            if index not in self.memo:
                raise ValueError(f"memo key {index} missing")
            self.push(self.memo[index])
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[int(str(arg))] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            self.global_(f"{module}.{attr}")
        elif name == "STACK_GLOBAL":
            attr_value, module_value = self.pop(), self.pop()
            if module_value.kind != "str" or attr_value.kind != "str":
                self.problems.append(
                    "STACK_GLOBAL imports a computed name "
                    f"({module_value.describe()} . {attr_value.describe()})"
                )
                self.global_("<computed>")
            else:
                self.global_(f"{module_value.text}.{attr_value.text}")
        elif name in ("EXT1", "EXT2", "EXT4"):
            self.problems.append(f"{name} imports extension-registry entry {arg}")
            self.global_(f"<extension {arg}>")
        elif name == "REDUCE":
            self.pop()  # arguments
            self.call(name, self.pop(), allowed, script)
        elif name == "NEWOBJ":
            self.pop()
            self.call(name, self.pop(), allowed, script)
        elif name == "NEWOBJ_EX":
            self.pop()
            self.pop()
            self.call(name, self.pop(), allowed, script)
        elif name == "OBJ":
            items = self.pop_mark()
            if not items:
                raise ValueError("OBJ without a class")
            self.call(name, items[0], allowed, script)
        elif name == "INST":
            self.pop_mark()
            module, _, attr = str(arg).partition(" ")
            target = f"{module}.{attr}"
            self.globals.append(target)
            self.call(name, _Value("global", target), allowed, script)
        elif name == "BUILD":
            self.pop()  # state
            obj = self.top()
            if not isinstance(obj, _Value) or obj.kind != "call" or obj.text == "<unknown>":
                what = obj.describe() if isinstance(obj, _Value) else "a MARK"
                self.problems.append(f"BUILD sets the state of {what}")
        elif name in ("APPEND",):
            self.pop()
            self.top()
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
            self.pop_mark()
            self.top()
        elif name == "SETITEM":
            self.pop()
            self.pop()
            self.top()
        elif name in ("LIST", "TUPLE", "DICT", "FROZENSET"):
            self.pop_mark()
            self.push(_OTHER)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            for _ in range(int(name[-1])):
                self.pop()
            self.push(_OTHER)
        elif name in ("BINPERSID", "READONLY_BUFFER"):
            self.pop()
            self.push(_Value("other", "persistent"))
        else:
            raise ValueError(f"opcode {name} is not handled")


def _is_allowed_callable(name: str, allowed: frozenset[str], script: bool) -> bool:
    if name in allowed:
        return True
    return script and (name in TORCHSCRIPT_CALLABLES or name.startswith(TORCHSCRIPT_CLASS_PREFIX))


def _is_allowed_global(name: str, script: bool = True) -> bool:
    """Whether a pickle may *reference* ``name`` (calls are checked separately)."""
    if name in SAFE_CALLABLES:
        return True
    if script and (name in TORCHSCRIPT_CALLABLES or name.startswith(TORCHSCRIPT_CLASS_PREFIX)):
        return not any(part in ("", "..") for part in name.split("."))
    return any(pattern.fullmatch(name) for pattern in _REFERENCE_PATTERNS)


def inspect_pickle(data: bytes, *, torchscript: bool = True) -> PickleReport:
    """Run the symbolic machine over one pickle stream (never executes it).

    Raises ``UnsafeArtifact`` for a stream that cannot be decoded (a truncated or crafted
    pickle is not given the benefit of the doubt)."""
    if len(data) > MAX_PICKLE_BYTES:
        raise UnsafeArtifact(f"pickle stream of {len(data)} bytes is larger than any model needs")
    machine = _Machine()
    count = 0
    stopped = False
    # The walk allocates many short-lived objects; with a large heap (a loaded model)
    # generational GC passes would dominate the scan time, so pause GC meanwhile.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for count, (op, arg, _pos) in enumerate(pickletools.genops(io.BytesIO(data)), start=1):
            if count > MAX_PICKLE_OPS:
                raise UnsafeArtifact("pickle stream has too many opcodes; refused")
            machine.step(op.name, arg, SAFE_CALLABLES, torchscript)
            if op.name == "STOP":
                stopped = True
    except ModelGuardError:
        raise
    except Exception as err:  # genops raises ValueError and friends on any defect
        raise UnsafeArtifact(f"pickle stream is malformed or truncated ({err}); refused") from err
    finally:
        if collecting:
            gc.enable()
    if not stopped:
        raise UnsafeArtifact("pickle stream is truncated (no STOP); refused")
    for name in machine.globals:
        if name.startswith("<"):
            continue
        if not _is_allowed_global(name, torchscript):
            machine.problems.append(f"imports {name}")
    return PickleReport(machine.globals, machine.calls, machine.problems, count)


def pickle_globals(data: bytes) -> list[str]:
    """Every ``module.name`` a pickle stream imports, found without executing it (names
    built at run time show as ``<computed>``). Raises ``UnsafeArtifact`` for a stream that
    cannot be decoded."""
    return inspect_pickle(data).globals


def check_pickle(data: bytes, where: str, *, torchscript: bool = True) -> list[str]:
    """Refuse (``UnsafeArtifact``) a pickle that imports a global outside the allow-list,
    calls anything but an allowed constructor, or sets the state of anything else; return
    its globals otherwise. ``torchscript`` also allows TorchScript's own names."""
    report = inspect_pickle(data, torchscript=torchscript)
    if report.problems:
        found = "; ".join(dict.fromkeys(report.problems))
        raise UnsafeArtifact(
            f"{where} is a pickle that can execute code ({found}); refused without loading. "
            "Export the weights as safetensors or the model as TorchScript."
        )
    return report.globals


def _parses_as_pickle(data: bytes) -> PickleReport | None:
    """The report when ``data`` is a complete, well-formed pickle stream, else None."""
    if len(data) < 2:
        return None
    try:
        return inspect_pickle(data)
    except ModelGuardError:
        return None


# --------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------


def _looks_like_pickle(data: bytes) -> bool:
    # protocol 2+ starts with PROTO (0x80, version); protocols 0-1 with an opcode
    if len(data) > 1 and data[0] == 0x80 and data[1] <= 5:
        return True
    return data[:1] in (b"(", b"c", b"]", b"}", b")", b"I", b"N", b"\x8c", b"K", b"J", b"S", b"V")


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return 2 <= header_len <= len(data) - 8 and data[8:9] == b"{"


_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2,
    "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
    "F64": 8, "C64": 8,
}  # fmt: skip


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidInput(f"safetensors header names {key!r} twice")
        out[key] = value
    return out


def check_safetensors(data: bytes) -> list[str]:
    """Validate a safetensors header; returns one detail line per tensor."""
    if len(data) < 8:
        raise InvalidInput("safetensors file is truncated (no header length)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_SAFETENSORS_HEADER:
        raise InvalidInput(f"safetensors header claims {header_len} bytes; refused")
    if 8 + header_len > len(data):
        raise InvalidInput("safetensors header runs past the end of the file (truncated)")
    try:
        header = json.loads(data[8 : 8 + header_len], object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise InvalidInput(f"safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise InvalidInput("safetensors header is not a JSON object")
    body = len(data) - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise InvalidInput("safetensors __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise InvalidInput(f"safetensors entry {name!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise InvalidInput(f"safetensors entry {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InvalidInput(f"safetensors entry {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InvalidInput(f"safetensors entry {name!r} has invalid data_offsets")
        start, end = offsets
        if not (0 <= start <= end <= body):
            raise InvalidInput(
                f"safetensors entry {name!r} points past the end of the file (truncated or corrupt)"
            )
        elements = 1
        for d in shape:
            elements *= d
        if elements * _SAFETENSORS_DTYPES[dtype] != end - start:
            raise InvalidInput(
                f"safetensors entry {name!r}: shape {shape} of {dtype} does not match its "
                f"{end - start} bytes"
            )
        spans.append((start, end, name))
    spans.sort()
    for (_s1, e1, n1), (s2, _e2, n2) in itertools.pairwise(spans):
        if s2 < e1:
            raise InvalidInput(f"safetensors entries {n1!r} and {n2!r} overlap")
    return [f"{name}: [{start}, {end})" for start, end, name in spans]


def scan_model_bytes(data: bytes, max_bytes: int = 1 << 30) -> ScanResult:
    """Classify ``data`` or raise ``UnsafeArtifact``/``InvalidInput`` with the reason."""
    if not data:
        raise InvalidInput("model file is empty")
    if len(data) > max_bytes:
        raise InvalidInput(f"model file is {len(data)} bytes; the limit is {max_bytes}")
    try:
        return _classify(bytes(data))
    except ModelGuardError:
        raise
    except Exception as err:  # the scanner must never crash on hostile bytes
        raise InvalidInput(
            f"model file could not be parsed ({type(err).__name__}: {err}); corrupt?"
        ) from err


def _classify(data: bytes) -> ScanResult:
    if data[:4] == b"PK\x03\x04":
        return _scan_zip(data)
    if _looks_like_safetensors(data):
        return ScanResult(SAFETENSORS, check_safetensors(data))
    if _looks_like_pickle(data):
        report: PickleReport | None
        try:
            report = inspect_pickle(data, torchscript=False)
        except UnsafeArtifact as err:
            if data[0] == 0x80:
                raise UnsafeArtifact(
                    f"model file is a raw pickle stream that cannot be decoded ({err}); "
                    "refused without loading"
                ) from err
            report = None
        if report is not None:
            reason = "; ".join(dict.fromkeys(report.problems)) or (
                "a pickle can execute code when loaded"
            )
            raise UnsafeArtifact(
                f"model file is a raw pickle ({reason}); refused without loading. "
                "Submit safetensors weights with --arch, or a TorchScript file."
            )
    if data[:2] == b"PK":
        raise InvalidInput("model file is a damaged zip archive (no local header at the start)")
    raise InvalidInput(
        "model file is neither safetensors, TorchScript nor a torch.save archive "
        "(corrupt, truncated or another format)"
    )


# --------------------------------------------------------------------------------------
# Zip archives: TorchScript and torch.save
# --------------------------------------------------------------------------------------

#: Entry names (after the single top-level folder) that torch writes.
_ENTRY_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"data\.pkl",
        r"constants\.pkl",
        r"traced_inputs\.pkl",
        r"bytecode\.pkl",
        r"(data|constants|traced_inputs)/\d+",
        r"code/__torch__(/[A-Za-z0-9_.]+)*\.py(\.debug_pkl)?",
        r"code/__torch__(/[A-Za-z0-9_.]+)*/?",
        r"version",
        r"byteorder",
        r"\.format_version",
        r"\.storage_alignment",
        r"\.data/serialization_id",
        r"\.data/version",
        r"extra/[^/]+",
    )
)
_PICKLE_ENTRIES = re.compile(r"(data|constants|traced_inputs|bytecode)\.pkl|code/.+\.debug_pkl")
_OPS_CALL = re.compile(r"\bops\.([A-Za-z_][A-Za-z0-9_]*)\.")


def _entry_problem(name: str) -> str | None:
    if not name:
        return "an entry without a name"
    if "\x00" in name or "\\" in name:
        return f"entry {name!r} has a NUL or backslash in its name"
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return f"entry {name!r} has an absolute path (escapes the archive)"
    if ".." in name.split("/"):
        return f"entry {name!r} escapes the archive (path traversal)"
    return None


def _iter_checked(archive: zipfile.ZipFile, total_size: int) -> Iterator[zipfile.ZipInfo]:
    infos = archive.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise UnsafeArtifact(f"zip holds {len(infos)} entries; refused")
    seen: set[str] = set()
    declared = 0
    for info in infos:
        problem = _entry_problem(info.filename)
        if problem:
            raise UnsafeArtifact(f"{problem}; refused")
        if info.filename in seen:
            raise UnsafeArtifact(f"zip names entry {info.filename!r} twice (smuggling); refused")
        seen.add(info.filename)
        if info.flag_bits & 0x1:
            raise UnsafeArtifact(f"zip entry {info.filename!r} is encrypted; refused")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UnsafeArtifact(
                f"zip entry {info.filename!r} uses compression method {info.compress_type}; "
                "torch archives use stored or deflated entries only"
            )
        if info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1) and (
            info.file_size > 1 << 20
        ):
            raise UnsafeArtifact(
                f"zip entry {info.filename!r} expands {info.compress_size} bytes to "
                f"{info.file_size} (zip bomb?); refused"
            )
        declared += info.file_size
    if declared > 4 * total_size + (64 << 20):
        raise UnsafeArtifact(f"zip expands {total_size} bytes to {declared} (zip bomb?); refused")
    # Overlapping entries (one payload referenced by many headers) are a zip-bomb trick.
    spans = sorted(
        ((i.header_offset, i.header_offset + 30 + len(i.filename.encode()) + i.compress_size, i)
         for i in infos),
        key=lambda span: (span[0], span[1]),
    )  # fmt: skip
    for (start, end, first), (next_start, _e, second) in itertools.pairwise(spans):
        if next_start < end or next_start == start:
            raise UnsafeArtifact(
                f"zip entries {first.filename!r} and {second.filename!r} overlap (zip bomb?); "
                "refused"
            )
    yield from infos


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with archive.open(info) as handle:
            payload = handle.read(info.file_size + 1)
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
        EOFError,
        RuntimeError,
        NotImplementedError,
    ) as err:
        raise InvalidInput(f"zip entry {info.filename!r} is corrupt ({err})") from err
    except Exception as err:  # zlib.error and other decoder defects
        raise InvalidInput(f"zip entry {info.filename!r} is corrupt ({err})") from err
    if len(payload) != info.file_size:
        raise InvalidInput(f"zip entry {info.filename!r} is truncated")
    return payload


def _nested_payload(payload: bytes) -> str | None:
    """Why ``payload`` (an entry that should hold raw bytes) is a nested archive/pickle."""
    if payload[:4] in _ZIP_MAGICS:
        return "a nested zip archive"
    if payload[:2] == b"\x1f\x8b" or payload[:6] == b"\xfd7zXZ\x00" or payload[:3] == b"BZh":
        return "a compressed stream"
    report = _parses_as_pickle(payload) if _looks_like_pickle(payload) else None
    if report is not None and (report.globals or report.calls):
        found = ", ".join(dict.fromkeys(report.globals)) or "calls"
        return f"a nested pickle importing {found}"
    return None


def _scan_zip(data: bytes) -> ScanResult:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = list(_iter_checked(archive, len(data)))
    except ModelGuardError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as err:
        raise InvalidInput(f"model archive is not a readable zip ({err}); truncated?") from err
    names = [i.filename for i in infos if not i.is_dir()]
    if not names:
        raise InvalidInput("zip archive is empty")
    prefixes = {n.split("/", 1)[0] for n in names}
    if len(prefixes) != 1 or any("/" not in n for n in names):
        shown = ", ".join(sorted(prefixes)[:5])
        raise UnsafeArtifact(
            f"zip archive has {len(prefixes)} top-level entries ({shown}); a TorchScript or "
            "torch.save archive has exactly one folder"
        )
    prefix = prefixes.pop()
    relative = {n: n.split("/", 1)[1] for n in names}
    for name, rel in relative.items():
        if not any(p.fullmatch(rel) for p in _ENTRY_PATTERNS):
            raise UnsafeArtifact(
                f"archive entry {name!r} is not part of a TorchScript or torch.save archive; "
                "refused"
            )
    if "data.pkl" not in relative.values():
        raise InvalidInput(f"zip archive holds no {prefix}/data.pkl: not a torch model")
    script = any(rel.startswith("code/") for rel in relative.values()) or (
        "constants.pkl" in relative.values()
    )
    details: list[str] = []
    for info in infos:
        if info.is_dir():
            continue
        rel = relative[info.filename]
        if _PICKLE_ENTRIES.fullmatch(rel):
            payload = _read(archive, info)
            globals_ = check_pickle(payload, f"archive entry {info.filename!r}", torchscript=script)
            details.append(f"{info.filename}: {len(globals_)} globals, all allowed")
        elif rel.startswith("code/") and rel.endswith(".py"):
            _check_code(info.filename, _read(archive, info))
        elif info.file_size > 0:
            head = _read(archive, info) if info.file_size <= (64 << 20) else b""
            reason = _nested_payload(head) if head else None
            if reason:
                raise UnsafeArtifact(f"archive entry {info.filename!r} is {reason}; refused")
    return ScanResult(TORCHSCRIPT if script else TORCH_ZIP, details)


def _check_code(name: str, payload: bytes) -> None:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnsafeArtifact(f"TorchScript code {name!r} is not UTF-8 text; refused") from err
    for namespace in set(_OPS_CALL.findall(text)):
        if namespace not in TORCHSCRIPT_OP_NAMESPACES:
            raise UnsafeArtifact(
                f"TorchScript code {name!r} calls custom operators ops.{namespace}.*; refused"
            )
