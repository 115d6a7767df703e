"""The Open Inference Protocol (KServe v2) face of result-mapper, beside Map: Triton and
KServe clients call ``ModelInfer`` with the model name set to their user id, the
credential issued with their carrier as the request parameter ``credential``, and one
input tensor, the public model's outputs (FP32, shape ``[N, D]``). The answer has two
output tensors: ``label`` (INT32, ``[N]``) and ``probabilities`` (FP32, ``[N, C]``). It is
the same Map call underneath (same credential check, limits and extraction detector)."""

from __future__ import annotations

import grpc
import numpy as np

from modelguard.carrier.mapper_registry import MapResult
from modelguard.errors import InvalidInput, ModelGuardError, NotFound, Unauthenticated
from modelguard.proto.inference import grpc_predict_v2_pb2 as oip
from modelguard.proto.inference import grpc_predict_v2_pb2_grpc
from modelguard.services.result_mapper.service import ResultMapperService
from modelguard.status import package_version

SERVER_NAME = "modelguard-result-mapper"
INPUT = "pseudo_output"
LABEL = "label"
PROBABILITIES = "probabilities"
OUTPUTS = (LABEL, PROBABILITIES)
CREDENTIAL_PARAMETER = "credential"


def _pseudo_output(request: oip.ModelInferRequest) -> tuple[bytes, int]:
    """The request's one input as Map's wire format (little-endian float32) and its rows."""
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"ModelInfer takes one input tensor, {INPUT!r} (FP32, shape [N, D]: the public "
            f"model's outputs); got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise InvalidInput(f"input {tensor.name!r} must be FP32; got {tensor.datatype!r}")
    shape = list(tensor.shape)
    if len(shape) != 2 or min(shape) < 1:
        raise InvalidInput(
            f"input {tensor.name!r} must have shape [N, D] (N rows of the public model's D "
            f"outputs); got {shape}"
        )
    count = shape[0] * shape[1]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1 or tensor.HasField("contents"):
            raise InvalidInput(
                "send the input either in raw_input_contents (one entry) or in contents, not both"
            )
        data = request.raw_input_contents[0]
        if len(data) != count * 4:
            raise InvalidInput(
                f"raw_input_contents holds {len(data)} bytes; shape {shape} of FP32 needs "
                f"{count * 4}"
            )
        return data, shape[0]
    values = tensor.contents.fp32_contents
    if len(values) != count:
        raise InvalidInput(
            f"input {tensor.name!r} has {len(values)} fp32_contents values; shape {shape} "
            f"needs {count}"
        )
    return np.asarray(values, dtype="<f4").tobytes(), shape[0]


def _requested(request: oip.ModelInferRequest) -> list[str]:
    names = [output.name for output in request.outputs] or list(OUTPUTS)
    unknown = sorted(set(names) - set(OUTPUTS))
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
    return names


def _response(
    request: oip.ModelInferRequest, names: list[str], result: MapResult
) -> oip.ModelInferResponse:
    response = oip.ModelInferResponse(
        model_name=request.model_name, model_version=str(result.generation), id=request.id
    )
    rows = len(result.labels)
    raw = bool(request.raw_input_contents)  # answered in the form the values came in
    for name in names:
        tensor = response.outputs.add(name=name)
        if name == LABEL:
            tensor.datatype, tensor.shape[:] = "INT32", [rows]
            if raw:
                response.raw_output_contents.append(result.labels.astype("<i4").tobytes())
            else:
                tensor.contents.int_contents.extend(result.labels.tolist())
        else:
            tensor.datatype, tensor.shape[:] = "FP32", [rows, result.classes]
            if raw:
                response.raw_output_contents.append(result.probabilities_bytes())
            else:
                tensor.contents.fp32_contents.extend(result.probabilities.ravel().tolist())
    return response


class InferenceServicer(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService``: a model is a user's mapper; its version is the
    carrier generation."""

    def __init__(self, service: ResultMapperService) -> None:
        self.service = service

    def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)  # mappers load on demand

    def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=package_version())

    def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.ServicerContext
    ) -> oip.ModelReadyResponse:
        generation = self.service.generation(request.name)
        ready = generation is not None and request.version in ("", str(generation))
        return oip.ModelReadyResponse(ready=ready)

    def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ModelMetadataResponse:
        generation = self.service.generation(request.name)
        if generation is None:
            raise NotFound(f"no carrier is ready for user {request.name!r}")
        tensor = oip.ModelMetadataResponse.TensorMetadata
        # D and C are the carrier's; they are not disclosed without the credential
        return oip.ModelMetadataResponse(
            name=request.name,
            versions=[str(generation)],
            platform="modelguard-mapper",
            inputs=[tensor(name=INPUT, datatype="FP32", shape=[-1, -1])],
            outputs=[
                tensor(name=LABEL, datatype="INT32", shape=[-1]),
                tensor(name=PROBABILITIES, datatype="FP32", shape=[-1, -1]),
            ],
        )

    def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.ServicerContext
    ) -> oip.ModelInferResponse:
        try:
            credential = request.parameters.get(CREDENTIAL_PARAMETER)
            if credential is None or not credential.string_param:
                raise Unauthenticated(
                    "no credential: send the credential issued with your carrier as the "
                    f"string request parameter {CREDENTIAL_PARAMETER!r}"
                )
            pseudo, rows = _pseudo_output(request)
            names = _requested(request)
            generation = self.service.generation(request.model_name)
            stale = generation is not None and request.model_version not in ("", str(generation))
            if stale:
                raise NotFound(
                    f"version {request.model_version} of model {request.model_name!r} is not "
                    f"served; the current one is {generation}"
                )
            result = self.service.map(request.model_name, credential.string_param, pseudo, rows)
        except ModelGuardError as err:
            self.service.refusals.labels(err.code.name).inc()
            raise
        return _response(request, names, result)
