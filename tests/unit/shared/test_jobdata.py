"""One loader: the services' store path and the CLI's bytes path are the same code, with
the platform's size limits."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from modelguard.config import PlatformSettings
from modelguard.convert import ref_to_proto, spec_to_proto
from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.errors import InvalidInput, UnsafeArtifact
from modelguard.jobdata import Limits, load_inputs, load_inputs_from_bytes, load_weights_only
from modelguard.proto.modelguard.v1 import common_pb2
from modelguard.spec import InputSpec
from modelguard.store.local import LocalStore

SPEC = InputSpec((1, 6, 6))


def scripted() -> bytes:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    return buffer.getvalue()


def npz(n: int = 12) -> bytes:
    return dataset_to_npz(Dataset(torch.rand(n, 1, 6, 6), torch.arange(n) % 3))


def test_store_path_and_bytes_path_load_the_same(tmp_path: Path) -> None:
    model, data = scripted(), npz()
    store = LocalStore(tmp_path)
    spec = common_pb2.ModelSpec(
        artifact=ref_to_proto(store.put_blob(model)), input=spec_to_proto(SPEC)
    )
    from_store = load_inputs(store, spec, ref_to_proto(store.put_blob(data)), PlatformSettings())
    from_bytes = load_inputs_from_bytes(model, data, SPEC, "", Limits.of(PlatformSettings()))
    for inputs in (from_store, from_bytes):
        assert inputs.model.num_classes == 3 and inputs.model.format == "torchscript"
        assert inputs.data is not None and len(inputs.data) == 12
    assert from_store.data is not None and from_bytes.data is not None
    assert torch.equal(from_store.data.x, from_bytes.data.x)


def test_limits_apply_to_both_files() -> None:
    model, data = scripted(), npz()
    with pytest.raises(InvalidInput, match="the limit is 100"):
        load_inputs_from_bytes(model, data, SPEC, "", Limits(100, 1 << 30))
    with pytest.raises(InvalidInput, match=r"dataset is \d+ bytes; the limit is 100"):
        load_inputs_from_bytes(model, data, SPEC, "", Limits(1 << 30, 100))
    # no dataset: the model alone
    assert load_inputs_from_bytes(model, None, SPEC, "", Limits(1 << 30, 100)).data is None


def test_a_refused_model_costs_no_dataset_download(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    spec = common_pb2.ModelSpec(
        artifact=ref_to_proto(store.put_blob(b"\x80\x04K\x01.")), input=spec_to_proto(SPEC)
    )
    missing = common_pb2.ArtifactRef(sha256="0" * 64, key="nowhere", size=10)
    with pytest.raises((InvalidInput, UnsafeArtifact)):
        load_inputs(store, spec, missing, PlatformSettings())


def test_weights_only_walks_parameters_without_an_architecture() -> None:
    module = load_weights_only(scripted(), Limits(1 << 30, 1 << 30))
    assert {name for name, _ in module.named_parameters()} == {"1.weight", "1.bias"}
    with pytest.raises(UnsafeArtifact):
        load_weights_only(pickle.dumps(os.system), Limits(1 << 30, 1 << 30))
