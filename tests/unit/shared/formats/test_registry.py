"""The model-format registry: every entry implements the protocol, each format round-trips
(save -> sniff -> scan -> load gives the same outputs), exactly one format claims each
file, the proto enum names the same formats, and the registry stays free of torch."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from modelguard.errors import InvalidInput, UnsafeArtifact
from modelguard.formats import registry
from modelguard.formats.base import ModelFormat
from modelguard.formats.loader import LoadedModel, load_model, save_model
from modelguard.formats.programs import ProgramModule
from modelguard.formats.registry import FORMATS, by_media_type, get_format, sniff
from modelguard.formats.scan import scan_model_bytes, zip_holds_code
from modelguard.nn.architectures import build
from modelguard.proto.modelguard.v1 import common_pb2
from modelguard.spec import InputSpec

SPEC = InputSpec((1, 28, 28))
REPO = Path(__file__).resolve().parents[4]  # the children import this checkout's packages
torch.set_num_threads(1)  # the machine is shared


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build("lenet5").eval()


def _saved(name: str, module: nn.Module) -> bytes:
    if name == "torchscript":
        return get_format(name).save(torch.jit.script(module))
    if name in ("torch-export", "onnx"):  # graph formats export with an input shape
        return get_format(name).save(ProgramModule(module, SPEC.shape))
    return get_format(name).save(module)


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_entry_imports_and_implements_the_protocol(name: str) -> None:
    fmt = get_format(name)
    assert isinstance(fmt, ModelFormat)
    assert fmt.name == name
    assert fmt.media_type.startswith("application/") and fmt.extension.startswith(".")
    assert by_media_type(fmt.media_type) is fmt


def test_names_media_types_and_extensions_are_unique() -> None:
    formats = registry.all_formats()
    for attribute in ("name", "media_type", "extension"):
        values = [getattr(fmt, attribute) for fmt in formats]
        assert len(set(values)) == len(values), attribute
    assert by_media_type("application/octet-stream") is None


def test_unknown_format_name_lists_the_known_ones() -> None:
    with pytest.raises(
        InvalidInput, match="known: safetensors, torchscript, torch-zip, torch-export, onnx"
    ):
        get_format("keras")


@pytest.mark.parametrize("name", list(FORMATS))
def test_round_trip(name: str, model: nn.Module) -> None:
    data = _saved(name, model)
    fmt = sniff(data)
    assert fmt.name == name
    assert fmt.scan(data).kind == name
    assert scan_model_bytes(data).kind == name
    arch = "lenet5" if fmt.needs_arch else ""
    loaded = fmt.load(data, SPEC, arch)
    assert not loaded.training
    probe = torch.rand(3, *SPEC.shape, generator=torch.Generator().manual_seed(1))
    same = torch.equal if name != "onnx" else _close  # ONNX is converted op by op
    with torch.no_grad():
        assert same(loaded(probe), model(probe))
    weights = dict(fmt.load_weights(data).named_parameters())
    assert torch.equal(weights["fc3.weight"], model.state_dict()["fc3.weight"])
    # the loader saves in the format it loaded, and that file loads the same again
    again = load_model(save_model(load_model(data, SPEC, arch=arch)), SPEC, arch=arch)
    assert again.format == name
    with torch.no_grad():
        assert same(again.module(probe), model(probe))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_exactly_one_format_claims_each_file(model: nn.Module) -> None:
    formats = registry.all_formats()
    for name in FORMATS:
        data = _saved(name, model)
        assert [fmt.name for fmt in formats if fmt.sniff(data)] == [name]


def test_a_script_archive_is_not_a_state_dict_and_the_reverse(model: nn.Module) -> None:
    script, state = _saved("torchscript", model), _saved("torch-zip", model)
    with pytest.raises(InvalidInput, match=r"not a torch\.save state dict"):
        get_format("torch-zip").scan(script)
    with pytest.raises(InvalidInput, match="not a TorchScript file"):
        get_format("torchscript").scan(state)


def test_sniff_reads_zip_names_from_the_central_directory() -> None:
    def archive(*names: str, comment: bytes = b"") -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as handle:
            for entry in names:
                handle.writestr(entry, b"x")
            handle.comment = comment
        return buffer.getvalue()

    assert zip_holds_code(archive("m/data.pkl", "m/code/__torch__/m.py"))
    assert zip_holds_code(archive("m/data.pkl", "m/constants.pkl", comment=b"PK"))
    assert not zip_holds_code(archive("m/data.pkl", "m/data/0"))
    assert not zip_holds_code(archive("code/x.py"))  # no folder: the scan refuses it
    assert not zip_holds_code(b"PK\x03\x04 truncated")


def test_sniff_refuses_what_no_format_claims() -> None:
    import pickle

    with pytest.raises(UnsafeArtifact, match="raw pickle"):
        sniff(pickle.dumps({"w": [1.0]}, protocol=4))
    with pytest.raises(InvalidInput, match="damaged zip"):
        sniff(b"PK\x05\x06" + bytes(18))
    with pytest.raises(
        InvalidInput,
        match=r"neither safetensors, TorchScript, a torch\.save archive, a torch\.export program "
        "nor ONNX",
    ):
        sniff(b"GIF89a not a model")


def test_proto_enum_names_the_registered_formats() -> None:
    values = set(common_pb2.ModelFormat.keys()) - {"MODEL_FORMAT_UNSPECIFIED"}
    assert values == {"MODEL_FORMAT_" + name.upper().replace("-", "_") for name in FORMATS}


def test_loaded_model_of_an_unknown_format_is_not_saved(model: nn.Module) -> None:
    with pytest.raises(InvalidInput, match="unknown model format"):
        save_model(LoadedModel(module=model, format="keras", arch="", num_classes=10))


def test_importing_the_registry_imports_no_torch() -> None:
    """The CLI's parser and the client import the registry; torch takes seconds."""
    code = (
        "import sys\n"
        "from modelguard.formats import registry\n"
        "assert registry.FORMATS\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.stdout.strip() == "[]"


def test_sniffing_and_scanning_import_no_torch(model: nn.Module, tmp_path: Path) -> None:
    """Safety checks read bytes only: a client refuses a file before importing torch."""
    paths = []
    for name in FORMATS:
        paths.append(tmp_path / f"model{get_format(name).extension}")
        paths[-1].write_bytes(_saved(name, model))
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from modelguard.formats.scan import scan_model_bytes\n"
        "kinds = [scan_model_bytes(Path(p).read_bytes()).kind for p in sys.argv[1:]]\n"
        "print(kinds, 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.stdout.strip() == f"{list(FORMATS)} False"
