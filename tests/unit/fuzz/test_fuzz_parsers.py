"""Fuzzing of the model, dataset and artifact parsers.

Valid seeds (lenet5 as safetensors, TorchScript, ``torch.save`` and torch.export zips,
ONNX; npz datasets; a carrier, a mapper and a reversed-trigger artifact; raw pickles,
some of them hostile) are mutated blindly (bit flips, interesting integers, truncation,
insertion, deletion, duplication) and with structure (safetensors headers with lying
lengths, shapes, dtypes and offsets; zip archives rebuilt with mutated entries,
renamed/added/duplicated entries, other compression methods, patched central directories;
pickle streams edited opcode by opcode; ``.npy`` headers with odd dtypes and huge shapes;
declared input specs).

Every call runs in a child process (`tests.unit.fuzz.IsolatedRunner`): the only outcome
allowed besides success is ``modelguard.errors.InvalidInput`` (``UnsafeArtifact`` included).
Any other exception, a crash of the child, a call longer than the per-call deadline, or
a hostile pickle that gets executed (its ``os.mkdir`` marker appears) is a failure; each
test reports every distinct failure it met with the smallest input that triggered it.

Budget: ``MODELGUARD_FUZZ_EXAMPLES`` (examples per target), ``MODELGUARD_FUZZ_SEED``.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import os
import pickletools
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, seed
from hypothesis import strategies as st
from safetensors.torch import save as torch_save_safetensors

from modelguard.carrier.carrier import carrier_from_safetensors
from modelguard.datasets import load_npz
from modelguard.detection.triggers import load_triggers
from modelguard.errors import InvalidInput
from modelguard.formats.loader import load_model
from modelguard.spec import InputSpec
from tests.unit.fuzz import (
    MARKER_PATH,
    IsolatedRunner,
    Outcome,
    Seeds,
    Tally,
    fuzz_seed,
    fuzz_settings,
    register_summary,
    seeds,
    tally,
)

pytestmark = pytest.mark.timeout(300)

MNIST = {"shape": (1, 28, 28), "value_range": (0.0, 1.0)}
#: Per-call deadline in the child: a parser that takes longer on a < 1 MB input hangs.
CALL_DEADLINE_S = 20.0

Sample = tuple[bytes, str]  # (input bytes, how it was made)


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def marker() -> Iterator[Path]:
    if MARKER_PATH.exists():
        MARKER_PATH.rmdir()
    yield MARKER_PATH
    if MARKER_PATH.exists():
        MARKER_PATH.rmdir()


@pytest.fixture(scope="module")
def seed_artifacts() -> Seeds:
    return seeds()


@pytest.fixture(scope="module")
def runner(request: pytest.FixtureRequest) -> Iterator[IsolatedRunner]:
    register_summary(request.config)
    isolated = IsolatedRunner(timeout=CALL_DEADLINE_S)
    yield isolated
    isolated.close()


def check(
    record: Tally, runner: IsolatedRunner, marker: Path, sample: Sample, target: str, **kw: Any
) -> Outcome:
    """Run one case and record any failure under a signature naming the bug's place."""
    data, recipe = sample
    outcome = runner.run(target, data, **kw)
    record.case(outcome.seconds, outcome.kind)
    described = f"{recipe} ({len(data)} bytes){' ' + repr(kw) if kw else ''}"
    if outcome.kind == "error":
        signature = f"{outcome.exc_type} at {outcome.location}"
        record.fail(signature, described, len(data), outcome.trace)
    elif outcome.kind in ("crash", "hang"):
        record.fail(f"{outcome.kind}: {outcome.message}", described, len(data))
    if marker.exists():
        record.fail("a hostile pickle was EXECUTED (its os.mkdir marker exists)", described, 0)
        marker.rmdir()
    return outcome


# --------------------------------------------------------------------------------------
# Blind byte mutations
# --------------------------------------------------------------------------------------

INTERESTING = (
    0, 1, 2, 8, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40,
    (1 << 63) - 1, (1 << 64) - 1,
)  # fmt: skip
MAGICS = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"\x80\x02", b"\x93NUMPY", b"{", b"\x00" * 8)


def hot_positions(data: bytes) -> list[int]:
    """Offsets where the format's structure lives: safetensors header, zip local and
    central headers and the end record, pickle entries, npy headers."""
    hot: list[int] = []
    if len(data) >= 8 and data[:4] != b"PK\x03\x04":
        (length,) = struct.unpack("<Q", data[:8])
        hot.extend(range(0, min(len(data), 8 + min(length, 4096))))
    for magic in (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"\x93NUMPY"):
        start = data.find(magic)
        while start != -1 and len(hot) < 20000:
            hot.extend(range(start, min(len(data), start + 46)))
            start = data.find(magic, start + 1)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if info.filename.endswith(".pkl"):
                    begin = info.header_offset + 30 + len(info.filename) + len(info.extra)
                    hot.extend(range(begin, min(len(data), begin + info.compress_size)))
    except Exception:
        pass
    return sorted(set(hot)) or [0]


