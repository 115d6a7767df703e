"""Safe model loading and saving.

Accepted: safetensors weights plus a registered architecture name, TorchScript archives,
and ``torch.save`` state-dict archives read with ``weights_only=True``. Every file is
scanned first (`shared.formats.scan`); a pickle that can run code is never unpickled.
A model comes back in the format it was submitted in.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from shared.errors import InvalidInput
from shared.formats.scan import SAFETENSORS, TORCH_ZIP, TORCHSCRIPT, scan_model_bytes
from shared.nn.architectures import MAX_CLASSES, get_architecture
from shared.spec import InputSpec

log = logging.getLogger(__name__)

MEDIA_TYPES = {
    SAFETENSORS: "application/vnd.modelguard.safetensors",
    TORCHSCRIPT: "application/vnd.modelguard.torchscript",
    TORCH_ZIP: "application/vnd.modelguard.torch-state-dict",
}
DEFAULT_MAX_MODEL_BYTES = 512 << 20


@dataclass
class LoadedModel:
    """A model ready for inference on inputs of ``spec`` (normalisation not yet applied:
    use ``shared.spec.wrap``)."""

    module: nn.Module
    format: str  # safetensors | torchscript | torch-zip
    arch: str  # registered name, or "" for TorchScript
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
    scan = scan_model_bytes(data, max_bytes=max_bytes)
    if scan.kind == TORCHSCRIPT:
        module = _load_torchscript(data)
        fmt_arch = ""
    else:
        if not arch:
            raise InvalidInput(
                f"a {scan.kind} file holds weights only: name its architecture with --arch "
                "(registered: lenet5, vgg_small, resnet18_small)"
            )
        state = _load_state_dict(data, scan.kind)
        module = _build_from_state(arch, state, spec)
        fmt_arch = arch
    module.eval()
    num_classes = check_model_io(module, spec)
    return LoadedModel(module=module, format=scan.kind, arch=fmt_arch, num_classes=num_classes)


def _load_torchscript(data: bytes) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is still our format
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as err:  # TorchScript raises RuntimeError subclasses for every defect
        raise InvalidInput(f"TorchScript archive could not be loaded: {_first_line(err)}") from err
    return module  # type: ignore[no-any-return]


def _load_state_dict(data: bytes, kind: str) -> dict[str, torch.Tensor]:
    try:
        if kind == SAFETENSORS:
            return safetensors_load(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise InvalidInput(f"{kind} weights could not be read: {_first_line(err)}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InvalidInput("torch.save archive does not hold a state dict of tensors")
    return state


def _build_from_state(arch: str, state: dict[str, torch.Tensor], spec: InputSpec) -> nn.Module:
    info = get_architecture(arch)
    for key in (info.input_key, info.classifier_key):
        if key not in state:
            raise InvalidInput(f"weights lack {key!r}: they are not a {arch} state dict")
        if state[key].dim() < 2:
            raise InvalidInput(
                f"weights {key!r} have shape {list(state[key].shape)}: not a {arch} state dict"
            )
    in_channels = int(state[info.input_key].shape[1])
    if in_channels != spec.channels:
        raise InvalidInput(
            f"the {arch} weights take {in_channels} input channel(s) but the declared input "
            f"shape {','.join(map(str, spec.shape))} has {spec.channels}"
        )
    num_classes = int(state[info.classifier_key].shape[0])
    if not 2 <= num_classes <= MAX_CLASSES:
        raise InvalidInput(
            f"the weights declare {num_classes} classes; 2 to {MAX_CLASSES} are supported"
        )
    try:
        module = info.factory(in_channels=in_channels, num_classes=num_classes, hw=spec.shape[1:])
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, MemoryError) as err:
        raise InvalidInput(f"weights do not fit {arch}: {_first_line(err)}") from err
    return module


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
            f"the model does not accept inputs of shape {list(spec.shape)}: {_first_line(err)}"
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
    if model.format == TORCHSCRIPT:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(model.module, buffer)
        return buffer.getvalue()
    state = {k: v.detach().contiguous().clone() for k, v in model.module.state_dict().items()}
    if model.format == TORCH_ZIP:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()
    return safetensors_save(state)


def weights_to_safetensors(module: nn.Module) -> bytes:
    return safetensors_save({k: v.detach().contiguous() for k, v in module.state_dict().items()})


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
