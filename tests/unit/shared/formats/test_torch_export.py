"""torch.export programs (.pt2): sniffed apart from the other zips, scanned before
torch.export.load ever sees them (which would run code from a crafted file), loaded with
their layers as Linear/Conv2d modules, run at any batch size with gradients reaching the
input, and saved back as a program the user's own torch.export.load reads."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from modelguard.errors import InvalidInput, UnsafeArtifact
from modelguard.formats.loader import load_model, save_model
from modelguard.formats.programs import ProgramModule
from modelguard.formats.registry import all_formats, get_format
from modelguard.formats.scan import scan_model_bytes
from modelguard.nn.architectures import build
from modelguard.nn.probe import LayerProbe, list_prunable_layers
from modelguard.spec import InputSpec

SPEC = InputSpec((1, 28, 28))
FORMAT = "torch-export"
torch.set_num_threads(1)  # the machine is shared


class _BatchInView(nn.Module):
    """Reshapes with ``x.size(0)``: exported for a fixed batch, its graph holds that size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))


class _BatchInWeights(_BatchInView):
    """Scales each row of the batch by its own constant: only batches of 4 are defined."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rows", torch.linspace(0.5, 2.0, 4).view(4, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.rows)


def _program(module: nn.Module, *, dynamic: bool = True, batch: int = 4) -> bytes:
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    exported = torch.export.export(module, (torch.rand(batch, *SPEC.shape),), dynamic_shapes=shapes)
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    return buffer.getvalue()


def _rezip(data: bytes, replace: dict[str, bytes] | None = None, **add: bytes) -> bytes:
    """Copy an archive, replacing or adding entries (names below its folder)."""
    source = zipfile.ZipFile(io.BytesIO(data))
    prefix = source.namelist()[0].split("/", 1)[0]
    replace = {f"{prefix}/{k}": v for k, v in (replace or {}).items()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, replace.get(info.filename, source.read(info.filename)))
        for name, payload in add.items():
            target.writestr(f"{prefix}/{name.replace('__', '/')}", payload)
    return out.getvalue()


def _edit_program(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    document = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("archive/models/model.json"))
    edit(document)
    return _rezip(data, {"models/model.json": json.dumps(document).encode()})


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build("lenet5").eval()


@pytest.fixture(scope="module")
def dynamic(model: nn.Module) -> bytes:
    return _program(model)


@pytest.fixture(scope="module")
def static(model: nn.Module) -> bytes:
    return _program(model, dynamic=False)


# ---------------------------------------------------------------------------- legit files


def test_sniffed_apart_from_torchscript_and_torch_save(model: nn.Module, dynamic: bytes) -> None:
    formats = all_formats()
    assert [fmt.name for fmt in formats if fmt.sniff(dynamic)] == [FORMAT]
    script, state = io.BytesIO(), io.BytesIO()
    torch.jit.save(torch.jit.script(model), script)
    torch.save(model.state_dict(), state)
    assert not get_format(FORMAT).sniff(script.getvalue())
    assert not get_format(FORMAT).sniff(state.getvalue())


def test_scan_names_what_it_checked(dynamic: bytes) -> None:
    details = scan_model_bytes(dynamic).details
    assert scan_model_bytes(dynamic).kind == FORMAT
    assert any("model.json" in line and "all allowed" in line for line in details)
    assert any("sample_inputs" in line and "weights-only" in line for line in details)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_loads_with_equal_outputs_and_input_gradients(
    kind: str, model: nn.Module, request: pytest.FixtureRequest
) -> None:
    loaded = load_model(request.getfixturevalue(kind), SPEC)
    assert loaded.format == FORMAT and loaded.num_classes == 10 and loaded.arch == ""
    module = loaded.module
    assert not module.training
    # any batch size: a static program whose graph does not hold its batch size runs as is
    assert isinstance(module, ProgramModule) and module.chunk is None
    x = torch.rand(7, *SPEC.shape, requires_grad=True)
    logits = module(x)
    assert torch.equal(logits, model(x))
    (gradient,) = torch.autograd.grad(logits[:, 3].sum(), x)
    assert gradient.shape == x.shape and gradient.abs().sum() > 0


def test_layers_are_linear_and_conv_modules_under_their_names(dynamic: bytes) -> None:
    module = load_model(dynamic, SPEC).module
    assert isinstance(module.get_submodule("fc1"), nn.Linear)
    assert isinstance(module.get_submodule("conv2"), nn.Conv2d)
    names = [info.name for info in list_prunable_layers(module)]
    assert names[:5] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    probe = LayerProbe(module, None, SPEC)  # the repair's default site: fc1
    assert probe.info.name == "fc1" and probe.mode == "hook"
    logits, activations = probe.capture(torch.rand(5, *SPEC.shape))
    assert logits.shape == (5, 10) and activations.shape == (5, 120)


def test_a_reshape_holding_the_batch_size_takes_it_from_its_input() -> None:
    """``x.view(x.size(0), -1)`` exported for batches of 4 is ``view(x, [4, 2704])``."""
    torch.manual_seed(0)
    original = _BatchInView().eval()
    module = load_model(_program(original, dynamic=False), SPEC).module
    assert isinstance(module, ProgramModule) and module.chunk is None
    x = torch.rand(7, *SPEC.shape, requires_grad=True)
    logits = module(x)
    assert torch.allclose(logits, original(x), atol=1e-6)
    (gradient,) = torch.autograd.grad(logits.sum(), x)
    assert gradient.abs().sum(dim=(1, 2, 3)).gt(0).all()
    _logits, activations = LayerProbe(module, "fc:in", SPEC).capture(x.detach())
    assert activations.shape == (7, 2704)  # one call per batch: repairs work


def test_a_graph_holding_its_batch_size_otherwise_runs_in_chunks() -> None:
    torch.manual_seed(0)
    original = _BatchInWeights().eval()
    module = load_model(_program(original, dynamic=False), SPEC).module
    assert isinstance(module, ProgramModule) and module.chunk == 4
    x = torch.rand(7, *SPEC.shape, requires_grad=True)
    logits = module(x)
    assert logits.shape == (7, 10)
    assert torch.allclose(logits[:4], original(x[:4]), atol=1e-6)
    (gradient,) = torch.autograd.grad(logits.sum(), x)
    assert gradient.abs().sum(dim=(1, 2, 3)).gt(0).all()  # padding never hides a sample


def test_weights_for_the_leak_scan(model: nn.Module, dynamic: bytes) -> None:
    weights = dict(get_format(FORMAT).load_weights(dynamic).named_parameters())
    assert torch.equal(weights["fc3.weight"], model.state_dict()["fc3.weight"])


def test_saved_repair_loads_with_the_users_own_torch_export_load(
    model: nn.Module, static: bytes
) -> None:
    loaded = load_model(static, SPEC)
    with torch.no_grad():  # what pruning does: zero a neuron in place
        loaded.module.get_submodule("fc1").weight[7].zero_()
    saved = save_model(loaded)
    assert scan_model_bytes(saved).kind == FORMAT
    exported = torch.export.load(io.BytesIO(saved))
    assert torch.equal(exported.state_dict["fc1.weight"][7], torch.zeros(400))
    x = torch.rand(3, *SPEC.shape)  # another batch size: saved with a dynamic batch
    assert torch.allclose(exported.module()(x), loaded.module(x), atol=1e-6)
    again = load_model(saved, SPEC)
    assert torch.equal(again.module.get_submodule("fc1").weight, loaded.module.fc1.weight)


def test_a_batch_free_copy_is_saved_with_a_dynamic_batch_a_chunked_one_as_it_was() -> None:
    torch.manual_seed(0)
    for original, batch in ((_BatchInView().eval(), 3), (_BatchInWeights().eval(), 4)):
        saved = save_model(load_model(_program(original, dynamic=False), SPEC))
        program = torch.export.load(io.BytesIO(saved)).module()
        x = torch.rand(batch, *SPEC.shape)
        assert torch.allclose(program(x), original(x), atol=1e-6)


def test_saving_needs_a_known_input_shape(model: nn.Module) -> None:
    with pytest.raises(InvalidInput, match="input shape"):
        get_format(FORMAT).save(model)
    data = get_format(FORMAT).save(ProgramModule(model, SPEC.shape))
    assert torch.equal(
        load_model(data, SPEC).module(torch.ones(2, 1, 28, 28)), model(torch.ones(2, 1, 28, 28))
    )


# ---------------------------------------------------------------------------- refusals


class _System:
    """Unpickling this would run ``touch <path>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def test_malicious_sample_inputs_pickle_is_refused_and_never_runs(
    dynamic: bytes, tmp_path: Path
) -> None:
    """torch.export.load reads the sample inputs weights-only, then falls back to
    weights_only=False when that refuses them: this file runs its payload there."""
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(_System(marker), payload)
    data = _rezip(dynamic, {"data/sample_inputs/model.pt": payload.getvalue()})
    with pytest.raises(UnsafeArtifact, match=r"sample_inputs/model\.pt.*system"):
        scan_model_bytes(data)
    with pytest.raises(UnsafeArtifact):
        load_model(data, SPEC)
    assert not marker.exists()


