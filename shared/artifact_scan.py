"""Inspect an untrusted model file *before* anything parses it as a model.

Nothing here unpickles: pickle streams are walked opcode by opcode with
``pickletools.genops``, which decodes without executing. A file is classified as one of
``safetensors``, ``torchscript``, ``torch-zip`` (``torch.save`` archive, loadable only with
``weights_only=True``) or refused with a reason naming what was found.
"""

from __future__ import annotations

import io
import json
import pickletools
import struct
import zipfile
from dataclasses import dataclass, field

from shared.errors import InvalidInput, UnsafeArtifact

SAFETENSORS = "safetensors"
TORCHSCRIPT = "torchscript"
TORCH_ZIP = "torch-zip"

#: Globals a weights-only torch pickle (and a TorchScript ``data.pkl``/``constants.pkl``)
#: legitimately references. Anything else — os.system, builtins.eval, subprocess… — is code.
SAFE_GLOBAL_PREFIXES: tuple[str, ...] = (
    "torch._utils._rebuild_",
    "torch.",  # storage classes, dtypes, torch.Size; checked more narrowly below
    "collections.OrderedDict",
    "__torch__.",  # TorchScript class names, resolved by TorchScript itself, not Python
    "_codecs.encode",
    "numpy.core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
    "builtins.set",
    "builtins.frozenset",
    "builtins.slice",
    "builtins.bytearray",
    "builtins.complex",
)
#: torch attributes that can reach code execution when called from a pickle.
FORBIDDEN_TORCH = ("torch.load", "torch.jit", "torch.ops", "torch.hub", "torch.package",
                   "torch.serialization", "torch._C", "torch.classes", "torch.autograd",
                   "torch.fx", "torch.utils", "torch.distributed", "torch._dynamo",
                   "torch._inductor", "torch.compile", "torch.export", "torch.library")

MAX_PICKLE_OPS = 5_000_000


@dataclass(frozen=True)
class ScanResult:
    kind: str
    #: what was inspected (pickles and globals), for reports.
    details: list[str] = field(default_factory=list)


def _is_allowed_global(name: str) -> bool:
    if name.startswith(("__torch__.", "torch.jit._pickle.build_", "torch.jit._pickle.restore_")):
        # TorchScript's own list/tag rebuilders: pure constructors
        return True
    if name.startswith("torch."):
        return not any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_TORCH)
    return any(name == p or name.startswith(p) for p in SAFE_GLOBAL_PREFIXES if p != "torch.")


def pickle_globals(data: bytes) -> list[str]:
    """Every ``module.name`` a pickle stream imports, found without executing it.

    Raises ``UnsafeArtifact`` for a stream that cannot be decoded (a truncated or crafted
    pickle is not given the benefit of the doubt)."""
    found: list[str] = []
    recent_strings: list[str] = []
    try:
        for count, (op, arg, _pos) in enumerate(pickletools.genops(io.BytesIO(data))):
            if count > MAX_PICKLE_OPS:
                raise UnsafeArtifact("pickle stream has too many opcodes; refused")
            if op.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                found.append(f"{module}.{name}")
            elif op.name == "STACK_GLOBAL":
                # module and name were pushed as the two preceding strings
                if len(recent_strings) < 2:
                    found.append("<STACK_GLOBAL with computed name>")
                else:
                    found.append(f"{recent_strings[-2]}.{recent_strings[-1]}")
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                recent_strings.append(str(arg))
            elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                continue
            elif op.name in ("BINGET", "GET", "LONG_BINGET"):
                # a memoised string may be reused as module/name; we cannot know which
                recent_strings.append("<memo>")
    except UnsafeArtifact:
        raise
    except Exception as err:
        raise UnsafeArtifact(f"pickle stream is malformed or truncated ({err}); refused") from err
    return found


def check_pickle(data: bytes, where: str) -> list[str]:
    names = pickle_globals(data)
    bad = sorted({n for n in names if not _is_allowed_global(n)})
    if bad:
        raise UnsafeArtifact(
            f"{where} imports {', '.join(bad)}: a pickle that can execute code; refused "
            "without loading. Export the weights as safetensors or the model as TorchScript."
        )
    return names


def _looks_like_pickle(data: bytes) -> bool:
    # protocol 2+ starts with PROTO (0x80, version); protocols 0-1 with MARK, GLOBAL, etc.
    if data[0] == 0x80 and len(data) > 1 and data[1] <= 5:
        return True
    return data[:1] in (b"(", b"c", b"]", b"}", b"I", b"N", b"\x8c")


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return 2 <= header_len <= len(data) - 8 and data[8:9] == b"{"


def check_safetensors(data: bytes) -> None:
    (header_len,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidInput(f"safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise InvalidInput("safetensors header is not a JSON object")
    body = len(data) - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or "data_offsets" not in info:
            raise InvalidInput(f"safetensors entry {name!r} has no data_offsets")
        start, end = info["data_offsets"]
        if not (0 <= start <= end <= body):
            raise InvalidInput(
                f"safetensors entry {name!r} points past the end of the file "
                "(truncated or corrupt)"
            )


def scan_model_bytes(data: bytes, max_bytes: int = 1 << 30) -> ScanResult:
    """Classify ``data`` or raise ``UnsafeArtifact``/``InvalidInput`` with the reason."""
    if not data:
        raise InvalidInput("model file is empty")
    if len(data) > max_bytes:
        raise InvalidInput(f"model file is {len(data)} bytes; the limit is {max_bytes}")
    if _looks_like_pickle(data):
        names = pickle_globals(data)
        bad = sorted({n for n in names if not _is_allowed_global(n)})
        reason = f"imports {', '.join(bad)}" if bad else "a pickle can execute code when loaded"
        raise UnsafeArtifact(
            f"model file is a raw pickle ({reason}); refused without loading. "
            "Submit safetensors weights with --arch, or a TorchScript file."
        )
    if data[:4] == b"PK\x03\x04":
        return _scan_zip(data)
    if _looks_like_safetensors(data):
        check_safetensors(data)
        return ScanResult(SAFETENSORS)
    raise InvalidInput(
        "model file is neither safetensors, TorchScript nor a torch.save archive "
        "(corrupt, truncated or another format)"
    )


def _scan_zip(data: bytes) -> ScanResult:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise InvalidInput(f"model archive is not a readable zip ({err}); truncated?") from err
    details: list[str] = []
    total = sum(info.file_size for info in archive.infolist())
    if total > 4 * len(data) + (64 << 20):
        raise UnsafeArtifact("zip expands far beyond its size (zip bomb?); refused")
    for name in names:
        if name.startswith("/") or ".." in name.split("/"):
            raise UnsafeArtifact(f"zip entry {name!r} escapes the archive; refused")
    has_code = any("/code/" in n or n.startswith("code/") for n in names)
    pickles = [n for n in names if n.endswith(".pkl")]
    if not pickles:
        raise InvalidInput("zip archive holds no TorchScript or torch.save model")
    for name in pickles:
        try:
            payload = archive.read(name)
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise InvalidInput(f"zip entry {name!r} is corrupt ({err})") from err
        globals_ = check_pickle(payload, f"archive entry {name!r}")
        details.append(f"{name}: {len(globals_)} globals, all allowed")
    for name in names:
        if name.endswith((".zip", ".pt", ".pth")) or name.endswith("pickle"):
            raise UnsafeArtifact(f"archive nests another archive or pickle ({name!r}); refused")
    return ScanResult(TORCHSCRIPT if has_code else TORCH_ZIP, details)