@st.composite
def mutated(draw: st.DrawFn, named: list[tuple[str, bytes]]) -> Sample:
    name, original = draw(st.sampled_from(named))
    hot = _hot_cache(original)
    data = bytearray(original)
    ops: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        size = len(data)
        if size == 0:
            data += draw(st.binary(min_size=1, max_size=16))
            ops.append("refill")
            continue
        pos = draw(st.one_of(st.integers(0, size - 1), st.sampled_from(hot))) % size
        kind = draw(
            st.sampled_from(["flip", "byte", "int", "truncate", "insert", "delete", "dup", "magic"])
        )
        if kind == "flip":
            bit = draw(st.integers(0, 7))
            data[pos] ^= 1 << bit
            ops.append(f"flip@{pos}:{bit}")
        elif kind == "byte":
            value = draw(st.integers(0, 255))
            data[pos] = value
            ops.append(f"byte@{pos}={value:#x}")
        elif kind == "int":
            value = draw(st.sampled_from(INTERESTING))
            width = draw(st.sampled_from([1, 2, 4, 8]))
            order = draw(st.sampled_from(["little", "big"]))
            encoded = (value & ((1 << (8 * width)) - 1)).to_bytes(width, order)  # type: ignore[arg-type]
            data[pos : pos + width] = encoded
            ops.append(f"int@{pos}={value:#x}/{width}{order[0]}")
        elif kind == "truncate":
            del data[pos:]
            ops.append(f"truncate@{pos}")
        elif kind == "insert":
            blob = draw(st.binary(min_size=1, max_size=32))
            data[pos:pos] = blob
            ops.append(f"insert@{pos}:{blob.hex()}")
        elif kind == "delete":
            length = draw(st.integers(1, 64))
            del data[pos : pos + length]
            ops.append(f"delete@{pos}+{length}")
        elif kind == "dup":
            length = draw(st.integers(1, 256))
            data[pos:pos] = data[pos : pos + length]
            ops.append(f"dup@{pos}+{length}")
        else:
            magic = draw(st.sampled_from(MAGICS))
            data[pos : pos + len(magic)] = magic
            ops.append(f"magic@{pos}={magic!r}")
    return bytes(data), f"{name} with {', '.join(ops)}"


_HOT: dict[int, list[int]] = {}


def _hot_cache(data: bytes) -> list[int]:
    key = hash(data)
    if key not in _HOT:
        _HOT[key] = hot_positions(data)
    return _HOT[key]