def test_shape_expression_that_is_python_is_refused(dynamic: bytes, tmp_path: Path) -> None:
    """torch.export.load evaluates symbolic-shape expressions with sympy.sympify."""
    marker = tmp_path / "pwned"

    def edit(document: dict[str, Any]) -> None:
        text = json.dumps(document).replace(
            "Symbol(", f"__import__('os').system('touch {marker}') or Symbol(", 1
        )
        document.clear()
        document.update(json.loads(text))

    with pytest.raises(UnsafeArtifact, match=r"symbolic-shape expression.*evaluate it as Python"):
        load_model(_edit_program(dynamic, edit), SPEC)
    assert not marker.exists()


def test_guard_code_that_is_not_a_size_comparison_is_refused(dynamic: bytes) -> None:
    """ExportedProgram.module() execs the guards."""

    def evil(document: dict[str, Any]) -> None:
        document["guards_code"] = ["__import__('os').system('id') == 0"]

    def benign(document: dict[str, Any]) -> None:
        document["guards_code"] = ["L['x'].size()[0] <= 1024"]

    with pytest.raises(UnsafeArtifact, match=r"guard code.*exec"):
        scan_model_bytes(_edit_program(dynamic, evil))
    assert scan_model_bytes(_edit_program(dynamic, benign)).kind == FORMAT


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("torch.os.system", "not an ATen operator"),
        ("torch.ops.mylib.run.default", "not an ATen operator"),
        ("torch.ops.aten.from_file.default", "file access"),
        ("#ext:op", "not an ATen operator"),
    ],
)
def test_call_targets_outside_aten_are_refused(dynamic: bytes, target: str, message: str) -> None:
    def edit(document: dict[str, Any]) -> None:
        document["graph_module"]["graph"]["nodes"][1]["target"] = target

    with pytest.raises(UnsafeArtifact, match=message):
        scan_model_bytes(_edit_program(dynamic, edit))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("data__aotinductor__model__model.so", "AOTInductor"),
        ("data__constants__opaque_obj_0", "pickle"),
        ("data__constants__custom_obj_0", "TorchBind"),
        ("payload.pkl", "not part of a torch.export program"),
    ],
)
def test_entries_carrying_code_are_refused(dynamic: bytes, entry: str, message: str) -> None:
    with pytest.raises(UnsafeArtifact, match=message):
        scan_model_bytes(_rezip(dynamic, **{entry: b"\x7fELF"}))


