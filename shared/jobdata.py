"""Load an audit's model and clean data, safely, for any stage and for the CLI.

One loader: the services fetch the bytes from the store (`load_inputs`, `load_model_spec`),
the ``modelguard`` command reads them from files; both then go through
`load_inputs_from_bytes` (scan, load, check against the declared input, size limits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from modelguard.config import PlatformSettings
from modelguard.convert import ref_from_proto, spec_from_proto
from modelguard.datasets import Dataset, load_npz
from modelguard.errors import InvalidInput
from modelguard.formats.loader import LoadedModel, load_model
from modelguard.proto.modelguard.v1 import common_pb2
from modelguard.spec import InputSpec
from modelguard.store.base import ArtifactStore


@dataclass
class ModelAndData:
    model: LoadedModel
    data: Dataset | None
    spec: InputSpec


@dataclass(frozen=True)
class Limits:
    """Largest accepted files (the platform's ``max_model_bytes``/``max_dataset_bytes``)."""

    max_model_bytes: int
    max_dataset_bytes: int

    @classmethod
    def of(cls, platform: PlatformSettings) -> Limits:
        return cls(platform.max_model_bytes, platform.max_dataset_bytes)


def check_size(what: str, size: int, limit: int) -> None:
    if size > limit:
        raise InvalidInput(f"{what} is {size} bytes; the limit is {limit}")


def load_model_from_bytes(
    model_bytes: bytes, spec: InputSpec, arch: str, limits: Limits, *, num_classes: int = 0
) -> LoadedModel:
    """Scan, load and check a model file (``num_classes``: the declared count, 0: any)."""
    loaded = load_model(model_bytes, spec, arch=arch, max_bytes=limits.max_model_bytes)
    if num_classes and num_classes != loaded.num_classes:
        raise InvalidInput(
            f"declared {num_classes} classes but the model outputs {loaded.num_classes}"
        )
    return loaded


def load_data_from_bytes(
    data_bytes: bytes, spec: InputSpec, num_classes: int, limits: Limits
) -> Dataset:
    check_size("dataset", len(data_bytes), limits.max_dataset_bytes)
    return load_npz(data_bytes, spec, num_classes=num_classes)


def load_inputs_from_bytes(
    model_bytes: bytes,
    data_bytes: bytes | None,
    spec: InputSpec,
    arch: str,
    limits: Limits,
    *,
    num_classes: int = 0,
) -> ModelAndData:
    """The model (and the clean dataset, when given) of one audit or CLI command."""
    dataset = None if data_bytes is None else (lambda: data_bytes)
    return _load_inputs(model_bytes, dataset, spec, arch, limits, num_classes)


def _load_inputs(
    model_bytes: bytes,
    data: Callable[[], bytes] | None,
    spec: InputSpec,
    arch: str,
    limits: Limits,
    num_classes: int,
) -> ModelAndData:
    """``data`` is fetched only once the model has passed: a refused model costs no
    dataset download."""
    loaded = load_model_from_bytes(model_bytes, spec, arch, limits, num_classes=num_classes)
    dataset = None
    if data is not None:
        dataset = load_data_from_bytes(data(), spec, loaded.num_classes, limits)
    return ModelAndData(model=loaded, data=dataset, spec=spec)


def load_weights_only(model_bytes: bytes, limits: Limits) -> nn.Module:
    """Leak forensics needs parameters, not a forward pass: the file's weights as a
    module, whatever the architecture (none is needed). The file is scanned first: a
    pickle that can run code is refused before anything is loaded."""
    from modelguard.formats.registry import get_format
    from modelguard.formats.scan import scan_model_bytes

    scan = scan_model_bytes(model_bytes, max_bytes=limits.max_model_bytes)
    # the formats registry: the one weights-only call site (the scan sniffed the format)
    return get_format(scan.kind).load_weights(model_bytes)


# --- from the store ------------------------------------------------------------------------
def _get(store: ArtifactStore, ref: common_pb2.ArtifactRef, what: str, limit: int) -> bytes:
    artifact = ref_from_proto(ref, what)
    check_size(what, artifact.size, limit)  # before the download
    return store.get_blob(artifact)


def load_model_spec(
    store: ArtifactStore, model: common_pb2.ModelSpec, platform: PlatformSettings
) -> tuple[LoadedModel, InputSpec]:
    inputs = load_inputs(store, model, None, platform)
    return inputs.model, inputs.spec


def load_reference_model(
    store: ArtifactStore,
    ref: common_pb2.ArtifactRef,
    model: common_pb2.ModelSpec,
    platform: PlatformSettings,
    *,
    num_classes: int = 0,
) -> LoadedModel | None:
    """An audit's reference model (`AuditOptions.reference_model`): scanned, loaded and
    checked as the submitted ``model`` is, with its arch, input and class count
    (``num_classes``, the loaded model's; 0: the declared one, if any); None when unset."""
    if not ref.sha256:
        return None
    limits = Limits.of(platform)
    data = _get(store, ref, "reference model", limits.max_model_bytes)
    classes = num_classes or model.input.num_classes
    return load_model_from_bytes(
        data, spec_from_proto(model.input), model.arch, limits, num_classes=classes
    )


def load_inputs(
    store: ArtifactStore,
    model: common_pb2.ModelSpec,
    data: common_pb2.ArtifactRef | None,
    platform: PlatformSettings,
) -> ModelAndData:
    limits = Limits.of(platform)
    spec = spec_from_proto(model.input)
    model_bytes = _get(store, model.artifact, "model", limits.max_model_bytes)
    dataset = None
    if data is not None and data.sha256:
        dataset = partial(_get, store, data, "dataset", limits.max_dataset_bytes)
    return _load_inputs(model_bytes, dataset, spec, model.arch, limits, model.input.num_classes)