def random_bytes() -> st.SearchStrategy[Sample]:
    prefixes = st.sampled_from([b"", *MAGICS, b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
    return st.tuples(prefixes, st.binary(max_size=512)).map(
        lambda p: (p[0] + p[1], f"random bytes after prefix {p[0]!r}")
    )


# --------------------------------------------------------------------------------------
# Structure-aware: safetensors
# --------------------------------------------------------------------------------------

DTYPES = st.sampled_from(
    ["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "U64", "BOOL", "C64", "F8_E4M3",
     "F8_E8M0", "f32", "", "F128", "OBJ"]
) | st.sampled_from([None, 1, [], {}])  # fmt: skip
HUGE_DIMS = [0, 1, 2, 6, 28, -1, 1 << 31, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 64]
SHAPES = st.one_of(
    st.lists(st.sampled_from(HUGE_DIMS), max_size=5),
    st.sampled_from([None, "6", [1.5], [True], [[1]], {}, ["1"]]),
)
JSON_JUNK = st.sampled_from([None, 0, -1, 1.5, "x", [], [1, 2], {}, {"dtype": "F32"}, True])


def _split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _first_offset(entry: dict[str, Any]) -> int:
    offsets = entry.get("data_offsets")
    if isinstance(offsets, list) and offsets and isinstance(offsets[0], int):
        return int(offsets[0])
    return 0


@st.composite
def crafted_safetensors(draw: st.DrawFn, named: list[tuple[str, bytes]]) -> Sample:
    name, original = draw(st.sampled_from(named))
    header, body = _split_safetensors(original)
    header = copy.deepcopy(header)
    tensors = sorted(k for k in header if k != "__metadata__")
    ops: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(tensors))
        kind = draw(
            st.sampled_from(
                ["dtype", "shape", "offsets", "drop", "rename", "metadata", "entry", "empty",
                 "scalar", "swap"]
            )
        )  # fmt: skip
        entry = header.get(target)
        if not isinstance(entry, dict):
            continue
        if kind == "dtype":
            entry["dtype"] = draw(DTYPES)
        elif kind == "shape":
            entry["shape"] = draw(SHAPES)
        elif kind == "offsets":
            entry["data_offsets"] = draw(
                st.one_of(
                    st.lists(st.sampled_from([0, 1, len(body), len(body) + 1, -1, 1 << 64,
                                              (1 << 63) - 1]), max_size=3),
                    JSON_JUNK,
                )
            )  # fmt: skip
        elif kind == "drop":
            del header[target]
        elif kind == "rename":
            header[draw(st.text(max_size=12))] = header.pop(target)
        elif kind == "metadata":
            header["__metadata__"] = draw(
                st.one_of(
                    JSON_JUNK,
                    st.dictionaries(st.text(max_size=12), st.text(max_size=12) | JSON_JUNK,
                                    max_size=4),
                )
            )  # fmt: skip
        elif kind == "entry":
            header[target] = draw(JSON_JUNK)
        elif kind == "empty":  # zero elements, any claimed size: no bytes needed
            start = _first_offset(entry)
            entry["shape"] = [draw(st.sampled_from(HUGE_DIMS[1:])), 0]
            entry["data_offsets"] = [start, start]
        elif kind == "scalar":  # a 0-d tensor of the same dtype
            start = _first_offset(entry)
            width = {"F32": 4, "I64": 8, "F64": 8}.get(str(entry.get("dtype")), 4)
            entry["shape"] = []
            entry["data_offsets"] = [start, start + width]
        else:
            other = draw(st.sampled_from(tensors))
            if isinstance(header.get(other), dict):
                header[target], header[other] = header[other], entry
        ops.append(f"{kind}({target})")
    text = json.dumps(header)
    layout = draw(st.sampled_from(["plain", "duplicate-key", "deep", "not-object", "pad"]))
    if layout == "duplicate-key" and tensors:
        text = (
            "{"
            + json.dumps(tensors[0])
            + ':{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
            + text[1:]
        )
    elif layout == "deep":
        text = '{"__metadata__":' + "[" * 5000 + "]" * 5000 + "," + text[1:]
    elif layout == "not-object":
        text = json.dumps([header])
    elif layout == "pad":
        text = text + " " * draw(st.integers(0, 9))
    raw = text.encode()
    length = draw(
        st.one_of(
            st.just(len(raw)),
            st.sampled_from(
                [0, 1, len(raw) - 1, len(raw) + 1, len(raw) + len(body) + 1, (100 << 20) + 1,
                 (1 << 63), (1 << 64) - 1]
            ),
        )
    )  # fmt: skip
    tail = draw(st.sampled_from(["body", "truncated", "extended", "none"]))
    if tail == "truncated":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif tail == "extended":
        body = body + b"\x00" * draw(st.integers(1, 64))
    elif tail == "none":
        body = b""
    ops.append(f"layout={layout} length={length} body={tail}")
    return struct.pack(
        "<Q", max(0, length) % (1 << 64)
    ) + raw + body, f"{name} with {', '.join(ops)}"


TENSOR_EDITS = ("rank1", "rank0", "empty-huge", "dtype", "nan", "inf", "drop", "extra",
                "rename", "transpose", "metadata-drop", "metadata-set")  # fmt: skip
METADATA_VALUES = st.sampled_from(
    ["", "-1", "0", "1", "2147483648", "99999999999999999999", "1e3", "nan", "x", " 7", "\u0661"]
)


@st.composite
def crafted_state(draw: st.DrawFn, named: list[tuple[str, bytes]]) -> Sample:
    """A well-formed safetensors file whose *content* is odd: tensors of another rank,
    dtype or size (including zero-element tensors claiming 2**40 rows), NaN/Inf values,
    missing, extra or renamed tensors, edited metadata. Reaches the code behind the
    format checks."""
    from safetensors.numpy import load as numpy_load
    from safetensors.numpy import save as numpy_save

    name, original = draw(st.sampled_from(named))
    tensors = dict(numpy_load(original))
    header, _body = _split_safetensors(original)
    metadata = dict(header.get("__metadata__") or {})
    ops: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(tensors) or ["none"]))
        kind = draw(st.sampled_from(TENSOR_EDITS))
        array = tensors.get(key)
        if kind.startswith("metadata"):
            meta_key = draw(st.sampled_from(sorted(metadata) or ["format"]))
            if kind == "metadata-drop":
                metadata.pop(meta_key, None)
            else:
                metadata[meta_key] = draw(METADATA_VALUES)
            ops.append(f"{kind}({meta_key}={metadata.get(meta_key)!r})")
            continue
        if array is None:
            continue
        if kind == "rank1":
            tensors[key] = array.reshape(-1)
        elif kind == "rank0" and array.size:
            tensors[key] = np.asarray(array.reshape(-1)[:1].reshape(()))
        elif kind == "empty-huge":
            tensors[key] = np.zeros((draw(st.sampled_from([2**31, 2**40])), 0), array.dtype)
        elif kind == "dtype":
            target = draw(st.sampled_from(["float16", "float64", "int8", "int64", "bool", "uint8"]))
            with np.errstate(all="ignore"):
                tensors[key] = array.astype(target)
        elif kind in ("nan", "inf"):
            if array.size and np.issubdtype(array.dtype, np.floating):
                changed = array.copy()
                changed.flat[draw(st.integers(0, array.size - 1))] = (
                    np.nan if kind == "nan" else np.inf
                )
                tensors[key] = changed
        elif kind == "drop":
            del tensors[key]
        elif kind == "extra":
            tensors[draw(st.sampled_from(["extra", "fc0.weight", "__metadata__x"]))] = array
        elif kind == "rename":
            tensors[draw(st.text(min_size=1, max_size=8))] = tensors.pop(key)
        elif kind == "transpose" and array.ndim >= 2:
            tensors[key] = np.ascontiguousarray(array.T)
        ops.append(f"{kind}({key})")
    data = numpy_save(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata or None
    )
    return data, f"{name} rewritten: {', '.join(ops)}"


# --------------------------------------------------------------------------------------
# Structure-aware: pickles and zip archives
# --------------------------------------------------------------------------------------

HOSTILE_GLOBALS = (
    b"cposix\nmkdir\n", b"cos\nsystem\n", b"cbuiltins\neval\n", b"c__builtin__\nexec\n",
    b"ctorch.serialization\nload\n", b"ctorch._C\n_load_for_lite_interpreter\n",
    b"ctorch._utils\n_rebuild_tensor_v2\n", b"c__torch__.x\ny\n", b"ccollections\nOrderedDict\n",
    b"ctorch\nFloatStorage\n", b"c__torch__\n\n", b"ctorch.jit._pickle\nbuild_intlist\n",
)  # fmt: skip
PICKLE_OPS = (
    b"(", b"t", b"R", b"b", b"0", b"2", b"N", b"\x85", b"\x86", b"\x87", b"\x93", b"\x94",
    b"h\x00", b"q\x07", b"j\xff\xff\xff\x7f", b"J\xff\xff\xff\x7f", b"X\xff\xff\xff\x7fab",
    b"\x8c\x05posix\x8c\x05mkdir", b"}", b"]", b"e", b"s", b"u", b"Q", b"P0\n", b".",
    b"\x81", b"\x92", b"o", b"i__main__\nX\n",
)  # fmt: skip