def test_pickled_weight_must_pass_the_weights_only_rules(dynamic: bytes, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    archive = zipfile.ZipFile(io.BytesIO(dynamic))
    config = json.loads(archive.read("archive/data/weights/model_weights_config.json"))
    config["config"]["fc3.bias"]["use_pickle"] = True
    payload = io.BytesIO()
    torch.save(_System(marker), payload)
    path = config["config"]["fc3.bias"]["path_name"]
    data = _rezip(
        dynamic,
        {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            f"data/weights/{path}": payload.getvalue(),
        },
    )
    with pytest.raises(UnsafeArtifact, match=rf"{path}.*system"):
        load_model(data, SPEC)
    assert not marker.exists()


def test_tensor_addressing_past_its_bytes_is_refused(dynamic: bytes) -> None:
    archive = zipfile.ZipFile(io.BytesIO(dynamic))
    config = json.loads(archive.read("archive/data/weights/model_weights_config.json"))
    config["config"]["fc1.weight"]["tensor_meta"]["sizes"][0] = {"as_int": 10**9}
    data = _rezip(dynamic, {"data/weights/model_weights_config.json": json.dumps(config).encode()})
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        scan_model_bytes(data)


def test_training_mode_export_and_wrong_shapes_are_refused(model: nn.Module) -> None:
    torch.manual_seed(0)
    training = build("vgg_small").train()  # dropout active in the graph
    with pytest.raises(InvalidInput, match="training mode"):
        load_model(_program(training), SPEC)
    with pytest.raises(InvalidInput, match=r"inputs of shape \['N', 1, 28, 28\].*3,28,28"):
        load_model(_program(model), InputSpec((3, 28, 28)))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_files_get_invalid_input(dynamic: bytes, fraction: float) -> None:
    with pytest.raises(InvalidInput):
        load_model(dynamic[: int(len(dynamic) * fraction)], SPEC)
