"""Inspect an untrusted model file *before* anything parses it as a model.

Nothing here unpickles or imports anything a file names. ``scan_model_bytes`` sniffs the
format (`modelguard.formats.registry`: a raw pickle is refused there) and runs that format's
full scan. Pickle streams go through the symbolic machine of `modelguard.formats.pickles`.

Zip archives (TorchScript and ``torch.save``; torch.export archives share the structure
checks, `open_zip`, and add their own in `modelguard.formats.torch_export`) are checked for
structure before any entry is read: one top-level folder, only the entry names torch
writes, no duplicate, absolute or ``..`` names, no encryption, no overlapping entries, a
bounded number of entries and a bounded expansion (zip bombs); every pickle inside is
analysed; any other entry that is itself a zip or a pickle stream is refused (nested
payloads); TorchScript code may only call the standard operator namespaces.

A refused file raises ``UnsafeArtifact`` with a reason naming what was found, or
``InvalidInput`` for corrupt, truncated, oversized or unknown files. The scanner never
raises anything else.
"""

from __future__ import annotations

import io
import itertools
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from modelguard.errors import InvalidInput, ModelGuardError, UnsafeArtifact
from modelguard.formats.base import ScanResult
from modelguard.formats.pickles import (
    FORBIDDEN_TORCH,
    MAX_PICKLE_BYTES,
    MAX_PICKLE_OPS,
    MAX_STACK,
    SAFE_CALLABLES,
    SAFE_GLOBAL_PREFIXES,
    TORCHSCRIPT_CALLABLES,
    TORCHSCRIPT_CLASS_PREFIX,
    PickleReport,
    check_pickle,
    inspect_pickle,
    looks_like_pickle,
    parses_as_pickle,
    pickle_globals,
)
from modelguard.formats.registry import sniff

__all__ = [  # the pickle API stays importable from here, where it always lived
    "FORBIDDEN_TORCH",
    "MAX_PICKLE_BYTES",
    "MAX_PICKLE_OPS",
    "MAX_STACK",
    "SAFE_CALLABLES",
    "SAFE_GLOBAL_PREFIXES",
    "TORCHSCRIPT_CALLABLES",
    "TORCHSCRIPT_CLASS_PREFIX",
    "PickleReport",
    "ScanResult",
    "ZipScan",
    "check_pickle",
    "inspect_pickle",
    "is_zip",
    "open_zip",
    "pickle_globals",
    "read_entry",
    "scan_model_bytes",
    "scan_zip",
    "zip_holds_code",
    "zip_holds_program",
    "zip_names",
]

MAX_ZIP_ENTRIES = 65_536
#: An entry may expand at most this much (torch stores its entries uncompressed).
MAX_COMPRESSION_RATIO = 200
TORCHSCRIPT_OP_NAMESPACES = frozenset({"aten", "prim", "quantized", "prepacked", "_quantized"})

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x01\x02", b"PK\x07\x08")


def scan_model_bytes(data: bytes, max_bytes: int = 1 << 30) -> ScanResult:
    """Sniff the format of ``data`` and run its scan; raise ``UnsafeArtifact``/
    ``InvalidInput`` with the reason. ``ScanResult.kind`` is the format's registry name."""
    if not data:
        raise InvalidInput("model file is empty")
    if len(data) > max_bytes:
        raise InvalidInput(f"model file is {len(data)} bytes; the limit is {max_bytes}")
    try:
        data = bytes(data)
        return sniff(data).scan(data)
    except ModelGuardError:
        raise
    except Exception as err:  # the scanner must never crash on hostile bytes
        raise InvalidInput(
            f"model file could not be parsed ({type(err).__name__}: {err}); corrupt?"
        ) from err


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


def open_zip(data: bytes) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The archive and its entries once the structure checks passed (names, duplicates,
    encryption, compression, zip bombs, overlaps); nothing is read yet. Shared by every
    zip-based format."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        return archive, list(_iter_checked(archive, len(data)))
    except ModelGuardError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as err:
        raise InvalidInput(f"model archive is not a readable zip ({err}); truncated?") from err


def read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
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
    report = parses_as_pickle(payload) if looks_like_pickle(payload) else None
    if report is not None and (report.globals or report.calls):
        found = ", ".join(dict.fromkeys(report.globals)) or "calls"
        return f"a nested pickle importing {found}"
    return None


@dataclass(frozen=True)
class ZipScan:
    """A torch zip archive that passed the scan: whether it holds TorchScript (code or
    constants) and what was inspected."""

    script: bool
    details: list[str] = field(default_factory=list)