def pickle_chunks(data: bytes) -> list[bytes]:
    try:
        positions = [pos for _op, _arg, pos in pickletools.genops(data)]
    except Exception:
        return [data[i : i + 1] for i in range(len(data))] or [b"."]
    positions = [p for p in positions if p is not None] + [len(data)]
    return [data[a:b] for a, b in itertools.pairwise(positions)] or [b"."]


@st.composite
def mutated_pickle(draw: st.DrawFn, original: bytes) -> tuple[bytes, str]:
    chunks = pickle_chunks(original)
    ops: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(chunks) - 1))
        kind = draw(st.sampled_from(["global", "insert", "delete", "dup", "swap", "bytes"]))
        if kind == "global":
            replacement = draw(st.sampled_from(HOSTILE_GLOBALS))
            globals_at = [i for i, c in enumerate(chunks) if c[:1] in (b"c", b"\x93", b"i")]
            at = draw(st.sampled_from(globals_at)) if globals_at else index
            chunks[at] = replacement
            ops.append(f"global@{at}={replacement!r}")
        elif kind == "insert":
            op = draw(st.sampled_from(PICKLE_OPS))
            chunks.insert(index, op)
            ops.append(f"insert@{index}={op!r}")
        elif kind == "delete" and len(chunks) > 1:
            del chunks[index]
            ops.append(f"delete@{index}")
        elif kind == "dup":
            chunks.insert(index, chunks[index])
            ops.append(f"dup@{index}")
        elif kind == "swap":
            other = draw(st.integers(0, len(chunks) - 1))
            chunks[index], chunks[other] = chunks[other], chunks[index]
            ops.append(f"swap@{index},{other}")
        else:
            chunk = bytearray(chunks[index])
            if chunk:
                at = draw(st.integers(0, len(chunk) - 1))
                chunk[at] = draw(st.integers(0, 255))
                chunks[index] = bytes(chunk)
                ops.append(f"byte@{index}.{at}")
    return b"".join(chunks), "pickle ops " + ", ".join(ops)


def _entries(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


@st.composite
def crafted_zip(draw: st.DrawFn, named: list[tuple[str, bytes]], marker: str) -> Sample:
    """A torch archive rebuilt with valid CRCs after mutating its entries, so the
    mutations reach the pickle scanner and torch's own readers."""
    name, original = draw(st.sampled_from(named))
    entries = list(_entries(original))
    prefix = entries[0][0].split("/", 1)[0]
    methods = {n: zipfile.ZIP_STORED for n, _ in entries}
    ops: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(entries) - 1))
        entry_name, payload = entries[index]
        kind = draw(
            st.sampled_from(
                ["pickle", "pickle", "pickle", "code", "bytes", "truncate", "rename", "drop",
                 "add", "compress", "duplicate"]
            )
        )  # fmt: skip
        if kind == "pickle":
            pickles = [i for i, (n, _) in enumerate(entries) if n.endswith(".pkl")]
            index = draw(st.sampled_from(pickles)) if pickles else index
            entry_name, payload = entries[index]
            payload, how = draw(mutated_pickle(payload))
            entries[index] = (entry_name, payload)
            ops.append(f"{entry_name}: {how}")
        elif kind == "code":
            sources = [i for i, (n, _) in enumerate(entries) if n.endswith(".py")]
            if not sources:
                continue
            index = draw(st.sampled_from(sources))
            entry_name, payload = entries[index]
            text = payload.decode("utf-8", "replace")
            snippet = draw(
                st.sampled_from(
                    ["ops.evil.run(x)", "torch.ops.aten.relu(", ")))", "\x00", "import os\n",
                     "def forward(self):\n  return 1\n", "\udcff", "__torch__.x.y", "1/0"]
                )
            )  # fmt: skip
            at = draw(st.integers(0, len(text)))
            payload = (text[:at] + snippet + text[at:]).encode("utf-8", "surrogateescape")
            entries[index] = (entry_name, payload)
            ops.append(f"{entry_name}: code insert {snippet!r}@{at}")
        elif kind == "bytes":
            blob = bytearray(payload)
            if blob:
                at = draw(st.integers(0, len(blob) - 1))
                blob[at] = draw(st.integers(0, 255))
            entries[index] = (entry_name, bytes(blob))
            ops.append(f"{entry_name}: byte@{len(blob) and at}")
        elif kind == "truncate":
            cut = draw(st.integers(0, max(0, len(payload) - 1)))
            entries[index] = (entry_name, payload[:cut])
            ops.append(f"{entry_name}: truncate@{cut}")
        elif kind == "rename":
            new = draw(
                st.sampled_from(
                    [f"{prefix}/../evil", f"/{prefix}/data.pkl", "other/data.pkl",
                     f"{prefix}/data/../../x", f"{prefix}/extra/x", f"{prefix}\\data.pkl",
                     f"{prefix}/data/999", f"{prefix}/code/__torch__/evil.py", "/",
                     f"{prefix}/data.pkl"]
                )
            )  # fmt: skip
            entries[index] = (new, payload)
            methods.setdefault(new, zipfile.ZIP_STORED)
            ops.append(f"rename {entry_name}->{new}")
        elif kind == "drop" and len(entries) > 1:
            del entries[index]
            ops.append(f"drop {entry_name}")
        elif kind == "add":
            import pickle

            from tests.unit.fuzz import _MkdirPayload

            nested = io.BytesIO()
            with zipfile.ZipFile(nested, "w") as inner:
                inner.writestr("a/data.pkl", pickle.dumps(_MkdirPayload(marker)))
            added = draw(
                st.sampled_from(
                    [
                        (f"{prefix}/data/77", nested.getvalue()),
                        (f"{prefix}/data/78", pickle.dumps(_MkdirPayload(marker), protocol=2)),
                        (f"{prefix}/extra/note", b"\x1f\x8b\x08\x00"),
                        (f"{prefix}/constants.pkl", pickle.dumps(_MkdirPayload(marker))),
                        (f"{prefix}/code/__torch__/x.py", b"def f(x):\n  return ops.evil.f(x)\n"),
                        (f"{prefix}/bytecode.pkl", b"\x80\x02]q\x00."),
                    ]
                )
            )
            entries.append(added)
            methods.setdefault(added[0], zipfile.ZIP_STORED)
            ops.append(f"add {added[0]}")
        elif kind == "compress":
            method = draw(
                st.sampled_from([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
            )
            methods[entry_name] = method
            ops.append(f"compress {entry_name} method {method}")
        else:
            entries.append((entry_name, payload))
            ops.append(f"duplicate {entry_name}")
    out = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point
        with zipfile.ZipFile(out, "w") as archive:
            for entry_name, payload in entries:
                info = zipfile.ZipInfo(entry_name)
                info.compress_type = methods.get(entry_name, zipfile.ZIP_STORED)
                archive.writestr(info, payload)
    data = bytearray(out.getvalue())
    if draw(st.integers(0, 3)) == 0:  # lie in the central directory or the end record
        central = [i for i in range(len(data) - 3) if data[i : i + 4] == b"PK\x01\x02"]
        end = data.rfind(b"PK\x05\x06")
        field = draw(
            st.sampled_from(
                [("cd", 20, 4), ("cd", 24, 4), ("cd", 42, 4), ("cd", 28, 2), ("end", 10, 2),
                 ("end", 12, 4), ("end", 16, 4)]
            )
        )  # fmt: skip
        value = draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFF, len(data)]))
        base = draw(st.sampled_from(central)) if field[0] == "cd" and central else end
        if base >= 0:
            width = field[2]
            data[base + field[1] : base + field[1] + width] = (
                value & ((1 << (8 * width)) - 1)
            ).to_bytes(width, "little")
            ops.append(f"patch {field[0]}+{field[1]}={value:#x}")
    return bytes(data), f"{name} rebuilt: {'; '.join(ops)}"


