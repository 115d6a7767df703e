"""The symbolic pickle machine: what a pickle stream would import and call, found without
executing it.

Streams are decoded with ``pickletools.genops`` (which only decodes) and run through a
*symbolic* pickle machine: it tracks the stack and the memo well enough to know exactly
which global every ``GLOBAL``/``STACK_GLOBAL`` resolves to (also when the module and name
strings come from the memo, or when decoy strings were pushed and popped), and what every
``REDUCE``, ``NEWOBJ``, ``OBJ``, ``INST`` and ``BUILD`` is applied to. A stream is accepted
only when every global is on an exact allow-list (torch's own weights-only list, plus
TorchScript's list builders and ``__torch__`` classes inside TorchScript archives), every
call is made on an allowed constructor, and every ``BUILD`` sets the state of an object
such a constructor made.

Shared by the zip archives' scan (`modelguard.formats.scan`) and the registry, which refuses a
raw pickle submitted as a model (`raw_pickle_refusal`). Imports neither torch nor a format.
"""

from __future__ import annotations

import gc
import io
import pickletools
import re
from dataclasses import dataclass

from modelguard.errors import ModelGuardError, UnsafeArtifact

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


def parses_as_pickle(data: bytes) -> PickleReport | None:
    """The report when ``data`` is a complete, well-formed pickle stream, else None."""
    if len(data) < 2:
        return None
    try:
        return inspect_pickle(data)
    except ModelGuardError:
        return None


def looks_like_pickle(data: bytes) -> bool:
    # protocol 2+ starts with PROTO (0x80, version); protocols 0-1 with an opcode
    if len(data) > 1 and data[0] == 0x80 and data[1] <= 5:
        return True
    return data[:1] in (b"(", b"c", b"]", b"}", b")", b"I", b"N", b"\x8c", b"K", b"J", b"S", b"V")


def raw_pickle_refusal(data: bytes) -> UnsafeArtifact | None:
    """Why a model file that is a bare pickle stream is refused; None when ``data`` is not
    one (a stream too broken to be a pickle falls through to the unknown-format error,
    unless it starts like protocol 2+)."""
    if not looks_like_pickle(data):
        return None
    try:
        report = inspect_pickle(data, torchscript=False)
    except UnsafeArtifact as err:
        if data[0] != 0x80:
            return None
        refusal = UnsafeArtifact(
            f"model file is a raw pickle stream that cannot be decoded ({err}); "
            "refused without loading"
        )
        refusal.__cause__ = err
        return refusal
    reason = "; ".join(dict.fromkeys(report.problems)) or "a pickle can execute code when loaded"
    return UnsafeArtifact(
        f"model file is a raw pickle ({reason}); refused without loading. "
        "Submit safetensors weights with --arch, or a TorchScript file."
    )
