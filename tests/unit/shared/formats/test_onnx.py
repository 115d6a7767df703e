"""ONNX models: sniffed by their protobuf structure without claiming other files, scanned
for external data and absurd tensors, converted to torch with gradients reaching the
input, unsupported operators named, and saved back as ONNX that onnxruntime runs."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save as safetensors_save
from torch import nn

from modelguard.errors import InvalidInput, UnsafeArtifact
from modelguard.formats import onnx as onnx_format
from modelguard.formats.loader import load_model, save_model
from modelguard.formats.programs import ProgramModule
from modelguard.formats.registry import all_formats, get_format
from modelguard.formats.scan import scan_model_bytes
from modelguard.nn.architectures import build
from modelguard.nn.probe import list_prunable_layers
from modelguard.spec import InputSpec

SPEC = InputSpec((1, 28, 28))
FORMAT = "onnx"
torch.set_num_threads(1)  # the machine is shared


def _onnx(module: nn.Module, *, dynamic: bool = True, opset: int | None = 18) -> bytes:
    """What a user's torch.onnx.export writes (the dynamo exporter, torch's default;
    ``opset`` None: its default opset)."""
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
        program = torch.onnx.export(
            module,
            (torch.rand(4, *SPEC.shape),),
            dynamo=True,
            dynamic_shapes=shapes,
            opset_version=opset,
            verbose=False,
        )
    assert program is not None
    return program.model_proto.SerializeToString()


def _linear_model(*ops: str, opset: int = 18, weight: TensorProto | None = None) -> bytes:
    """x (N,1,28,28) -> Flatten -> MatMul -> ``ops`` -> y, built by hand."""
    weight = weight or numpy_helper.from_array(np.ones((784, 10), np.float32), "w")
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", weight.name], ["h0"]),
    ]
    for index, op in enumerate(ops):
        nodes.append(helper.make_node(op, [f"h{index}"], [f"h{index + 1}"]))
    nodes.append(helper.make_node("Identity", [f"h{len(ops)}"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model.SerializeToString()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build("lenet5").eval()


@pytest.fixture(scope="module")
def dynamic(model: nn.Module) -> bytes:
    return _onnx(model)


@pytest.fixture(scope="module")
def static(model: nn.Module) -> bytes:
    return _onnx(model, dynamic=False, opset=20)  # newer operator versions than onnx2torch's


# ---------------------------------------------------------------------------- legit files


def test_sniffed_by_structure_and_claims_no_other_file(model: nn.Module, dynamic: bytes) -> None:
    formats = all_formats()
    assert [fmt.name for fmt in formats if fmt.sniff(dynamic)] == [FORMAT]
    onnx_format = get_format(FORMAT)
    script = io.BytesIO()
    torch.jit.save(torch.jit.script(model), script)
    others = [
        script.getvalue(),
        safetensors_save({"w": torch.ones(3)}),
        b"\x08\x07",  # an ir_version alone: no graph
        b"\x08\x07\x12\x03abc",
        b"GIF89a",
        b"",
    ]
    for data in others:
        assert not onnx_format.sniff(data)
    assert onnx_format.sniff(dynamic[:-10])  # truncated: claimed, so the scan can say so


def test_scan_names_what_it_checked(dynamic: bytes) -> None:
    result = scan_model_bytes(dynamic)
    assert result.kind == FORMAT
    assert any("all inside the file" in line for line in result.details)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_loads_with_equal_outputs_and_input_gradients(
    kind: str, model: nn.Module, request: pytest.FixtureRequest
) -> None:
    loaded = load_model(request.getfixturevalue(kind), SPEC)
    assert loaded.format == FORMAT and loaded.num_classes == 10 and loaded.arch == ""
    module = loaded.module
    assert isinstance(module, ProgramModule) and not module.training
    # a fixed batch of 4 reshapes to [4, 400]: the loaded copy takes the rows from its input
    assert module.chunk is None
    x = torch.rand(7, *SPEC.shape, requires_grad=True)  # any batch size
    logits = module(x)
    assert torch.allclose(logits, model(x), atol=1e-5)
    (gradient,) = torch.autograd.grad(logits[:, 3].sum(), x)
    assert gradient.shape == x.shape and gradient.abs().sum(dim=(1, 2, 3)).gt(0).all()


def _assert_same_logits_and_input_gradients(
    converted: nn.Module, reference: nn.Module, *, images: int, label: int
) -> None:
    x = torch.rand(images, *SPEC.shape, requires_grad=True)
    logits = converted(x)
    torch.testing.assert_close(logits, reference(x), atol=1e-5, rtol=1e-4)
    (gradient,) = torch.autograd.grad(logits[:, label].sum(), x)
    (expected,) = torch.autograd.grad(reference(x)[:, label].sum(), x)
    torch.testing.assert_close(gradient, expected, atol=1e-5, rtol=1e-4)


class TinyViT(nn.Module):
    """The operators of a ViT-style classifier as torch exports them: a patch
    convolution, a class token, pre-norm attention (``scaled_dot_product_attention``),
    exact and tanh GELU, LayerNorm and a linear head."""

    def __init__(self, dim: int = 16, heads: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(1, dim, 7, stride=7)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.GELU("tanh")
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1)
        batch, length, dim = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .reshape(batch, length, 3, self.heads, dim // self.heads)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x)[:, 0])


def test_a_vit_style_model_exported_at_torchs_default_opset_loads_with_equal_outputs() -> None:
    """torch writes GELU as ONNX's ``Gelu`` (opset 20), beside versions of Shape and
    Reshape newer than onnx2torch's; none may stop the conversion."""
    torch.manual_seed(0)
    vit = TinyViT().eval()
    data = _onnx(vit, opset=None)
    proto = onnx.load_from_string(data)
    assert {o.domain: o.version for o in proto.opset_import}[""] >= 20
    assert {"Gelu", "LayerNormalization", "Reshape"} <= {node.op_type for node in proto.graph.node}
    module = load_model(data, SPEC).module
    _assert_same_logits_and_input_gradients(module, vit, images=5, label=3)
    assert [info.kind for info in list_prunable_layers(module)][-1] == "linear"