# --------------------------------------------------------------------------------------
# Structure-aware: npz / npy
# --------------------------------------------------------------------------------------

NPY_DESCRS = [
    "<f4", "<f8", "<f2", ">f4", "<i8", "<i4", "<u8", "|b1", "|u1", "<c8", "|O", "<U3",
    "|V8", "[('a', '<f4')]", "<M8[s]", "garbage", "<f16",
]  # fmt: skip
NPY_SHAPES = [
    "(3, 1, 28, 28)", "(3, 28, 28)", "(3,)", "()", "(0, 1, 28, 28)", "(3, 1, 28)", "(-1,)",
    "(1099511627776, 1, 28, 28)", "(3, 1, 28, 28, 1)", "(2147483648, 2147483648)", "3",
    "(3, 1, 28, 28", "None", "(3.5,)",
]  # fmt: skip


def npy_bytes(descr: str, shape: str, fortran: str, payload: bytes, version: int) -> bytes:
    header = f"{{'descr': {descr if descr.startswith('[') else repr(descr)}, "
    header += f"'fortran_order': {fortran}, 'shape': {shape}, }}"
    length_size = 2 if version == 1 else 4
    total = 6 + 2 + length_size + len(header) + 1
    header += " " * ((64 - total % 64) % 64) + "\n"
    prefix = b"\x93NUMPY" + bytes([version, 0])
    packed = struct.pack("<H" if version == 1 else "<I", len(header) % (1 << (8 * length_size)))
    return prefix + packed + header.encode("latin-1") + payload


