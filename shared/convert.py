"""Conversions between protobuf messages and domain types (MLServer's to_types /
from_types). Protobuf never enters algorithm code."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from modelguard.errors import InvalidInput
from modelguard.formats.registry import FORMATS
from modelguard.proto.modelguard.v1 import common_pb2
from modelguard.spec import InputSpec
from modelguard.store.base import ArtifactRef

#: Registry name -> ModelFormat enum value (MODEL_FORMAT_<NAME>, "-" as "_"): a format
#: missing from the proto fails at import, not at the first submission.
FORMAT_TO_PROTO: dict[str, common_pb2.ModelFormat.ValueType] = {
    name: common_pb2.ModelFormat.Value("MODEL_FORMAT_" + name.upper().replace("-", "_"))
    for name in FORMATS
}


def ref_to_proto(ref: ArtifactRef | None) -> common_pb2.ArtifactRef:
    if ref is None:
        return common_pb2.ArtifactRef()
    return common_pb2.ArtifactRef(
        sha256=ref.sha256, key=ref.key, size=ref.size, media_type=ref.media_type
    )


def ref_from_proto(msg: common_pb2.ArtifactRef, what: str = "artifact") -> ArtifactRef:
    sha = msg.sha256.lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise InvalidInput(f"{what} reference needs a sha256 hex digest; got {msg.sha256!r}")
    return ArtifactRef(sha256=sha, key=msg.key, size=msg.size, media_type=msg.media_type)


def ref_or_none(msg: common_pb2.ArtifactRef) -> ArtifactRef | None:
    return ref_from_proto(msg) if msg.sha256 else None


def spec_to_proto(spec: InputSpec) -> common_pb2.InputSpec:
    return common_pb2.InputSpec(
        shape=list(spec.shape),
        value_min=spec.value_range[0],
        value_max=spec.value_range[1],
        mean=list(spec.mean),
        std=list(spec.std),
    )


def spec_from_proto(msg: common_pb2.InputSpec) -> InputSpec:
    if len(msg.shape) == 0:
        raise InvalidInput(
            "the input spec is missing: declare the input shape and value range "
            "(e.g. --input-shape 1,28,28 --value-range 0,1); it is never guessed"
        )
    if len(msg.shape) != 3:
        raise InvalidInput(f"input shape must be C,H,W; got {list(msg.shape)}")
    return InputSpec(
        shape=(msg.shape[0], msg.shape[1], msg.shape[2]),
        value_range=(msg.value_min, msg.value_max),
        mean=tuple(msg.mean),
        std=tuple(msg.std),
    )


M = TypeVar("M", bound=Message)


def parse_message(data: bytes, cls: type[M]) -> M:
    """Decode a record value; malformed bytes are bad input (dead-lettered, not retried)."""
    message = cls()
    try:
        message.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise InvalidInput(f"malformed {cls.__name__} message: {err}") from err
    return message
