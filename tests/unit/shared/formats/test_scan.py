"""The unsafe-artifact scan: legitimate model files pass, crafted payloads are refused
with a reason naming what was found, nothing is ever executed, hostile bytes never crash
the scanner or the loader."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_save

from modelguard.errors import InvalidInput, ModelGuardError, UnsafeArtifact
from modelguard.formats.loader import load_model
from modelguard.formats.scan import (
    check_pickle,
    inspect_pickle,
    pickle_globals,
    scan_model_bytes,
)
from modelguard.nn.architectures import build
from modelguard.spec import InputSpec

SPEC = InputSpec((1, 28, 28))
SAFETENSORS, TORCHSCRIPT, TORCH_ZIP = "safetensors", "torchscript", "torch-zip"  # registry names
torch.set_num_threads(1)  # the machine is shared; one core is the budget


# ---------------------------------------------------------------------------- fixtures


def _torchscript(module: torch.nn.Module, trace: bool = False) -> bytes:
    module.eval()
    example = torch.zeros(1, 1, 28, 28)
    scripted = (
        torch.jit.trace(module, example, check_trace=False) if trace else torch.jit.script(module)
    )
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def _torch_save(obj: object, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lenet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in build("lenet5").state_dict().items()}


@pytest.fixture(scope="module")
def lenet_zip(lenet_state: dict[str, torch.Tensor]) -> bytes:
    return _torch_save(lenet_state)


@pytest.fixture(scope="module")
def lenet_script() -> bytes:
    torch.manual_seed(0)
    return _torchscript(build("lenet5"))


class _SystemPayload:
    """Unpickling this would run ``touch <path>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def _rezip(
    original: bytes, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None
) -> bytes:
    """Copy a zip archive, replacing or adding entries (names relative to its folder)."""
    source = zipfile.ZipFile(io.BytesIO(original))
    prefix = source.namelist()[0].split("/", 1)[0]
    replace = {f"{prefix}/{k}": v for k, v in (replace or {}).items()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info.filename, replace.get(info.filename, source.read(info.filename)))
        for name, payload in (add or {}).items():
            target.writestr(f"{prefix}/{name}", payload)
    return out.getvalue()


# ---------------------------------------------------------------------------- legit files


@pytest.mark.parametrize("arch", ["lenet5", "vgg_small", "resnet18_small"])
@pytest.mark.parametrize("trace", [False, True], ids=["script", "trace"])
def test_torchscript_of_registered_architectures_passes_and_loads(arch: str, trace: bool) -> None:
    torch.manual_seed(0)
    data = _torchscript(build(arch), trace=trace)
    result = scan_model_bytes(data)
    assert result.kind == TORCHSCRIPT
    assert any("data.pkl" in line for line in result.details)
    loaded = load_model(data, SPEC)
    assert loaded.format == TORCHSCRIPT and loaded.num_classes == 10


@pytest.mark.parametrize("arch", ["lenet5", "vgg_small", "resnet18_small"])
def test_state_dicts_and_safetensors_pass_and_load(arch: str) -> None:
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in build(arch).state_dict().items()}
    for data, kind in ((_torch_save(state), TORCH_ZIP), (safetensors_save(state), SAFETENSORS)):
        assert scan_model_bytes(data).kind == kind
        loaded = load_model(data, SPEC, arch=arch)
        assert loaded.format == kind


def test_other_legit_torch_save_variants_pass(lenet_state: dict[str, torch.Tensor]) -> None:
    assert scan_model_bytes(_torch_save(lenet_state, pickle_protocol=4)).kind == TORCH_ZIP
    assert scan_model_bytes(_torch_save({"state_dict": lenet_state, "epoch": 3})).kind == TORCH_ZIP
    assert scan_model_bytes(_torch_save(torch.nn.Parameter(torch.ones(3)))).kind == TORCH_ZIP


def test_safetensors_whose_header_length_starts_like_a_pickle_is_not_mistaken() -> None:
    # 0x80 0x01 ... is also how a protocol-1 pickle would start
    for pad in range(200):
        data = safetensors_save({"w": torch.ones(2)}, metadata={"pad": "x" * pad})
        if data[0] == 0x80 and data[1] <= 5:
            break
    else:  # pragma: no cover - the loop always finds one
        pytest.fail("no padding gives a 0x80-prefixed header")
    assert scan_model_bytes(data).kind == SAFETENSORS


