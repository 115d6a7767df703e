"""Safe model loading and saving, whatever the format (`modelguard.formats.registry`).

Accepted: safetensors weights plus a registered architecture name, TorchScript archives,
``torch.save`` state-dict archives read with ``weights_only=True``, torch.export programs
and ONNX models. Every file is scanned first (`modelguard.formats.scan`); a pickle that
can run code is never unpickled. A model comes back in the format it was submitted in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from modelguard.errors import InvalidInput
from modelguard.formats.base import first_line
from modelguard.formats.registry import get_format
from modelguard.formats.safetensors import weights_to_safetensors
from modelguard.formats.scan import scan_model_bytes
from modelguard.nn.architectures import architecture_names
from modelguard.spec import InputSpec

__all__ = ["LoadedModel", "check_model_io", "load_model", "save_model", "weights_to_safetensors"]

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_BYTES = 512 << 20


@dataclass
class LoadedModel:
    """A model ready for inference on inputs of ``spec`` (normalisation not yet applied:
    use ``modelguard.spec.wrap``)."""

    module: nn.Module
    format: str  # a registry name: safetensors | torchscript | torch-zip | torch-export | onnx
    arch: str  # registered name, or "" for formats that hold the architecture
    num_classes: int


def load_model(
    data: bytes,
    spec: InputSpec,
    arch: str = "",
    *,
    max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> LoadedModel:
    """Scan, load and check a model file against its declared input spec.

    Raises ``UnsafeArtifact`` for code-carrying files and ``InvalidInput`` for anything
    malformed, inconsistent with ``spec``, or producing non-finite outputs.
    """
    fmt = get_format(scan_model_bytes(data, max_bytes=max_bytes).kind)
    if fmt.needs_arch and not arch:
        raise InvalidInput(
            f"a {fmt.name} file holds weights only: name its architecture with --arch "
            f"(registered: {', '.join(architecture_names())})"
        )
    arch = arch if fmt.needs_arch else ""
    module = fmt.load(data, spec, arch)
    module.eval()
    num_classes = check_model_io(module, spec)
    return LoadedModel(module=module, format=fmt.name, arch=arch, num_classes=num_classes)


def check_model_io(module: nn.Module, spec: InputSpec) -> int:
    """Run a probe batch through the model: it must accept the declared shape and return
    finite logits of shape (N, K). Returns K."""
    low, high = spec.value_range
    try:
        probe = torch.linspace(0, 1, 2 * spec.channels * spec.shape[1] * spec.shape[2])
        probe = (low + (high - low) * probe).view(2, *spec.shape)
        mean = torch.tensor(spec.mean or (0.0,)).view(1, -1, 1, 1)
        std = torch.tensor(spec.std or (1.0,)).view(1, -1, 1, 1)
        with torch.no_grad():
            out = module((probe - mean) / std)
    except Exception as err:
        raise InvalidInput(
            f"the model does not accept inputs of shape {list(spec.shape)}: {first_line(err)}"
        ) from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidInput(f"the model must return logits of shape (N, classes); got {shape}")
    if out.shape[1] < 2:
        raise InvalidInput("the model returns fewer than two classes")
    if not torch.isfinite(out).all():
        raise InvalidInput("the model returns NaN or infinite outputs on valid inputs")
    return int(out.shape[1])


def save_model(model: LoadedModel) -> bytes:
    """Serialise in the model's own format (TorchScript stays loadable by torch.jit.load
    with the same input/output contract)."""
    return get_format(model.format).save(model.module)
