"""JSON Schemas generated from proto descriptors: every field of every message reached is
in its schema under its JSON name, and what ``json_format`` writes validates against them
(maps, oneofs, nested and repeated messages, enums, 64-bit integers, bytes)."""

from __future__ import annotations

import jsonschema
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor

from modelguard.openapi import COMPONENTS, message_schemas
from modelguard.proto.inference import grpc_predict_v2_pb2 as oip
from modelguard.proto.modelguard.v1 import common_pb2, pruning_orchestrator_pb2


def _reached(message: Descriptor, seen: dict[str, Descriptor]) -> dict[str, Descriptor]:
    if message.full_name not in seen:
        seen[message.full_name] = message
        for field in message.fields:
            if field.message_type is not None and not field.message_type.GetOptions().map_entry:
                _reached(field.message_type, seen)
            elif field.message_type is not None:  # a map: its value type
                value = field.message_type.fields_by_name["value"].message_type
                if value is not None:
                    _reached(value, seen)
    return seen


def _validator(schemas: dict[str, object], name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": COMPONENTS + name, "components": {"schemas": schemas}}
    return jsonschema.Draft202012Validator(root)


@pytest.mark.parametrize(
    "message",
    [pruning_orchestrator_pb2.Audit.DESCRIPTOR, oip.ModelInferRequest.DESCRIPTOR],
    ids=lambda d: d.name,
)
def test_every_field_of_every_reached_message_is_in_the_schemas(message: Descriptor) -> None:
    schemas = message_schemas([message])
    for name, descriptor in _reached(message, {}).items():
        properties = schemas[name]["properties"]
        assert set(properties) == {f.json_name for f in descriptor.fields}, name


def test_enums_list_their_value_names() -> None:
    schemas = message_schemas([pruning_orchestrator_pb2.Audit.DESCRIPTOR])
    assert schemas["modelguard.v1.JobState"]["enum"] == [
        v.name for v in common_pb2.JobState.DESCRIPTOR.values
    ]


def test_json_format_output_validates_and_unknown_fields_do_not() -> None:
    request = oip.ModelInferRequest(model_name="ann", id="7", raw_input_contents=[b"\x00\x01"])
    request.parameters["credential"].string_param = "secret"
    request.parameters["seed"].int64_param = 2**40  # a string in JSON
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    tensor.contents.fp32_contents.extend([0.5] * 6)
    request.outputs.add(name="label")
    schemas = message_schemas([oip.ModelInferRequest.DESCRIPTOR])
    validator = _validator(schemas, "inference.ModelInferRequest")
    document = json_format.MessageToDict(request, always_print_fields_with_no_presence=True)
    validator.validate(document)
    assert document["parameters"]["seed"]["int64Param"] == str(2**40)
    document["inputs"][0]["shapes"] = [1]
    assert not validator.is_valid(document)
    document["inputs"][0].pop("shapes")
    document["inputs"][0]["shape"] = [1.5]  # int64s are strings or integers, never floats
    assert not validator.is_valid(document)

    audit = pruning_orchestrator_pb2.Audit(audit_id="a", state=common_pb2.JOB_STATE_RUNNING)
    audit.signatures["abc"] = "{}"
    audit.stages.add(stage="repair", state=common_pb2.STAGE_STATE_DONE)
    audit_schemas = message_schemas([pruning_orchestrator_pb2.Audit.DESCRIPTOR])
    audit_document = json_format.MessageToDict(audit)
    _validator(audit_schemas, "modelguard.v1.Audit").validate(audit_document)
    audit_document["state"] = "JOB_STATE_SLEEPING"
    assert not _validator(audit_schemas, "modelguard.v1.Audit").is_valid(audit_document)
