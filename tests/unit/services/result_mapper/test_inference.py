"""result-mapper's Open Inference Protocol (KServe v2) face, called by a KServe v2 gRPC
client (the generated ``GRPCInferenceServiceStub``) on a real in-process server with
bearer-token authentication on: it answers as Map does, from raw or typed inputs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from modelguard.carrier.carrier import MappingNetwork, mapper_to_safetensors
from modelguard.carrier.mapper_registry import hash_credential, new_credential
from modelguard.carrier.records import READY, CarrierRecord, CarrierRepository
from modelguard.config import PlatformSettings, ResultMapperSettings
from modelguard.proto.inference import grpc_predict_v2_pb2 as oip
from modelguard.proto.inference.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from modelguard.proto.modelguard.v1 import result_mapper_pb2, result_mapper_pb2_grpc
from modelguard.runtime import ServiceApp
from modelguard.services.carrier_trainer.service import ref_dict
from modelguard.services.launcher import build_service
from tests.unit.authkit import Tokens, write_tokens

IN_FEATURES, CLASSES = 10, 4
USER = "ann"


@dataclass
class Served:
    app: ServiceApp
    tokens: Tokens
    credential: str
    channel: grpc.Channel

    @property
    def stub(self) -> GRPCInferenceServiceStub:
        return GRPCInferenceServiceStub(self.channel)

    def auth(self, token: str | None = None) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {token or self.tokens.acme}")]


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Served]:
    tokens = write_tokens(tmp_path)
    platform = PlatformSettings(store_dir=tmp_path / "store", auth_tokens_file=str(tokens.file))
    settings = ResultMapperSettings(
        grpc_port=0, metrics_port=-1, worker=False, profile_scoring=False
    )
    app = build_service("result-mapper", platform, settings)
    store, signer = app.runtime.store, app.runtime.signer
    torch.manual_seed(0)
    mapper = store.put_blob(mapper_to_safetensors(MappingNetwork(IN_FEATURES, CLASSES, 8)))
    credential = new_credential()
    CarrierRepository(store).put(
        CarrierRecord(
            user_id=USER,
            generation=3,
            credential_hash=hash_credential(credential),
            state=READY,
            artifacts={"mapper": ref_dict(mapper)},
            signatures={"mapper": signer.sign(mapper.sha256, "mapper")},
        )
    )
    app.start()
    channel = grpc.insecure_channel(app.address)
    yield Served(app, tokens, credential, channel)
    channel.close()
    app.stop(0.5)
    app.runtime.bus.close()


def _rows(count: int) -> np.ndarray:
    return np.random.default_rng(count).normal(size=(count, IN_FEATURES)).astype(np.float32)


def _request(
    rows: np.ndarray, credential: str, *, raw: bool, shape: list[int] | None = None
) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=USER, id="req-1")
    request.parameters["credential"].string_param = credential
    tensor = request.inputs.add(
        name="pseudo_output", datatype="FP32", shape=shape or list(rows.shape)
    )
    if raw:
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    return request


def _mapped(served: Served, rows: np.ndarray) -> result_mapper_pb2.MapResponse:
    """The same rows through Map, for comparison."""
    stub = result_mapper_pb2_grpc.ResultMapperStub(served.channel)
    request = result_mapper_pb2.MapRequest(
        user_id=USER,
        credential=served.credential,
        pseudo_output=rows.astype("<f4").tobytes(),
        rows=len(rows),
    )
    response: result_mapper_pb2.MapResponse = stub.Map(request, metadata=served.auth())
    return response


def test_raw_input_contents_answer_as_map_does(served: Served) -> None:
    rows = _rows(5)
    response = served.stub.ModelInfer(
        _request(rows, served.credential, raw=True), metadata=served.auth()
    )
    expected = _mapped(served, rows)
    assert (response.model_name, response.model_version, response.id) == (USER, "3", "req-1")
    label, probabilities = response.outputs
    assert (label.name, label.datatype, list(label.shape)) == ("label", "INT32", [5])
    assert (probabilities.datatype, list(probabilities.shape)) == ("FP32", [5, CLASSES])
    labels = np.frombuffer(response.raw_output_contents[0], dtype="<i4")
    scores = np.frombuffer(response.raw_output_contents[1], dtype="<f4").reshape(5, CLASSES)
    np.testing.assert_array_equal(labels, list(expected.labels))
    np.testing.assert_array_equal(
        scores, np.frombuffer(expected.probabilities, "<f4").reshape(5, -1)
    )
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(labels, scores.argmax(axis=1))


def test_fp32_contents_answer_in_typed_contents_and_only_the_outputs_asked(
    served: Served,
) -> None:
    rows = _rows(3)
    request = _request(rows, served.credential, raw=False)
    request.outputs.add(name="label")
    response = served.stub.ModelInfer(request, metadata=served.auth())
    assert not response.raw_output_contents
    assert [o.name for o in response.outputs] == ["label"]
    assert list(response.outputs[0].contents.int_contents) == list(_mapped(served, rows).labels)


@pytest.mark.parametrize(
    ("shape", "reason"),
    [([2, IN_FEATURES], "needs 20"), ([3, IN_FEATURES, 1], "must have shape [N, D]")],
)
def test_a_wrong_shape_is_invalid_argument(served: Served, shape: list[int], reason: str) -> None:
    request = _request(_rows(3), served.credential, raw=False, shape=shape)
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(request, metadata=served.auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in err.value.details()


def test_rows_of_the_wrong_width_and_unknown_outputs_are_invalid_argument(
    served: Served,
) -> None:
    narrow = np.zeros((2, IN_FEATURES - 1), np.float32)
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(
            _request(narrow, served.credential, raw=True), metadata=served.auth()
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = _request(_rows(1), served.credential, raw=True)
    request.outputs.add(name="logits")
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(request, metadata=served.auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logits" in err.value.details()


def test_bearer_token_and_carrier_credential_are_both_required(served: Served) -> None:
    request = _request(_rows(1), served.credential, raw=True)
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(request, metadata=served.auth("mg1.nope.nope"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    del request.parameters["credential"]
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(request, metadata=served.auth())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "'credential'" in err.value.details()
    wrong = _request(_rows(1), new_credential(), raw=True)
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(wrong, metadata=served.auth())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_health_is_open_and_models_are_versioned_by_generation(served: Served) -> None:
    stub = served.stub
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    auth = served.auth()
    assert stub.ServerMetadata(oip.ServerMetadataRequest(), metadata=auth).name
    assert stub.ModelReady(oip.ModelReadyRequest(name=USER), metadata=auth).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name=USER, version="2"), metadata=auth).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="nobody"), metadata=auth).ready
    metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name=USER), metadata=auth)
    assert list(metadata.versions) == ["3"]
    assert [t.name for t in metadata.outputs] == ["label", "probabilities"]
    stale = _request(_rows(1), served.credential, raw=True)
    stale.model_version = "2"
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(stale, metadata=auth)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
