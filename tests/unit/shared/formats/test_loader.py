from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from modelguard.errors import InvalidInput, UnsafeArtifact
from modelguard.formats.loader import LoadedModel, load_model, save_model, weights_to_safetensors
from modelguard.nn.architectures import ARCHITECTURES, build
from modelguard.spec import InputSpec, wrap

SPEC = InputSpec((1, 28, 28))


class TestInputSpec:
    def test_parse(self) -> None:
        spec = InputSpec.parse("3,32,32", "0,255", "125.3,123,113.9", "63,62.1,66.7")
        assert spec.shape == (3, 32, 32)
        assert spec.value_range == (0.0, 255.0)
        assert spec.mean == (125.3, 123.0, 113.9)

    @pytest.mark.parametrize(
        ("shape", "value_range", "mean", "std", "message"),
        [
            ("1,28", "0,1", None, None, "C,H,W"),
            ("1,28,x", "0,1", None, None, "1,28,28"),
            ("1,28,28", "1,0", None, None, "min < max"),
            ("1,28,28", "0,nan", None, None, "finite"),
            ("3,28,28", "0,1", "0.5,0.5", "0.2,0.2", "1 or 3"),
            ("1,28,28", "0,1", "0.5", "0", "> 0"),
            ("1,28,28", "0,1", "0.5", None, "same number"),
        ],
    )
    def test_rejects_inconsistent_specs(
        self, shape: str, value_range: str, mean: str | None, std: str | None, message: str
    ) -> None:
        with pytest.raises(InvalidInput, match=message):
            InputSpec.parse(shape, value_range, mean, std)

    def test_wrap_applies_declared_normalisation(self) -> None:
        spec = InputSpec((1, 2, 2), (0.0, 1.0), mean=(0.5,), std=(0.25,))
        identity = torch.nn.Identity()
        out = wrap(identity, spec)(torch.ones(1, 1, 2, 2))
        assert torch.allclose(out, torch.full((1, 1, 2, 2), 2.0))
        assert wrap(identity, InputSpec((1, 2, 2))) is identity

    def test_dict_roundtrip(self) -> None:
        spec = InputSpec((3, 8, 8), (-1.0, 1.0), (0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
        assert InputSpec.from_dict(spec.to_dict()) == spec


class TestModelIO:
    @pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
    def test_safetensors_roundtrip_every_architecture(self, arch: str) -> None:
        model = build(arch)
        loaded = load_model(weights_to_safetensors(model), SPEC, arch=arch)
        assert loaded.format == "safetensors" and loaded.num_classes == 10
        x = torch.rand(3, 1, 28, 28)
        model.eval()
        assert torch.allclose(loaded.module(x), model(x), atol=1e-6)
        again = load_model(save_model(loaded), SPEC, arch=arch)
        assert torch.allclose(again.module(x), model(x), atol=1e-6)

    def test_torchscript_roundtrip_keeps_format(self) -> None:
        model = build("lenet5").eval()
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(model), buffer)
        loaded = load_model(buffer.getvalue(), SPEC)
        assert loaded.format == "torchscript"
        saved = save_model(loaded)
        reloaded = torch.jit.load(io.BytesIO(saved))
        x = torch.rand(2, 1, 28, 28)
        assert torch.allclose(reloaded(x), model(x), atol=1e-6)

    def test_torch_save_state_dict_is_read_weights_only(self) -> None:
        buffer = io.BytesIO()
        torch.save(build("lenet5").state_dict(), buffer)
        assert load_model(buffer.getvalue(), SPEC, arch="lenet5").format == "torch-zip"

    def test_weights_need_an_architecture(self) -> None:
        with pytest.raises(InvalidInput, match="--arch"):
            load_model(weights_to_safetensors(build("lenet5")), SPEC)

    def test_wrong_architecture_is_named(self) -> None:
        with pytest.raises(InvalidInput, match="not a lenet5 state dict"):
            load_model(weights_to_safetensors(build("vgg_small")), SPEC, arch="lenet5")

    def test_channel_mismatch_with_declared_shape(self) -> None:
        with pytest.raises(InvalidInput, match="3 input channel"):
            load_model(weights_to_safetensors(build("lenet5", in_channels=3)), SPEC, arch="lenet5")

    def test_wrong_input_shape_is_caught(self) -> None:
        model = build("lenet5").eval()
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(model), buffer)
        with pytest.raises(InvalidInput, match="does not accept inputs"):
            load_model(buffer.getvalue(), InputSpec((1, 8, 8)))

    def test_nan_outputs_are_refused(self) -> None:
        model = build("lenet5")
        with torch.no_grad():
            model.fc3.bias.fill_(float("nan"))
        with pytest.raises(InvalidInput, match="NaN"):
            load_model(weights_to_safetensors(model), SPEC, arch="lenet5")

    @pytest.mark.parametrize("cut", [0, 5, 50, 400])
    def test_truncated_files_get_clear_errors(self, cut: int) -> None:
        data = weights_to_safetensors(build("lenet5"))[:cut]
        with pytest.raises(InvalidInput):
            load_model(data, SPEC, arch="lenet5")

    def test_pickle_with_code_is_refused_and_never_runs(self, tmp_path: Path) -> None:
        marker = tmp_path / "pwned"

        class Payload:
            def __reduce__(self) -> tuple[object, tuple[str]]:
                return (os.system, (f"touch {marker}",))

        for data in (pickle.dumps(Payload()), _torch_save(Payload())):
            with pytest.raises(UnsafeArtifact, match="system"):
                load_model(data, SPEC, arch="lenet5")
        assert not marker.exists()

    def test_size_limit(self) -> None:
        data = weights_to_safetensors(build("lenet5"))
        with pytest.raises(InvalidInput, match="limit"):
            load_model(data, SPEC, arch="lenet5", max_bytes=1000)

    def test_zip_without_model_is_refused(self) -> None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("readme.txt", "hello")
        with pytest.raises(InvalidInput, match=r"TorchScript or torch\.save"):
            load_model(buffer.getvalue(), SPEC)


def _torch_save(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_loaded_model_dataclass_fields() -> None:
    loaded = LoadedModel(
        module=build("lenet5"), format="safetensors", arch="lenet5", num_classes=10
    )
    assert loaded.arch == "lenet5"