@st.composite
def crafted_npz(draw: st.DrawFn) -> Sample:
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    count = draw(st.sampled_from([0, 1, 3]))
    x = rng.random((count, 1, 28, 28), dtype=np.float32)
    special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf, 2.0, -1e30, 3e38]))
    if special is not None and count:
        x.flat[draw(st.integers(0, x.size - 1))] = special
    y_value = draw(st.sampled_from([0, 9, 10, -1, 2**31, 2**63 - 1]))
    y = np.full(count, y_value, dtype=np.int64)
    members: list[tuple[str, bytes]] = []
    ops: list[str] = [f"N={count} special={special} y={y_value}"]
    for key, array in (("x", x), ("y", y)):
        if draw(st.integers(0, 2)) == 0:
            descr = draw(st.sampled_from(NPY_DESCRS))
            shape = draw(st.sampled_from(NPY_SHAPES))
            fortran = draw(st.sampled_from(["False", "True", "1", "'no'"]))
            version = draw(st.sampled_from([1, 2, 3, 1, 9]))
            payload = array.tobytes()
            cut = draw(st.sampled_from(["all", "half", "none", "extra"]))
            payload = {"all": payload, "half": payload[: len(payload) // 2], "none": b"",
                       "extra": payload + b"\x00" * 64}[cut]  # fmt: skip
            members.append((f"{key}.npy", npy_bytes(descr, shape, fortran, payload, version)))
            ops.append(f"{key}: descr={descr} shape={shape} fortran={fortran} v{version} {cut}")
        else:
            buffer = io.BytesIO()
            dtype = draw(st.sampled_from(["<f4", "<f8", "<i8", "<f2"])) if key == "x" else "<i8"
            with np.errstate(all="ignore"):
                np.save(buffer, array.astype(dtype), allow_pickle=False)
            members.append((f"{key}.npy", buffer.getvalue()))
    layout = draw(st.sampled_from(["plain", "missing-y", "extra", "duplicate", "no-suffix"]))
    if layout == "missing-y":
        members = members[:1]
    elif layout == "extra":
        import pickle

        members.append(("z.npy", npy_bytes("|O", "(1,)", "False", pickle.dumps([1]), 1)))
    elif layout == "duplicate":
        members.append(members[0])
    elif layout == "no-suffix":
        members = [(n.removesuffix(".npy"), b) for n, b in members]
    compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    out = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(out, "w", compression) as archive:
            for member, payload in members:
                archive.writestr(member, payload)
    data = bytearray(out.getvalue())
    if compression == zipfile.ZIP_DEFLATED and draw(st.booleans()):
        # corrupt the deflate stream of the first member, keep every header intact
        start = 30 + len(members[0][0])
        at = start + draw(st.integers(0, 40))
        if at < len(data):
            data[at] ^= 0xFF
            ops.append(f"deflate byte@{at} inverted")
    ops.append(f"layout={layout} compression={compression}")
    return bytes(data), "crafted npz: " + "; ".join(ops)


# --------------------------------------------------------------------------------------
# Declared input specs
# --------------------------------------------------------------------------------------

#: Dimensions: small ones, and ones so large that an allocation they imply is refused at
#: once (never a moderately large one that would really eat gigabytes on a shared box).
SMALL_DIMS = st.sampled_from([-1, 0, 1, 2, 3, 11, 12, 28, 32])
HUGE_PLANES = st.sampled_from([(1 << 20, 1 << 20), (2**31 - 1, 2**31 - 1), (28, 2**31 - 1)])
CHANNELS = st.sampled_from([-1, 0, 1, 2, 3, 1 << 20, 2**31 - 1])
SPEC_FLOATS = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 255.0, float("nan"), float("inf"), float("-inf"), 1e38]),
    st.floats(width=32),
)


@st.composite
def declared_specs(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.integers(0, 3)) == 0:
        return dict(MNIST)
    mode = draw(st.sampled_from(["plane", "plane", "plane", "channels", "list"]))
    if mode == "plane":
        plane = draw(st.one_of(st.tuples(SMALL_DIMS, SMALL_DIMS), HUGE_PLANES))
        shape: tuple[int, ...] = (1, *plane)
    elif mode == "channels":
        shape = (draw(CHANNELS), 28, 28)
    else:
        shape = tuple(draw(st.lists(SMALL_DIMS, max_size=4)))
    valid_range = draw(st.integers(0, 3)) > 0
    low, high = (0.0, 1.0) if valid_range else draw(st.tuples(SPEC_FLOATS, SPEC_FLOATS))
    norm = draw(st.sampled_from([0, 0, 0, 1, 2, 3]))
    mean = tuple(draw(st.lists(SPEC_FLOATS, min_size=norm, max_size=norm))) if norm else ()
    std = tuple(draw(st.lists(SPEC_FLOATS, min_size=norm, max_size=norm))) if norm else ()
    return {"shape": shape, "value_range": (low, high), "mean": mean, "std": std}


# --------------------------------------------------------------------------------------
# Fuzz tests
# --------------------------------------------------------------------------------------


def run_fuzz(
    target_name: str,
    strategy: st.SearchStrategy[Any],
    budget: int,
    body: Callable[[Tally, Any], None],
) -> Tally:
    record = tally(target_name)

    @seed(fuzz_seed())
    @fuzz_settings(budget)
    @given(strategy)
    def fuzz(case: Any) -> None:
        body(record, case)

    fuzz()
    return record


def test_load_model_on_mutated_safetensors(
    runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path
) -> None:
    named = [("lenet5.safetensors", seed_artifacts.safetensors)]
    strategy = st.one_of(
        mutated(named), crafted_safetensors(named), crafted_state(named), crafted_state(named)
    )
    run_fuzz(
        "parser load_model/safetensors",
        strategy,
        150,
        lambda rec, s: check(rec, runner, marker, s, "load_model", spec_=MNIST, arch="lenet5"),
    ).check()


def test_load_model_on_mutated_torchscript(
    runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path
) -> None:
    named = [("lenet5.torchscript", seed_artifacts.torchscript)]
    strategy = st.one_of(mutated(named), crafted_zip(named, str(marker)))
    run_fuzz(
        "parser load_model/torchscript",
        strategy,
        100,
        lambda rec, s: check(rec, runner, marker, s, "load_model", spec_=MNIST),
    ).check()


def test_load_model_on_mutated_torch_save_zip(
    runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path
) -> None:
    named = [("lenet5.torch-zip", seed_artifacts.torch_zip)]
    strategy = st.one_of(mutated(named), crafted_zip(named, str(marker)))
    run_fuzz(
        "parser load_model/torch.save zip",
        strategy,
        100,
        lambda rec, s: check(rec, runner, marker, s, "load_model", spec_=MNIST, arch="lenet5"),
    ).check()


def test_load_model_on_mutated_torch_export(
    runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path
) -> None:
    named = [("lenet5.pt2", seed_artifacts.torch_export)]
    strategy = st.one_of(mutated(named), crafted_zip(named, str(marker)))
    run_fuzz(
        "parser load_model/torch.export",
        strategy,
        100,
        lambda rec, s: check(rec, runner, marker, s, "load_model", spec_=MNIST),
    ).check()