def test_a_gelu_convnet_that_needs_the_opset_down_conversion_loads_with_equal_outputs() -> None:
    """Average pooling and a global mean export as operator versions onnx2torch lacks,
    which the opset down-conversion handles; the model's Gelu, which has no older version,
    is written out in the operators it is made of for it (both GELU forms)."""
    torch.manual_seed(0)
    convnet = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.GELU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GELU("tanh"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()
    data = _onnx(convnet, opset=None)
    proto = onnx.load_from_string(data)
    assert {"Gelu", "AveragePool", "ReduceMean"} <= {node.op_type for node in proto.graph.node}
    # the down-conversion's case
    assert sorted(onnx_format._unsupported(proto)) == ["AveragePool", "ReduceMean"]
    module = load_model(data, SPEC).module
    assert not any(isinstance(m, nn.GELU) for m in module.modules())  # written out
    _assert_same_logits_and_input_gradients(module, convnet, images=3, label=2)


def test_operator_versions_that_only_add_element_types_convert_as_the_version_before() -> None:
    """Flatten and Identity of opset 21 (4-bit integer types added) need no down-conversion."""
    data = _linear_model("Relu", opset=21)
    assert onnx_format._unsupported(onnx.load_from_string(data)) == []
    x = torch.rand(2, *SPEC.shape)
    expected = x.flatten(1).sum(1, keepdim=True).relu().expand(2, 10)
    torch.testing.assert_close(load_model(data, SPEC).module(x), expected)


@pytest.mark.parametrize("down_conversion", [False, True], ids=["direct", "down-converted"])
def test_a_gelu_of_an_unknown_form_is_refused_with_its_name(down_conversion: bool) -> None:
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("Gelu", ["flat"], ["h"], approximate="erfc"),
        helper.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    if down_conversion:  # a ReduceMean-18 (axes as an input) that onnx2torch lacks
        axes = helper.make_node("Constant", [], ["axes"], value_ints=[1])
        nodes[1:1] = [axes, helper.make_node("ReduceMean", ["flat", "axes"], ["flat2"])]
        nodes[3] = helper.make_node("Gelu", ["flat"], ["h"], approximate="erfc")
    weight = numpy_helper.from_array(np.ones((784, 10), np.float32), "w")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(InvalidInput, match="approximate='erfc'"):
        load_model(model.SerializeToString(), SPEC)


def test_conv_and_gemm_become_prunable_layers(dynamic: bytes) -> None:
    layers = list_prunable_layers(load_model(dynamic, SPEC).module)
    kinds = [info.kind for info in layers if info.side == "output"]
    assert kinds == ["conv2d", "conv2d", "linear", "linear", "linear"]


def test_weights_for_the_leak_scan(model: nn.Module, dynamic: bytes) -> None:
    weights = dict(get_format(FORMAT).load_weights(dynamic).named_parameters())
    assert torch.equal(weights["fc3.weight"], model.state_dict()["fc3.weight"])


def test_a_graph_holding_its_batch_size_otherwise_runs_in_chunks() -> None:
    class BatchInWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(784, 10)
            self.register_buffer("rows", torch.linspace(0.5, 2.0, 4).view(4, 1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc((x * self.rows).flatten(1))

    torch.manual_seed(0)
    original = BatchInWeights().eval()
    module = load_model(_onnx(original, dynamic=False), SPEC).module
    assert isinstance(module, ProgramModule) and module.chunk == 4
    x = torch.rand(7, *SPEC.shape, requires_grad=True)
    logits = module(x)
    assert logits.shape == (7, 10)
    assert torch.allclose(logits[:4], original(x[:4]), atol=1e-5)
    (gradient,) = torch.autograd.grad(logits.sum(), x)
    assert gradient.abs().sum(dim=(1, 2, 3)).gt(0).all()
    session = onnxruntime.InferenceSession(
        save_model(load_model(_onnx(original, dynamic=False), SPEC))
    )
    (out,) = session.run(None, {session.get_inputs()[0].name: x[:4].detach().numpy()})
    assert np.allclose(out, original(x[:4]).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_saved_repair_runs_in_onnxruntime(
    kind: str, model: nn.Module, request: pytest.FixtureRequest
) -> None:
    loaded = load_model(request.getfixturevalue(kind), SPEC)
    fc1 = next(info.module for info in list_prunable_layers(loaded.module) if info.kind == "linear")
    with torch.no_grad():  # what pruning does: zero a neuron in place
        loaded.module.get_submodule(fc1).weight[7].zero_()
    saved = save_model(loaded)
    assert scan_model_bytes(saved).kind == FORMAT
    session = onnxruntime.InferenceSession(saved, providers=["CPUExecutionProvider"])
    x = torch.rand(3, *SPEC.shape)  # the static model was loaded batch-free: saved so
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.allclose(out, loaded.module(x).detach().numpy(), atol=1e-5)
    again = load_model(saved, SPEC)
    assert torch.allclose(again.module(x), loaded.module(x), atol=1e-5)


def test_saving_needs_a_known_input_shape(model: nn.Module) -> None:
    with pytest.raises(InvalidInput, match="input shape"):
        get_format(FORMAT).save(model)


# ---------------------------------------------------------------------------- refusals


def test_unsupported_operators_are_all_named() -> None:
    data = _linear_model("Mish", "Relu", "Hardmax")
    assert scan_model_bytes(data).kind == FORMAT  # nothing unsafe, only unconvertible
    with pytest.raises(InvalidInput, match=r"cannot be converted to torch: Mish, Hardmax$"):
        load_model(data, SPEC)


def test_custom_domain_operators_are_named() -> None:
    model = onnx.load_from_string(_linear_model("Relu"))
    model.graph.node[2].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(InvalidInput, match=r"com\.example\.Relu"):
        load_model(model.SerializeToString(), SPEC)


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../../../etc/passwd", "outside the model's folder"),
        ("/etc/passwd", "outside the model's folder"),
        ("weights.bin", "keeps its data in another file"),
    ],
)
def test_external_data_is_refused(location: str, message: str) -> None:
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[784, 10])
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    data = _linear_model("Relu", weight=weight)
    with pytest.raises(UnsafeArtifact, match=message):
        scan_model_bytes(data)
    with pytest.raises(UnsafeArtifact):
        load_model(data, SPEC)


def test_tensors_whose_size_disagrees_with_their_bytes_are_refused() -> None:
    weight = numpy_helper.from_array(np.ones((784, 10), np.float32), "w")
    weight.dims[:] = [784, 10_000_000]
    with pytest.raises(InvalidInput, match=r"refused|holds"):
        scan_model_bytes(_linear_model("Relu", weight=weight))
    weight.dims[:] = [784, 11]
    with pytest.raises(InvalidInput, match=r"\(34496 bytes\) but holds 31360 bytes"):
        scan_model_bytes(_linear_model("Relu", weight=weight))


def test_wrong_input_shape_is_named(dynamic: bytes) -> None:
    with pytest.raises(InvalidInput, match=r"inputs of shape \['N', 1, 28, 28\].*3,32,32"):
        load_model(dynamic, InputSpec((3, 32, 32)))


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.9, 0.999])
def test_truncated_files_get_invalid_input(dynamic: bytes, fraction: float) -> None:
    with pytest.raises(InvalidInput):
        load_model(dynamic[: int(len(dynamic) * fraction)], SPEC)
