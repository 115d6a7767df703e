"""Load an audit's model and clean data from the store, safely, for any stage."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import PlatformSettings
from shared.convert import ref_from_proto, spec_from_proto
from shared.datasets import Dataset, load_npz
from shared.errors import InvalidInput
from shared.formats.loader import LoadedModel, load_model
from shared.proto.modelguard.v1 import common_pb2
from shared.spec import InputSpec
from shared.store.base import ArtifactStore


@dataclass
class ModelAndData:
    model: LoadedModel
    data: Dataset | None
    spec: InputSpec


def load_model_spec(
    store: ArtifactStore, model: common_pb2.ModelSpec, platform: PlatformSettings
) -> tuple[LoadedModel, InputSpec]:
    spec = spec_from_proto(model.input)
    ref = ref_from_proto(model.artifact, "model")
    if ref.size > platform.max_model_bytes:
        raise InvalidInput(f"model is {ref.size} bytes; the limit is {platform.max_model_bytes}")
    loaded = load_model(
        store.get_blob(ref), spec, arch=model.arch, max_bytes=platform.max_model_bytes
    )
    if model.input.num_classes and model.input.num_classes != loaded.num_classes:
        raise InvalidInput(
            f"declared {model.input.num_classes} classes but the model outputs {loaded.num_classes}"
        )
    return loaded, spec


def load_inputs(
    store: ArtifactStore,
    model: common_pb2.ModelSpec,
    data: common_pb2.ArtifactRef | None,
    platform: PlatformSettings,
) -> ModelAndData:
    loaded, spec = load_model_spec(store, model, platform)
    dataset = None
    if data is not None and data.sha256:
        ref = ref_from_proto(data, "dataset")
        if ref.size > platform.max_dataset_bytes:
            raise InvalidInput(
                f"dataset is {ref.size} bytes; the limit is {platform.max_dataset_bytes}"
            )
        dataset = load_npz(store.get_blob(ref), spec, num_classes=loaded.num_classes)
    return ModelAndData(model=loaded, data=dataset, spec=spec)