def test_load_model_on_mutated_onnx(
    runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path
) -> None:
    named = [("lenet5.onnx", seed_artifacts.onnx)]
    run_fuzz(
        "parser load_model/onnx",
        mutated(named),
        100,
        lambda rec, s: check(rec, runner, marker, s, "load_model", spec_=MNIST),
    ).check()


def test_load_model_on_pickles(runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path) -> None:
    pickles = st.sampled_from(list(seed_artifacts.pickles))
    strategy = st.one_of(
        pickles.map(lambda p: (p, "seed pickle")),
        pickles.flatmap(mutated_pickle),
        mutated([(f"pickle{i}", p) for i, p in enumerate(seed_artifacts.pickles)]),
    )
    run_fuzz(
        "parser load_model/pickle",
        strategy,
        80,
        lambda rec, s: check(rec, runner, marker, s, "load_model", spec_=MNIST, arch="lenet5"),
    ).check()


def test_scan_model_bytes_on_anything(
    runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path
) -> None:
    named = [
        ("lenet5.safetensors", seed_artifacts.safetensors),
        ("lenet5.torchscript", seed_artifacts.torchscript),
        ("lenet5.torch-zip", seed_artifacts.torch_zip),
        ("dataset.npz", seed_artifacts.npz),
        *((f"pickle{i}", p) for i, p in enumerate(seed_artifacts.pickles)),
        ("lenet5.pt2", seed_artifacts.torch_export),
        ("lenet5.onnx", seed_artifacts.onnx),
    ]
    strategy = st.one_of(
        mutated(named),
        random_bytes(),
        crafted_safetensors(named[:1]),
        crafted_zip(named[1:3], str(marker)),
        st.sampled_from(list(seed_artifacts.pickles)).flatmap(mutated_pickle),
    )
    run_fuzz(
        "parser scan_model_bytes",
        strategy,
        150,
        lambda rec, s: check(rec, runner, marker, s, "scan_model_bytes"),
    ).check()


def test_load_model_with_declared_specs(
    runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path
) -> None:
    weights = st.sampled_from(
        [
            (seed_artifacts.safetensors, "lenet5.safetensors", "lenet5"),
            (seed_artifacts.torch_zip, "lenet5.torch-zip", "lenet5"),
            (seed_artifacts.torchscript, "lenet5.torchscript", ""),
            (seed_artifacts.safetensors, "lenet5.safetensors as vgg_small", "vgg_small"),
            (seed_artifacts.safetensors, "lenet5.safetensors, unknown arch", "nope"),
        ]
    )

    def body(rec: Tally, case: Any) -> None:
        (data, name, arch), spec = case
        check(rec, runner, marker, (data, name), "load_model", spec_=spec, arch=arch)

    run_fuzz(
        "parser load_model/declared spec", st.tuples(weights, declared_specs()), 100, body
    ).check()


def test_load_npz(runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path) -> None:
    named = [
        ("dataset.npz", seed_artifacts.npz),
        ("dataset-compressed.npz", seed_artifacts.npz_compressed),
    ]
    samples = st.one_of(mutated(named), crafted_npz(), crafted_npz(), random_bytes())
    specs = st.one_of(st.just(MNIST), declared_specs())
    classes = st.sampled_from([None, 10, 1, 0, -1])

    def body(rec: Tally, case: Any) -> None:
        sample, spec, num_classes = case
        check(rec, runner, marker, sample, "load_npz", spec_=spec, num_classes=num_classes)

    run_fuzz("parser load_npz", st.tuples(samples, specs, classes), 150, body).check()


def test_carrier_parser(runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path) -> None:
    named = [("carrier.safetensors", seed_artifacts.carrier)]
    strategy = st.one_of(
        mutated(named), crafted_safetensors(named), crafted_state(named), crafted_state(named)
    )
    run_fuzz(
        "parser carrier_from_safetensors",
        strategy,
        100,
        lambda rec, s: check(rec, runner, marker, s, "carrier_from_safetensors"),
    ).check()


def test_mapper_parser(runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path) -> None:
    named = [("mapper.safetensors", seed_artifacts.mapper)]
    strategy = st.one_of(
        mutated(named), crafted_safetensors(named), crafted_state(named), crafted_state(named)
    )
    run_fuzz(
        "parser parse_mapper",
        strategy,
        100,
        lambda rec, s: check(rec, runner, marker, s, "parse_mapper"),
    ).check()


def test_trigger_parser(runner: IsolatedRunner, seed_artifacts: Seeds, marker: Path) -> None:
    named = [("triggers.safetensors", seed_artifacts.triggers)]
    samples = st.one_of(
        mutated(named), crafted_safetensors(named), crafted_state(named), crafted_state(named)
    )
    labels = st.one_of(st.none(), st.lists(st.sampled_from([0, 1, 9, 10, -1, 2**31]), max_size=3))

    def body(rec: Tally, case: Any) -> None:
        sample, wanted = case
        check(rec, runner, marker, sample, "load_triggers", labels=wanted)

    run_fuzz("parser load_triggers", st.tuples(samples, labels), 120, body).check()


# --------------------------------------------------------------------------------------
# The failures the fuzzing found, as plain regression tests (cheap, in-process; every
# allocation they provoke is far beyond any address space, so it fails at once)
# --------------------------------------------------------------------------------------


def _lenet_state(seed_artifacts: Seeds) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(seed_artifacts.safetensors)