# ---------------------------------------------------------------------------- raw pickles


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_os_system_pickle_refused_and_never_executed(protocol: int, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps(_SystemPayload(marker), protocol=protocol)
    with pytest.raises(UnsafeArtifact, match=r"system"):
        scan_model_bytes(data)
    with pytest.raises(UnsafeArtifact):
        load_model(data, SPEC, arch="lenet5")
    assert not marker.exists()


BUILTIN_PAYLOADS = {
    # builtins.eval("...") through REDUCE
    "eval": b"cbuiltins\neval\n(V__import__('os').system('touch MARKER')\ntR.",
    "exec": b"cbuiltins\nexec\n(V__import__('os').system('touch MARKER')\ntR.",
    # getattr(__import__('os'), 'system')('touch ...')
    "getattr": (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(Vtouch MARKER\ntR."
    ),
    # the Python 2 spelling
    "__import__": b"c__builtin__\n__import__\n(Vos\ntR.",
}


@pytest.mark.parametrize("name", sorted(BUILTIN_PAYLOADS))
def test_builtins_payloads_refused_naming_the_global(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = BUILTIN_PAYLOADS[name].replace(b"MARKER", str(marker).encode())
    with pytest.raises(UnsafeArtifact, match=re.escape(name)):
        scan_model_bytes(data)
    with pytest.raises(UnsafeArtifact):
        check_pickle(data, "test")
    assert not marker.exists()


def _stack_global_decoy(marker: Path) -> bytes:
    """Protocol 4: 'os' and 'system' are memoised, then decoy strings a naive scanner
    would read as the global are pushed and popped, and STACK_GLOBAL uses the memo."""

    def unicode(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    return (
        b"\x80\x04"
        + unicode("os") + b"\x94"  # MEMOIZE -> 0
        + unicode("system") + b"\x94"  # MEMOIZE -> 1
        + b"0" + b"0"  # POP POP
        + unicode("torch") + unicode("FloatStorage") + b"0" + b"0"  # decoys, popped
        + b"h\x00" + b"h\x01"  # BINGET 0, BINGET 1
        + b"\x93"  # STACK_GLOBAL
        + unicode(f"touch {marker}") + b"\x85"  # TUPLE1
        + b"R."  # REDUCE STOP
    )  # fmt: skip


def test_stack_global_with_memoised_names_and_decoys_resolved(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = _stack_global_decoy(marker)
    assert pickle_globals(data) == ["os.system"]
    with pytest.raises(UnsafeArtifact, match=r"os\.system"):
        scan_model_bytes(data)
    assert not marker.exists()


def test_stack_global_with_computed_name_refused() -> None:
    # module name is a call result, not a string constant
    data = b"\x80\x04\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x93)R\x8c\x01x\x93."
    report = inspect_pickle(data)
    assert any("computed" in p for p in report.problems)


def test_reduce_on_a_call_result_and_build_on_a_global_refused() -> None:
    # OrderedDict()() : REDUCE applied to an object, not to an allowed global
    reduce_on_object = b"\x80\x02ccollections\nOrderedDict\n)R)R."
    with pytest.raises(UnsafeArtifact, match=r"REDUCE calls the result of calling"):
        check_pickle(reduce_on_object, "x")
    # BUILD on the class object itself (sets class attributes)
    build_on_global = b"\x80\x02ccollections\nOrderedDict\n}b."
    with pytest.raises(UnsafeArtifact, match=r"BUILD sets the state of global"):
        check_pickle(build_on_global, "x")
    # a dangerous torch function, even though it lives under torch.
    torch_save = b"\x80\x02ctorch\nsave\n(K\x01Vx\ntR."
    with pytest.raises(UnsafeArtifact, match=r"torch\.save"):
        check_pickle(torch_save, "x")


def test_truncated_pickle_refused() -> None:
    data = pickle.dumps({"a": 1}, protocol=2)[:-3]
    with pytest.raises(UnsafeArtifact, match=r"truncated|malformed"):
        scan_model_bytes(data)


# ---------------------------------------------------------------------------- zip archives


def test_malicious_data_pkl_in_torch_zip_refused(lenet_zip: bytes, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_SystemPayload(marker), protocol=2)
    data = _rezip(lenet_zip, replace={"data.pkl": evil})
    with pytest.raises(UnsafeArtifact, match=r"data\.pkl.*system"):
        scan_model_bytes(data)
    with pytest.raises(UnsafeArtifact):
        load_model(data, SPEC, arch="lenet5")
    assert not marker.exists()


def test_malicious_pickle_in_torchscript_refused(lenet_script: bytes, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_SystemPayload(marker), protocol=2)
    with pytest.raises(UnsafeArtifact, match=r"constants\.pkl.*system"):
        scan_model_bytes(_rezip(lenet_script, replace={"constants.pkl": evil}))
    assert not marker.exists()


def test_nested_pickle_inside_zip_refused(
    lenet_zip: bytes, lenet_script: bytes, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_SystemPayload(marker), protocol=2)
    # disguised as a tensor storage
    with pytest.raises(UnsafeArtifact, match=r"nested pickle importing posix\.system|os\.system"):
        scan_model_bytes(_rezip(lenet_zip, add={"data/99": evil}))
    # as a TorchScript extra file
    with pytest.raises(UnsafeArtifact, match=r"nested pickle"):
        scan_model_bytes(_rezip(lenet_script, add={"extra/model.bin": evil}))
    # as an extra .pkl next to data.pkl
    with pytest.raises(UnsafeArtifact, match=r"not part of a TorchScript or torch\.save"):
        scan_model_bytes(_rezip(lenet_zip, add={"payload.pkl": evil}))
    assert not marker.exists()


def test_nested_zip_inside_zip_refused(lenet_zip: bytes) -> None:
    with pytest.raises(UnsafeArtifact, match=r"nested zip"):
        scan_model_bytes(_rezip(lenet_zip, replace={"data/0": lenet_zip}))
    with pytest.raises(UnsafeArtifact, match=r"not part of"):
        scan_model_bytes(_rezip(lenet_zip, add={"inner.pt": lenet_zip}))


@pytest.mark.parametrize("name", ["../../evil.py", "/etc/cron.d/evil", "archive/../../x"])
def test_zip_path_traversal_refused(lenet_zip: bytes, name: str) -> None:
    source = zipfile.ZipFile(io.BytesIO(lenet_zip))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
        target.writestr(zipfile.ZipInfo(name), b"x")
    with pytest.raises(UnsafeArtifact, match=r"escapes the archive|absolute path"):
        scan_model_bytes(out.getvalue())


def test_zip_bomb_refused(lenet_zip: bytes) -> None:
    source = zipfile.ZipFile(io.BytesIO(lenet_zip))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
        target.writestr(
            "archive/extra/bomb", b"\x00" * (8 << 20), compress_type=zipfile.ZIP_DEFLATED
        )
    data = out.getvalue()
    assert len(data) < 2 * len(lenet_zip)
    with pytest.raises(UnsafeArtifact, match=r"zip bomb"):
        scan_model_bytes(data)


def test_overlapping_zip_entries_refused(lenet_zip: bytes) -> None:
    """Two central-directory records pointing at one local entry (overlap bombs)."""
    data = bytearray(_rezip(lenet_zip, add={"data/98": b"a" * 64, "data/99": b"a" * 64}))
    archive = zipfile.ZipFile(io.BytesIO(bytes(data)))
    first = archive.getinfo("archive/data/98").header_offset
    # the central-directory record of data/99 (its name is the last occurrence) gets the
    # local-header offset of data/98
    position = bytes(data).rfind(b"archive/data/99") - 46
    assert data[position : position + 4] == b"PK\x01\x02"
    data[position + 42 : position + 46] = struct.pack("<I", first)
    with pytest.raises(UnsafeArtifact, match=r"overlap"):
        scan_model_bytes(bytes(data))


def test_duplicate_and_encrypted_entries_refused(lenet_zip: bytes) -> None:
    source = zipfile.ZipFile(io.BytesIO(lenet_zip))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
        with pytest.warns(UserWarning):
            target.writestr("archive/data.pkl", source.read("archive/data.pkl"))
    with pytest.raises(UnsafeArtifact, match=r"twice"):
        scan_model_bytes(out.getvalue())
    data = bytearray(lenet_zip)
    position = bytes(data).find(b"PK\x01\x02")
    data[position + 8] |= 0x1  # general-purpose flag: encrypted
    with pytest.raises(UnsafeArtifact, match=r"encrypted"):
        scan_model_bytes(bytes(data))


def test_torchscript_custom_operator_namespace_refused(lenet_script: bytes) -> None:
    source = zipfile.ZipFile(io.BytesIO(lenet_script))
    # architectures.py, or architectures/___torch_mangle_N.py once the class was compiled
    # before in the same process (a traced LeNet-5 elsewhere in the run)
    code = next(n for n in source.namelist() if "/architectures" in n and n.endswith(".py"))
    text = source.read(code) + b"\n# torch.ops.evil_ns.run(x)\n"
    with pytest.raises(UnsafeArtifact, match=r"ops\.evil_ns"):
        scan_model_bytes(_rezip(lenet_script, replace={code.split("/", 1)[1]: text}))


# ---------------------------------------------------------------------------- corrupt files


def test_empty_oversized_truncated_and_unknown_files_get_clear_errors(
    lenet_zip: bytes, lenet_state: dict[str, torch.Tensor]
) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        scan_model_bytes(b"")
    with pytest.raises(InvalidInput, match="limit"):
        scan_model_bytes(lenet_zip, max_bytes=1000)
    with pytest.raises(InvalidInput, match=r"zip|truncated"):
        scan_model_bytes(lenet_zip[: len(lenet_zip) // 2])
    safetensors = safetensors_save(lenet_state)
    with pytest.raises(InvalidInput, match=r"truncated|past the end"):
        scan_model_bytes(safetensors[:-100])
    with pytest.raises(InvalidInput, match="neither"):
        scan_model_bytes(b"GIF89a" + b"\x00" * 100)


def test_safetensors_header_is_validated(lenet_state: dict[str, torch.Tensor]) -> None:
    data = safetensors_save({"w": torch.ones(4)})
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length]
    body = data[8 + length :]

    def rebuild(text: bytes) -> bytes:
        text = text + b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + body

    with pytest.raises(InvalidInput, match="dtype"):
        scan_model_bytes(rebuild(header.replace(b'"F32"', b'"X99"')))
    with pytest.raises(InvalidInput, match="does not match"):
        scan_model_bytes(rebuild(header.replace(b"[4]", b"[5]")))
    entry = b'{"dtype":"F32","shape":[4],"data_offsets":[0,16]}'
    with pytest.raises(InvalidInput, match="twice"):
        scan_model_bytes(rebuild(b'{"w":' + entry + b',"w":' + entry + b"}"))


# ---------------------------------------------------------------------------- fuzzing

_FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@_FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash_the_scanner(data: bytes) -> None:
    with contextlib.suppress(ModelGuardError):
        scan_model_bytes(data)


@_FUZZ
@given(
    st.sampled_from(
        [b"\x80\x02", b"\x80\x04", b"PK\x03\x04", b"(c", b"\x10\x00\x00\x00\x00\x00\x00\x00{"]
    ),
    st.binary(max_size=2048),
)
def test_format_prefixed_garbage_never_crashes_the_scanner(prefix: bytes, tail: bytes) -> None:
    with contextlib.suppress(ModelGuardError):
        scan_model_bytes(prefix + tail)


@settings(_FUZZ, max_examples=60)
@given(data=st.data())
def test_mutated_model_files_never_crash_scanner_or_loader(
    data: st.DataObject, lenet_zip: bytes, lenet_script: bytes, lenet_state: dict[str, torch.Tensor]
) -> None:
    kind = data.draw(st.sampled_from(["zip", "script", "safetensors"]))
    original = {
        "zip": lenet_zip,
        "script": lenet_script,
        "safetensors": safetensors_save(lenet_state),
    }[kind]
    mutated = bytearray(original)
    how = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if how == "truncate":
        mutated = mutated[: data.draw(st.integers(0, len(mutated) - 1))]
    else:
        limit = len(mutated) - 1 if how == "flip" else min(len(mutated) - 1, 4096)
        for _ in range(data.draw(st.integers(1, 8))):
            position = data.draw(st.integers(0, limit))
            mutated[position] = data.draw(st.integers(0, 255))
    try:
        scan_model_bytes(bytes(mutated))
        load_model(bytes(mutated), SPEC, arch="" if kind == "script" else "lenet5")
    except ModelGuardError:
        pass


def test_loader_rejects_a_one_dimensional_first_layer(lenet_state: dict[str, torch.Tensor]) -> None:
    state = dict(lenet_state)
    state["conv1.weight"] = state["conv1.weight"].flatten().contiguous()
    with pytest.raises(InvalidInput):
        load_model(safetensors_save(state), SPEC, arch="lenet5")
