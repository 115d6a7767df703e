"""JSON Schemas of protobuf messages, from their descriptors, for OpenAPI documents.

The schemas describe the proto3 JSON mapping that ``google.protobuf.json_format`` writes
and reads (field names in lowerCamelCase, enums by name, 64-bit integers and bytes as
strings), so an HTTP face that speaks it and documents itself with them cannot drift from
the .proto files. The dialect is JSON Schema 2020-12, which OpenAPI 3.1 uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

Schema = dict[str, Any]
COMPONENTS = "#/components/schemas/"

_SCALARS: dict[int, Schema] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int32", "minimum": 0},
    # 64-bit integers are written as strings in proto3 JSON (a double cannot hold them
    # exactly); numbers are accepted on input
    FieldDescriptor.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": ["string", "integer"], "format": "uint64"},
    FieldDescriptor.TYPE_FIXED64: {"type": ["string", "integer"], "format": "uint64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},  # base64
}


def ref(full_name: str) -> Schema:
    return {"$ref": COMPONENTS + full_name}


def _enum_schema(enum: EnumDescriptor) -> Schema:
    return {"type": "string", "enum": [value.name for value in enum.values]}


def _value_schema(field: FieldDescriptor, pending: list[Descriptor | EnumDescriptor]) -> Schema:
    target: Descriptor | EnumDescriptor | None = field.message_type or field.enum_type
    if target is None:
        return dict(_SCALARS[field.type])
    pending.append(target)
    return ref(target.full_name)


def _field_schema(field: FieldDescriptor, pending: list[Descriptor | EnumDescriptor]) -> Schema:
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        value = message.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _value_schema(value, pending)}
    schema = _value_schema(field, pending)
    if field.is_repeated:
        return {"type": "array", "items": schema}
    return schema


def _message_schema(message: Descriptor, pending: list[Descriptor | EnumDescriptor]) -> Schema:
    return {
        "type": "object",
        "properties": {f.json_name: _field_schema(f, pending) for f in message.fields},
        "additionalProperties": False,
    }


def message_schemas(messages: Iterable[Descriptor]) -> dict[str, Schema]:
    """Schemas of ``messages`` and of every message and enum their fields reach, keyed by
    full proto name (referenced as ``#/components/schemas/<full name>``)."""
    schemas: dict[str, Schema] = {}
    pending: list[Descriptor | EnumDescriptor] = list(messages)
    while pending:
        item = pending.pop()
        if item.full_name in schemas:
            continue
        if isinstance(item, EnumDescriptor):
            schemas[item.full_name] = _enum_schema(item)
        else:
            schemas[item.full_name] = _message_schema(item, pending)
    return dict(sorted(schemas.items()))