def test_load_triggers_refuses_scalar_masks() -> None:
    data = torch_save_safetensors({"masks": torch.tensor(1.0), "patterns": torch.tensor(1.0)})
    with pytest.raises(InvalidInput):
        load_triggers(data, [0])


def test_load_triggers_refuses_fewer_patterns_than_masks() -> None:
    data = torch_save_safetensors(
        {"masks": torch.zeros(3, 4, 4), "patterns": torch.zeros(1, 1, 4, 4)}
    )
    with pytest.raises(InvalidInput):
        load_triggers(data, [2])


def test_carrier_parser_requires_the_public_model_metadata() -> None:
    metadata = {"format": "modelguard-carrier-v1", "top": "0", "left": "0", "height": "1",
                "width": "1", "generation": "1"}  # fmt: skip
    data = torch_save_safetensors({"carrier": torch.zeros(1, 2, 2)}, metadata=metadata)
    with pytest.raises(InvalidInput):
        carrier_from_safetensors(data)


@pytest.mark.parametrize(
    ("key", "tensor"),
    [("conv1.weight", torch.zeros(150)), ("fc3.weight", torch.tensor(1.0))],
    ids=["1-d input weight", "0-d classifier weight"],
)
def test_load_model_refuses_weights_of_the_wrong_rank(
    seed_artifacts: Seeds, key: str, tensor: torch.Tensor
) -> None:
    state = {**_lenet_state(seed_artifacts), key: tensor}
    with pytest.raises(InvalidInput):
        load_model(torch_save_safetensors(state), InputSpec((1, 28, 28)), "lenet5")


def test_load_model_refuses_an_absurd_class_count(seed_artifacts: Seeds) -> None:
    # zero elements, so the file is tiny, but 2**40 classes: fc3 alone would be 369 TB
    state = {**_lenet_state(seed_artifacts), "fc3.weight": torch.zeros(2**40, 0)}
    with pytest.raises(InvalidInput):
        load_model(torch_save_safetensors(state), InputSpec((1, 28, 28)), "lenet5")


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript"])
def test_load_model_refuses_a_declared_shape_too_large(seed_artifacts: Seeds, fmt: str) -> None:
    data = seed_artifacts.safetensors if fmt == "safetensors" else seed_artifacts.torchscript
    arch = "lenet5" if fmt == "safetensors" else ""
    with pytest.raises(InvalidInput):
        load_model(data, InputSpec((1, 2**31 - 1, 2**31 - 1)), arch)


def test_load_npz_refuses_a_corrupt_deflate_stream(seed_artifacts: Seeds) -> None:
    data = bytearray(seed_artifacts.npz_compressed)
    data[30 + len("x.npy") + 20] ^= 0xFF  # inside x.npy's compressed bytes
    with pytest.raises(InvalidInput):
        load_npz(bytes(data), InputSpec((1, 28, 28)))


def test_load_npz_refuses_a_huge_declared_array() -> None:
    x = npy_bytes("<f4", "(1099511627776, 1, 28, 28)", "False", b"\x00" * 64, 1)
    y = io.BytesIO()
    np.save(y, np.zeros(3, dtype=np.int64))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("x.npy", x)
        archive.writestr("y.npy", y.getvalue())
    with pytest.raises(InvalidInput):
        load_npz(out.getvalue(), InputSpec((1, 28, 28)))


def _npz_of(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, payload in members:
            archive.writestr(name, payload)
    return out.getvalue()


def _labels_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3, dtype=np.int64))
    return buffer.getvalue()


def test_load_npz_refuses_an_unparsable_npy_header() -> None:
    # numpy tokenizes the header and raises tokenize.TokenError on an unclosed tuple
    x = npy_bytes("<f4", "(3, 1, 28, 28", "False", bytes(3 * 28 * 28 * 4), 1)
    with pytest.raises(InvalidInput):
        load_npz(_npz_of([("x.npy", x), ("y.npy", _labels_npy())]), InputSpec((1, 28, 28)))


def test_load_npz_refuses_an_unknown_compression_method() -> None:
    x = npy_bytes("<f4", "(3, 1, 28, 28)", "False", bytes(3 * 28 * 28 * 4), 1)
    data = bytearray(_npz_of([("x.npy", x), ("y.npy", _labels_npy())]))
    data[8:10] = struct.pack("<H", 99)  # local header of x.npy
    central = data.find(b"PK\x01\x02")
    data[central + 10 : central + 12] = struct.pack("<H", 99)  # its central directory entry
    with pytest.raises(InvalidInput):  # zipfile raises NotImplementedError
        load_npz(bytes(data), InputSpec((1, 28, 28)))


def test_load_triggers_refuses_a_huge_empty_mask_tensor(runner: IsolatedRunner) -> None:
    """masks of shape (2**40, 0) hold no bytes; with labels=None load_triggers builds
    list(range(2**40)). Run in the child: its address space is capped."""
    data = torch_save_safetensors(
        {"masks": torch.zeros(2**40, 0), "patterns": torch.zeros(1, 1, 4, 4)}
    )
    outcome = runner.run("load_triggers", data, labels=None)
    assert outcome.kind == "allowed", outcome


def test_marker_path_is_not_created_by_the_seed_pickles(
    seed_artifacts: Seeds, marker: Path
) -> None:
    """Sanity of the execution oracle: the hostile seeds are refused, nothing ran."""
    for pickled in seed_artifacts.pickles:
        with pytest.raises(InvalidInput):
            load_model(pickled, InputSpec((1, 28, 28)), "lenet5")
    assert not os.path.exists(marker)