def scan_zip(data: bytes) -> ZipScan:
    """Full scan of a TorchScript or ``torch.save`` archive (both formats share it)."""
    archive, infos = open_zip(data)
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
    script = _holds_code(relative.values())
    details: list[str] = []
    for info in infos:
        if info.is_dir():
            continue
        rel = relative[info.filename]
        if _PICKLE_ENTRIES.fullmatch(rel):
            payload = read_entry(archive, info)
            globals_ = check_pickle(payload, f"archive entry {info.filename!r}", torchscript=script)
            details.append(f"{info.filename}: {len(globals_)} globals, all allowed")
        elif rel.startswith("code/") and rel.endswith(".py"):
            _check_code(info.filename, read_entry(archive, info))
        elif info.file_size > 0:
            head = read_entry(archive, info) if info.file_size <= (64 << 20) else b""
            reason = _nested_payload(head) if head else None
            if reason:
                raise UnsafeArtifact(f"archive entry {info.filename!r} is {reason}; refused")
    return ZipScan(script, details)


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


def _holds_code(relative_names: Iterable[str]) -> bool:
    """Whether an archive's entries (names below its folder) make it TorchScript."""
    names = list(relative_names)
    return any(n.startswith("code/") for n in names) or "constants.pkl" in names


def is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def zip_holds_code(data: bytes) -> bool:
    """Whether the zip's central directory names TorchScript entries (``code/``,
    ``constants.pkl``) and it is not a torch.export program (`zip_holds_program`): reads
    entry names only and never raises (False for anything unreadable, which `scan_zip`
    then explains)."""
    files = _folder_files(data)
    return files is not None and _holds_code(files) and not _holds_program(files)


def zip_holds_program(data: bytes) -> bool:
    """Whether the zip's central directory names a ``torch.export.save`` archive: an
    ``archive_format`` or ``models/*.json`` entry below its folder, or the older layout's
    ``serialized_exported_program.json``. Entry names only, never raises."""
    names = zip_names(data)
    if names is None:
        return False
    if "serialized_exported_program.json" in names:
        return True
    files = _folder_files(data, names)
    return files is not None and _holds_program(files)


def _holds_program(relative_names: Iterable[str]) -> bool:
    return any(
        n == "archive_format" or (n.startswith("models/") and n.endswith(".json"))
        for n in relative_names
    )


def _folder_files(data: bytes, names: list[str] | None = None) -> list[str] | None:
    """The names of the files below the archive's top-level folder(s), folder removed."""
    names = zip_names(data) if names is None else names
    if names is None:
        return None
    files = [n for n in names if not n.endswith("/")]
    return [n.split("/", 1)[1] for n in files if "/" in n]


def zip_names(data: bytes) -> list[str] | None:
    """The entry names of the zip's central directory, at most ``MAX_ZIP_ENTRIES`` of
    them; None for anything unreadable. Never raises.

    A hand-rolled walk rather than ``zipfile.ZipFile``: that parses the whole central
    directory, whatever its size, before any limit applies, and the scan does it again."""
    try:
        return _central_directory_names(data)
    except (struct.error, IndexError, UnicodeDecodeError):
        return None


def _central_directory_names(data: bytes) -> list[str] | None:
    # Located as zipfile does: the last end record within the final 64 KiB, the zip64
    # record (locator, then record) right before it when present, and the directory right
    # before those records, whatever offset they claim.
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - (22 + 0xFFFF)))
    if end < 0 or end + 22 > len(data):
        return None
    (size,) = struct.unpack_from("<I", data, end + 12)
    start = end
    record = end - 20 - 56  # a zip64 record (56 bytes) and its locator (20)
    if record >= 0 and data[record : record + 4] + data[end - 20 : end - 16] == (
        b"PK\x06\x06PK\x06\x07"
    ):
        (size,) = struct.unpack_from("<Q", data, record + 40)
        start = record
    position = start - size
    if position < 0:
        return None
    names: list[str] = []
    while data[position : position + 4] == b"PK\x01\x02":
        if len(names) >= MAX_ZIP_ENTRIES:
            return None
        flags, name_len, extra_len, comment_len = (
            struct.unpack_from("<H", data, position + 8)[0],
            *struct.unpack_from("<HHH", data, position + 28),
        )
        raw = data[position + 46 : position + 46 + name_len]
        name = raw.decode("utf-8" if flags & 0x800 else "cp437")
        names.append(name.split("\x00", 1)[0])
        position += 46 + name_len + extra_len + comment_len
    return names
