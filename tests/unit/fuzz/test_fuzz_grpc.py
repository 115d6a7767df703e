"""Fuzzing of every gRPC method of the six services.

One in-process stack (memory bus, local store in a temporary directory, no job workers:
nothing consumes the audits and carriers that valid generated requests may queue). The
store is seeded so that generated requests can reach past the first checks: valid and
hostile models, datasets and trigger artifacts are stored, one audit exists, one user has
a queued carrier and one a ready carrier with a mapper (the Map path is exercised with
real pseudo-outputs, NaN/Inf included).

Requests are generated from the message descriptors: every field of every request type,
strings (empty, unicode, NUL, traversal, 1 MB), integers (negative, boundaries, huge),
floats (NaN, ±Inf, subnormal), bytes (empty, random, a few MB, float32-packed NaN/Inf),
repeated fields of random length (up to 300,000 elements), unknown enum values, nested
messages; domain-aware values are mixed in (stored artifact references, known users and
credentials, the audit id, layer names, repair modes, detectors and rules). Streaming
methods get streams of such messages. Separately, raw bytes (random, mutated
serialisations, unknown fields, invalid UTF-8, wrong wire types, lying lengths, deep
nesting) are sent with identity serialisers.

Each call has a deadline. Allowed outcomes: OK and the client-error codes below. INTERNAL
(an unexpected exception: the server's incident log is captured and the exception type
and place are reported), UNKNOWN, DEADLINE_EXCEEDED (a hang) and every other code fail,
and so does a RESOURCE_EXHAUSTED that is not the service's answer but gRPC's (the
service's error message was too long for the 16 KiB status trailer).
After each batch, every service must still answer SERVING on grpc.health.v1 and serve a
valid request.

Budget: ``MODELGUARD_FUZZ_EXAMPLES`` (examples per method), ``MODELGUARD_FUZZ_SEED``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, seed
from hypothesis import strategies as st

from modelguard.carrier.mapper_registry import hash_credential
from modelguard.carrier.query_profile import QueryProfile
from modelguard.carrier.records import READY, CarrierRecord, CarrierRepository
from modelguard.config import PlatformSettings
from modelguard.convert import ref_to_proto
from modelguard.detection.registry import DETECTORS
from modelguard.detection.triggers import save_triggers
from modelguard.proto.modelguard.v1 import (
    carrier_trainer_pb2,
    common_pb2,
    jobs_pb2,
    leak_detector_pb2,
    neuron_scoring_pb2,
    pruning_orchestrator_pb2,
    result_mapper_pb2,
    trigger_reversal_pb2,
)
from modelguard.repair.registry import REPAIR_CHOICES
from modelguard.services.launcher import Stack, start_stack
from tests.unit.fuzz import (
    Seeds,
    Tally,
    fuzz_seed,
    fuzz_settings,
    normalise,
    project_frame,
    register_summary,
    seeds,
    tally,
)

pytestmark = pytest.mark.timeout(300)

ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
CALL_TIMEOUT_S = 15.0
HEALTH_EVERY = 25  # examples between health checks inside a batch
STRUCTURED_EXAMPLES = 40
#: Methods whose requests can reach deep (model loading, scoring, mapping) get more.
DEEP_EXAMPLES = {
    "ScanModel": 150, "SubmitAudit": 100, "ScoreNeurons": 80, "ReverseTriggers": 60,
    "Map": 80, "MapStream": 60, "DownloadCarrier": 60, "DownloadArtifact": 60,
}  # fmt: skip
RAW_EXAMPLES = 60  # per service
MAPPER_IN = 10  # inputs of the seeded mapper (the public model's 10 scores)

SERVICES = {
    "modelguard.v1.PruningOrchestrator": ("pruning-orchestrator", pruning_orchestrator_pb2),
    "modelguard.v1.TriggerReversal": ("trigger-reversal", trigger_reversal_pb2),
    "modelguard.v1.NeuronScoring": ("neuron-scoring", neuron_scoring_pb2),
    "modelguard.v1.LeakDetector": ("leak-detector", leak_detector_pb2),
    "modelguard.v1.CarrierTrainer": ("carrier-trainer", carrier_trainer_pb2),
    "modelguard.v1.ResultMapper": ("result-mapper", result_mapper_pb2),
}


@dataclasses.dataclass(frozen=True)
class Method:
    service: str  # full proto name
    name: str
    descriptor: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def label(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}/{self.name}"

    @property
    def request_type(self) -> type[Message]:
        return message_factory.GetMessageClass(self.descriptor.input_type)

    @property
    def response_type(self) -> type[Message]:
        return message_factory.GetMessageClass(self.descriptor.output_type)

    @property
    def client_streaming(self) -> bool:
        return bool(self.descriptor.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.descriptor.server_streaming)


def all_methods() -> list[Method]:
    methods = []
    for full_name, (_app, module) in SERVICES.items():
        service = module.DESCRIPTOR.services_by_name[full_name.rsplit(".", 1)[-1]]
        methods.extend(Method(full_name, m.name, m) for m in service.methods)
    return methods


METHODS = all_methods()


# --------------------------------------------------------------------------------------
# The stack and its seeded state
# --------------------------------------------------------------------------------------


class IncidentLog(logging.Handler):
    """Captures the server's "unhandled error … (incident ID)" lines with their
    exception, so an INTERNAL status can be traced to the raising line."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.incidents: dict[str, tuple[str, str, str]] = {}
        self.other: list[str] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        summary = (
            f"{type(exc).__module__}.{type(exc).__qualname__}" if exc else "?",
            project_frame(exc.__traceback__) if exc else "?",
            str(exc)[:300] if exc else record.getMessage(),
        )
        with self._lock:
            match = re.search(r"incident ([0-9a-f]+)", record.getMessage())
            if match:
                self.incidents[match.group(1)] = summary
            elif len(self.other) < 100:
                self.other.append(" | ".join(summary))

    def lookup(self, details: str) -> tuple[str, str, str] | None:
        match = re.search(r"incident ([0-9a-f]+)", details or "")
        if not match:
            return None
        for _ in range(50):  # the log line is written just before the status is sent
            with self._lock:
                if match.group(1) in self.incidents:
                    return self.incidents[match.group(1)]
            time.sleep(0.01)
        return None


@dataclasses.dataclass
class World:
    stack: Stack
    channels: dict[str, grpc.Channel]
    refs: dict[str, common_pb2.ArtifactRef]
    audit_id: str
    ready_user: str
    ready_credential: str
    queued_user: str
    queued_credential: str
    incidents: IncidentLog
    seeds: Seeds

    def channel(self, service: str) -> grpc.Channel:
        return self.channels[service]


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _model_spec(ref: common_pb2.ArtifactRef, arch: str = "lenet5") -> common_pb2.ModelSpec:
    return common_pb2.ModelSpec(
        artifact=ref,
        format=common_pb2.MODEL_FORMAT_SAFETENSORS,
        arch=arch,
        input=common_pb2.InputSpec(shape=[1, 28, 28], value_min=0.0, value_max=1.0),
    )


def _store_artifacts(stack: Stack, seed_artifacts: Seeds) -> dict[str, common_pb2.ArtifactRef]:
    import torch
    from safetensors.torch import save as torch_save

    store = stack["pruning-orchestrator"].runtime.store
    rng = np.random.default_rng(1)
    x = rng.random((3, 1, 28, 28), dtype=np.float32)
    y = np.array([0, 1, 2], dtype=np.int64)
    x_nan = x.copy()
    x_nan[0, 0, 0, 0] = np.nan
    blobs = {
        "model_safetensors": (seed_artifacts.safetensors, "application/vnd.modelguard.safetensors"),
        "model_torchscript": (seed_artifacts.torchscript, "application/vnd.modelguard.torchscript"),
        "model_torch_zip": (seed_artifacts.torch_zip, "application/octet-stream"),
        "model_pickle": (seed_artifacts.pickles[4], "application/octet-stream"),
        "npz_valid": (_npz(x=x, y=y), "application/x-npz"),
        "npz_nan": (_npz(x=x_nan, y=y), "application/x-npz"),
        "npz_wrong_shape": (_npz(x=rng.random((3, 3, 28, 28), dtype=np.float32), y=y), "x"),
        "npz_objects": (_npz(x=np.array([1, None], dtype=object), y=y), "application/x-npz"),
        "npz_bad_labels": (_npz(x=x, y=np.array([0, 1, 99])), "application/x-npz"),
        "triggers_valid": (seed_artifacts.triggers, "application/octet-stream"),
        "triggers_one_label": (
            save_triggers(torch.rand(1, 28, 28), torch.rand(1, 1, 28, 28)),
            "application/octet-stream",
        ),
        "triggers_scalar": (
            torch_save({"masks": torch.tensor(1.0), "patterns": torch.tensor(1.0)}),
            "application/octet-stream",
        ),
        "triggers_fewer_patterns": (
            torch_save({"masks": torch.rand(10, 28, 28), "patterns": torch.rand(1, 1, 28, 28)}),
            "application/octet-stream",
        ),
        "carrier": (seed_artifacts.carrier, "application/vnd.modelguard.carrier"),
        "mapper": (seed_artifacts.mapper, "application/octet-stream"),
        "garbage": (rng.bytes(1024), "application/octet-stream"),
        "big": (bytes(3 << 20), "application/octet-stream"),
        "json": (b'{"a": 1}', "application/json"),
    }
    return {
        name: ref_to_proto(store.put_blob(data, media)) for name, (data, media) in blobs.items()
    }


def _ready_carrier(
    stack: Stack, refs: dict[str, common_pb2.ArtifactRef], user: str, credential: str
) -> None:
    """A carrier record as carrier-trainer leaves it after training, without training."""
    runtime = stack["carrier-trainer"].runtime
    # result-mapper refuses a carrier without its signed query profile
    normal = np.random.default_rng(0).normal(size=(200, MAPPER_IN))
    profile = json.dumps(QueryProfile.fit(normal, rank=4).to_dict()).encode()
    artifacts = {
        "carrier": refs["carrier"],
        "carrier_png": refs["garbage"],
        "manifest": refs["json"],
        "public_model": refs["model_torch_zip"],
        "mapper": refs["mapper"],
        "profile": ref_to_proto(runtime.store.put_blob(profile, "application/json")),
    }
    record = CarrierRecord(
        user_id=user,
        generation=1,
        credential_hash=hash_credential(credential),
        state=READY,
        artifacts={
            name: {"sha256": r.sha256, "key": r.key, "size": r.size, "media_type": r.media_type}
            for name, r in artifacts.items()
        },
        signatures={name: runtime.signer.sign(r.sha256, name) for name, r in artifacts.items()},
    )
    CarrierRepository(runtime.store).put(record)


@pytest.fixture(scope="module")
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    register_summary(request.config)
    incidents = IncidentLog()
    for name in ("modelguard.interceptors", "grpc._server", "grpc._common"):
        logging.getLogger(name).addHandler(incidents)
    seed_artifacts = seeds()
    store_dir: Path = tmp_path_factory.mktemp("fuzz-store")
    with pytest.MonkeyPatch.context() as env:
        # a fuzzed Map stream of valid rows must not revoke the ready user mid-run
        env.setenv("MODELGUARD_RESULT_MAPPER_AUTO_REVOKE", "false")
        stack = start_stack(PlatformSettings(store_dir=store_dir), workers=False)
    channels: dict[str, grpc.Channel] = {}
    try:
        refs = _store_artifacts(stack, seed_artifacts)
        ready_user, ready_credential = "fuzz-ready", "ready-credential-0123456789"
        _ready_carrier(stack, refs, ready_user, ready_credential)
        for full_name, (app, _module) in SERVICES.items():
            channels[full_name] = grpc.insecure_channel(
                stack[app].address,
                options=[("grpc.max_receive_message_length", 128 << 20)],
            )
        orchestrator = stack["pruning-orchestrator"].components["orchestrator"]
        audit = orchestrator.submit(
            _model_spec(refs["model_safetensors"]), refs["npz_valid"], jobs_pb2.AuditOptions()
        )
        queued = carrier_trainer_pb2.RequestCarrierRequest(user_id="fuzz-queued")
        reply = channels["modelguard.v1.CarrierTrainer"].unary_unary(
            "/modelguard.v1.CarrierTrainer/RequestCarrier",
            request_serializer=carrier_trainer_pb2.RequestCarrierRequest.SerializeToString,
            response_deserializer=carrier_trainer_pb2.RequestCarrierResponse.FromString,
        )(queued, timeout=CALL_TIMEOUT_S)
        yield World(
            stack=stack,
            channels=channels,
            refs=refs,
            audit_id=audit.audit_id,
            ready_user=ready_user,
            ready_credential=ready_credential,
            queued_user="fuzz-queued",
            queued_credential=reply.credential,
            incidents=incidents,
            seeds=seed_artifacts,
        )
    finally:
        for channel in channels.values():
            channel.close()
        stack.stop()
        for name in ("modelguard.interceptors", "grpc._server", "grpc._common"):
            logging.getLogger(name).removeHandler(incidents)


# --------------------------------------------------------------------------------------
# Generic values
# --------------------------------------------------------------------------------------

SPECIAL_STRINGS = [
    "", " ", "\x00", "\x00abc", "../../etc/passwd", "..", ".", "/", "a/../../b", "/abs/path",
    "C:\\windows", "%s%n%x", "' OR 1=1 --", "\u202e", "é" * 10, "🙂", "a" * 64, "a" * 129,
    "0" * 64, "f" * 64, "F" * 64, "lenet5", "vgg_small", "resnet18_small", "rollback",
    "shapley", "fine-pruning", "none", "carrier", "carrier_png", "manifest", "mapper",
    "public_model", "profile", "fc1", "conv1", "fc3", "mnist", "lenet5-fashion",
    "audits/x", "fuzz-ready", "fuzz-queued", "\ufeff", "\r\n", "a\nb", "NaN", "-1",
]  # fmt: skip
BIG_STRINGS = ["a" * (1 << 20), "é" * (1 << 19), "\x00" * (1 << 16), "../" * 10_000]
FLOAT_SPECIALS = [
    0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e-45, 3.4e38, -3.4e38, 1e308,
    5e-324,
]  # fmt: skip
INT32_EDGES = [0, 1, -1, 2, 3, 10, 28, 2**31 - 1, -(2**31), 2**16, 4096, 4097]
INT64_EDGES = [0, 1, -1, 2**63 - 1, -(2**63), 2**32, 2**53 + 1]


def _big_bytes() -> list[bytes]:
    rng = np.random.default_rng(2)
    nan = np.full((2 << 20) // 4, np.nan, dtype="<f4").tobytes()
    return [bytes(4 << 20), nan, rng.bytes(3 << 20)]


BIG_BYTES = _big_bytes()


def float32_payload(min_floats: int = 0, max_floats: int = 64) -> st.SearchStrategy[bytes]:
    """Little-endian float32 arrays: random values or a fill value with NaN/Inf spots."""
    listed = st.lists(
        st.one_of(st.sampled_from(FLOAT_SPECIALS), st.floats(width=32)),
        min_size=min_floats,
        max_size=max_floats,
    ).map(_pack_float32)
    return listed


def _pack_float32(values: list[float]) -> bytes:
    with np.errstate(over="ignore"):  # doubles beyond float32 become ±Inf, on purpose
        return np.asarray(values, dtype="<f4").tobytes()


STRINGS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(SPECIAL_STRINGS),
    st.sampled_from(BIG_STRINGS),
)
BYTES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(BIG_BYTES),
    float32_payload(),
)
FLOATS = st.one_of(st.sampled_from(FLOAT_SPECIALS), st.floats(width=32))
DOUBLES = st.one_of(st.sampled_from(FLOAT_SPECIALS), st.floats())


def _ints(low: int, high: int, edges: list[int]) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(low, high), st.sampled_from([e for e in edges if low <= e <= high])
    )


SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: STRINGS,
    FieldDescriptor.TYPE_BYTES: BYTES,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_FLOAT: FLOATS,
    FieldDescriptor.TYPE_DOUBLE: DOUBLES,
    FieldDescriptor.TYPE_INT32: _ints(-(2**31), 2**31 - 1, INT32_EDGES),
    FieldDescriptor.TYPE_SINT32: _ints(-(2**31), 2**31 - 1, INT32_EDGES),
    FieldDescriptor.TYPE_SFIXED32: _ints(-(2**31), 2**31 - 1, INT32_EDGES),
    FieldDescriptor.TYPE_INT64: _ints(-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_SINT64: _ints(-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_SFIXED64: _ints(-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_UINT32: _ints(0, 2**32 - 1, [0, 1, 2**31, 2**32 - 1]),
    FieldDescriptor.TYPE_FIXED32: _ints(0, 2**32 - 1, [0, 1, 2**31, 2**32 - 1]),
    FieldDescriptor.TYPE_UINT64: _ints(0, 2**64 - 1, [0, 1, 2**63, 2**64 - 1]),
    FieldDescriptor.TYPE_FIXED64: _ints(0, 2**64 - 1, [0, 1, 2**63, 2**64 - 1]),
}

Overrides = dict[str, Callable[[], st.SearchStrategy[Any]]]


class Generator:
    """Strategies for any message type from its descriptor. ``overrides`` maps a message
    full name (whole message) or ``Message.field`` to a strategy mixed in with (message:
    replacing) the generic one, for domain-aware values."""

    def __init__(self, overrides: Overrides, max_depth: int = 4) -> None:
        self.overrides = overrides
        self.max_depth = max_depth

    def message(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        override = self.overrides.get(descriptor.full_name)
        if override is not None:
            return override()
        return self.generic(descriptor, depth)

    def generic(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        if depth >= self.max_depth:
            return st.just(cls())
        fields = list(descriptor.fields)

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            message = cls()
            for field in fields:
                if not draw(st.integers(0, 4)):  # ~20 % of fields left unset
                    continue
                value = draw(self.field(field, depth))
                self._assign(message, field, value)
            return message

        return build()

    def field(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        single = self.single(field, depth)
        if not field.is_repeated:
            return single
        return st.one_of(
            st.lists(single, max_size=4),
            st.tuples(single, st.sampled_from([100, 10_000, 300_000])).map(
                lambda pair: [pair[0]] * pair[1]
            ),
        )

    def single(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        key = f"{field.containing_type.full_name}.{field.name}"
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return self.message(field.message_type, depth + 1)
        if field.type == FieldDescriptor.TYPE_ENUM:
            generic: st.SearchStrategy[Any] = st.one_of(
                st.sampled_from([v.number for v in field.enum_type.values]),
                _ints(-(2**31), 2**31 - 1, [-1, 99, 2**31 - 1]),
            )
        else:
            generic = SCALARS[field.type]
        override = self.overrides.get(key)
        return st.one_of(generic, override()) if override is not None else generic

    @staticmethod
    def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
        target = getattr(message, field.name)
        if field.is_repeated:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(message, field.name, value)


# --------------------------------------------------------------------------------------
# Domain-aware values
# --------------------------------------------------------------------------------------

#: Input-spec dimensions: small, or so large that any allocation they imply is refused at
#: once. Never moderately large: these run in the test process, on a shared machine.
SMALL_DIMS = [-1, 0, 1, 2, 3, 12, 28, 32]
HUGE_PLANES = [(1 << 20, 1 << 20), (2**31 - 1, 2**31 - 1), (28, 2**31 - 1)]


@st.composite
def input_specs(draw: st.DrawFn) -> common_pb2.InputSpec:
    spec = common_pb2.InputSpec()
    mode = draw(st.sampled_from(["mnist", "plane", "plane", "channels", "list", "huge-list"]))
    if mode == "mnist":
        spec.shape.extend([1, 28, 28])
    elif mode == "plane":
        plane = draw(
            st.one_of(st.tuples(*[st.sampled_from(SMALL_DIMS)] * 2), st.sampled_from(HUGE_PLANES))
        )
        spec.shape.extend([1, *plane])
    elif mode == "channels":
        spec.shape.extend([draw(st.sampled_from([-1, 0, 1, 3, 2**31 - 1])), 28, 28])
    elif mode == "list":
        spec.shape.extend(draw(st.lists(st.sampled_from(SMALL_DIMS), max_size=5)))
    else:
        spec.shape.extend([1] * draw(st.sampled_from([4, 1000, 300_000])))
    if draw(st.integers(0, 3)):
        spec.value_min, spec.value_max = 0.0, 1.0
    else:
        spec.value_min, spec.value_max = draw(FLOATS), draw(FLOATS)
    count = draw(st.sampled_from([0, 0, 0, 1, 3, 300_000]))
    if count:
        spec.mean.extend([draw(FLOATS)] * count)
        spec.std.extend([draw(FLOATS)] * draw(st.sampled_from([count, 1, 0])))
    if draw(st.booleans()):
        spec.num_classes = draw(st.sampled_from([0, 10, 2, 1, -1, 2**31 - 1]))
    return spec


def artifact_refs(world: World, exclude: tuple[str, ...] = ()) -> st.SearchStrategy[Any]:
    names = sorted(n for n in world.refs if n not in exclude)
    stored = st.sampled_from(names).map(lambda n: world.refs[n])

    @st.composite
    def perturbed(draw: st.DrawFn) -> common_pb2.ArtifactRef:
        ref = common_pb2.ArtifactRef()
        ref.CopyFrom(draw(stored))
        kind = draw(st.sampled_from(["upper", "size", "key", "media", "sha-other", "sha-short"]))
        if kind == "upper":
            ref.sha256 = ref.sha256.upper()
        elif kind == "size":
            ref.size = draw(SCALARS[FieldDescriptor.TYPE_INT64])
        elif kind == "key":
            ref.key = draw(STRINGS)
        elif kind == "media":
            ref.media_type = draw(STRINGS)
        elif kind == "sha-other":
            ref.sha256 = "0" * 63 + "1"
        else:
            ref.sha256 = ref.sha256[:63]
        return ref

    generic = Generator({}).generic(common_pb2.ArtifactRef.DESCRIPTOR)
    return st.one_of(stored, stored, perturbed(), generic)


def model_specs(world: World, refs: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    models = st.sampled_from(
        ["model_safetensors", "model_safetensors", "model_torchscript", "model_torchscript",
         "model_torch_zip", "model_pickle", "garbage", "npz_valid"]
    ).map(lambda n: world.refs[n])  # fmt: skip

    @st.composite
    def plausible(draw: st.DrawFn) -> common_pb2.ModelSpec:
        spec = common_pb2.ModelSpec()
        spec.artifact.CopyFrom(draw(models) if draw(st.integers(0, 3)) else draw(refs))
        spec.format = draw(st.sampled_from([0, 1, 2, 3, -1, 2**31 - 1]))
        arch = st.sampled_from(["lenet5", "lenet5", "lenet5", "", "vgg_small", "x"])
        spec.arch = draw(arch) if draw(st.integers(0, 3)) else draw(STRINGS)
        spec.input.CopyFrom(draw(input_specs()))
        return spec

    return plausible()


@st.composite
def pseudo_outputs(draw: st.DrawFn) -> bytes:
    """Pseudo-outputs for the ready user's 10-input mapper: right or wrong length, with
    NaN/Inf/huge values in some rows."""
    rows = draw(st.sampled_from([1, 1, 2, 3, 4096, 4097]))
    floats = rows * MAPPER_IN + draw(st.sampled_from([0, 0, 0, -1, 1, -MAPPER_IN]))
    return _float32_array(draw, max(floats, 0))


def _float32_array(draw: st.DrawFn, count: int) -> bytes:
    """``count`` float32 values: one fill value plus a few NaN/Inf/huge ones."""
    fill = draw(st.one_of(st.floats(-10, 10, width=32), st.sampled_from(FLOAT_SPECIALS)))
    spots = draw(st.integers(0, 3)) if count else 0
    specials = [
        (draw(st.integers(0, count - 1)), draw(st.sampled_from(FLOAT_SPECIALS)))
        for _ in range(spots)
    ]
    with np.errstate(over="ignore"):  # doubles beyond float32 become ±Inf, on purpose
        array = np.full(count, fill, dtype="<f4")
        for at, value in specials:
            array[at] = value
    return array.tobytes()


def overrides_for(world: World, method: Method) -> Overrides:
    # ReverseTriggers with a valid model *and* dataset would start minutes of Neural
    # Cleanse: its dataset references never include the one valid dataset.
    exclude = ("npz_valid",) if method.name == "ReverseTriggers" else ()
    refs = artifact_refs(world, exclude)
    users = [world.ready_user, world.queued_user, "fuzz-unknown"]
    credentials = [world.ready_credential, world.queued_credential, "wrong-credential"]
    if method.name in ("RequestCarrier", "RevokeCarrier"):
        # never rotate or revoke the ready user (others rely on it)
        credentials.remove(world.ready_credential)
    user_ids = lambda: st.sampled_from(users)  # noqa: E731
    creds = lambda: st.sampled_from(credentials)  # noqa: E731
    detectors = lambda: st.sampled_from(["", *DETECTORS, "nope"])  # noqa: E731
    rules = lambda: st.sampled_from(["", "modelguard", "paper", "nope"])  # noqa: E731
    return {
        "modelguard.v1.ArtifactRef": lambda: refs,
        "modelguard.v1.InputSpec": input_specs,
        "modelguard.v1.ModelSpec": lambda: model_specs(world, refs),
        "modelguard.v1.GetAuditRequest.audit_id": lambda: st.just(world.audit_id),
        "modelguard.v1.RequestCarrierRequest.user_id": user_ids,
        "modelguard.v1.RequestCarrierRequest.credential": creds,
        "modelguard.v1.RevokeCarrierRequest.user_id": user_ids,
        "modelguard.v1.RevokeCarrierRequest.credential": creds,
        "modelguard.v1.GetCarrierRequest.user_id": user_ids,
        "modelguard.v1.GetCarrierRequest.credential": creds,
        "modelguard.v1.DownloadCarrierRequest.user_id": user_ids,
        "modelguard.v1.DownloadCarrierRequest.credential": creds,
        "modelguard.v1.DownloadCarrierRequest.artifact": lambda: st.sampled_from(
            ["carrier", "carrier_png", "manifest", "public_model", "mapper", "profile"]
        ),
        "modelguard.v1.MapRequest.user_id": user_ids,
        "modelguard.v1.MapRequest.credential": creds,
        "modelguard.v1.MapRequest.pseudo_output": pseudo_outputs,
        "modelguard.v1.MapRequest.rows": lambda: st.sampled_from([0, 1, 2, 3, 4096, 4097]),
        "modelguard.v1.ScoreNeuronsRequest.layer": lambda: st.sampled_from(
            ["", "fc1", "fc2", "fc3", "conv1", "conv2", "relu", "pool", "nope"]
        ),
        "modelguard.v1.ScoreNeuronsRequest.target_label": lambda: st.sampled_from([0, 1, 9, 10]),
        "modelguard.v1.AuditOptions.repair_mode": lambda: st.sampled_from(
            ["", *REPAIR_CHOICES, "nope"]
        ),
        "modelguard.v1.AuditOptions.detector": detectors,
        "modelguard.v1.AuditOptions.detection_rule": rules,
        "modelguard.v1.ReverseTriggersRequest.detector": detectors,
        "modelguard.v1.ReverseTriggersRequest.rule": rules,
        "modelguard.v1.AuditOptions.layer": lambda: st.sampled_from(["", "fc1", "conv1"]),
    }


def requests_for(world: World, method: Method) -> st.SearchStrategy[Any]:
    generator = Generator(overrides_for(world, method))
    single = generator.message(method.descriptor.input_type)
    plausible = {
        "modelguard.v1.ScoreNeuronsRequest": plausible_scoring,
        "modelguard.v1.MapRequest": plausible_map,
    }.get(method.descriptor.input_type.full_name)
    if plausible is not None:
        single = st.one_of(single, plausible(world))
    if method.client_streaming:
        return st.lists(single, max_size=4)
    return single


@st.composite
def plausible_map(draw: st.DrawFn, world: World) -> result_mapper_pb2.MapRequest:
    """The ready user with its credential: reaches the decoding and the mapping."""
    rows = draw(st.sampled_from([0, 1, 1, 2, 3, 64, 4096, 4097, -1, 2**31 - 1]))
    packed = max(rows, 1) if rows <= 4097 else 1
    floats = packed * MAPPER_IN + draw(st.sampled_from([0, 0, 0, 0, -1, 1, MAPPER_IN]))
    return result_mapper_pb2.MapRequest(
        user_id=world.ready_user,
        credential=draw(st.sampled_from([world.ready_credential] * 4 + ["wrong", ""])),
        pseudo_output=_float32_array(draw, max(floats, 0)),
        rows=rows,
    )


TRIGGER_POOL = [
    "triggers_valid", "triggers_valid", "triggers_one_label", "triggers_scalar",
    "triggers_fewer_patterns", "carrier", "mapper", "garbage",
]  # fmt: skip


@st.composite
def plausible_scoring(draw: st.DrawFn, world: World) -> neuron_scoring_pb2.ScoreNeuronsRequest:
    """Model and data valid, the rest fuzzed: reaches the trigger parser and the scoring."""
    model = draw(st.sampled_from(["model_safetensors", "model_torchscript"]))
    triggers = draw(st.sampled_from(TRIGGER_POOL))
    request = neuron_scoring_pb2.ScoreNeuronsRequest(
        model=_model_spec(world.refs[model], arch="lenet5" if model == "model_safetensors" else ""),
        data=world.refs["npz_valid"],
        triggers=world.refs[triggers],
        target_label=draw(
            st.one_of(st.sampled_from([0, 1, 9, 10, -1]), SCALARS[FieldDescriptor.TYPE_INT32])
        ),
        layer=draw(
            st.one_of(st.sampled_from(["", "fc1", "fc2", "conv1", "relu", "nope"]), STRINGS)
        ),
        shapley=draw(st.booleans()),
    )
    return request


# --------------------------------------------------------------------------------------
# Calling and judging
# --------------------------------------------------------------------------------------


def invoke(
    world: World,
    method: Method,
    request: Any,
    raw: bool = False,
    responses: list[Any] | None = None,
) -> tuple[Any, str]:
    """Call ``method``; returns (status code, details) and appends what the server sent
    to ``responses``. Server streams are read to the end, except WatchAudit (never ends
    for a live audit): its first answer is enough."""
    received: list[Any] = [] if responses is None else responses
    channel = world.channel(method.service)
    serializer = None if raw else method.request_type.SerializeToString
    deserializer = None if raw else method.response_type.FromString
    kind = (method.client_streaming, method.server_streaming)
    factory = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[kind]
    stub = factory(method.path, request_serializer=serializer, response_deserializer=deserializer)
    argument = iter(request) if method.client_streaming else request
    try:
        result = stub(argument, timeout=CALL_TIMEOUT_S)
        if not method.server_streaming:
            received.append(result)
        elif method.name == "WatchAudit":
            received.append(next(result, None))
            result.cancel()
        else:
            received.extend(result)
    except grpc.RpcError as err:
        code = err.code()
        if code == grpc.StatusCode.CANCELLED and method.name == "WatchAudit":
            return grpc.StatusCode.OK, ""
        return code, err.details() or ""
    return grpc.StatusCode.OK, ""


def describe(request: Any, limit: int = 700) -> str:
    """A compact, bounded description of a request (big fields summarised)."""
    if isinstance(request, bytes):
        head = request[:48].hex()
        return f"raw {len(request)} bytes: {head}{'…' if len(request) > 48 else ''}"
    if isinstance(request, list):
        return "[" + ", ".join(describe(r, limit // max(len(request), 1)) for r in request) + "]"

    def fields(message: Message) -> str:
        parts = []
        for field, value in message.ListFields():
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if field.is_repeated:
                    parts.append(f"{field.name}=[{len(value)} msgs]")
                else:
                    parts.append(f"{field.name}={{{fields(value)}}}")
            elif field.is_repeated:
                items = list(value)
                shown = ", ".join(repr(v) for v in items[:6])
                parts.append(
                    f"{field.name}=[{shown}{f', … ({len(items)} items)' if len(items) > 6 else ''}]"
                )
            elif isinstance(value, (bytes, str)) and len(value) > 60:
                kind = "bytes" if isinstance(value, bytes) else "chars"
                parts.append(f"{field.name}=<{len(value)} {kind}: {value[:24]!r}…>")
            else:
                parts.append(f"{field.name}={value!r}")
        return ", ".join(parts)

    text = f"{type(request).__name__}({fields(request)})"
    return text if len(text) <= limit else text[:limit] + "…"


def size_of(request: Any) -> int:
    if isinstance(request, bytes):
        return len(request)
    if isinstance(request, list):
        return sum(size_of(r) for r in request) + len(request)
    return int(request.ByteSize())


def map_response_problem(response: result_mapper_pb2.MapResponse) -> str | None:
    """A Map answer must be usable: finite probabilities, one row per label."""
    probabilities = np.frombuffer(response.probabilities, dtype="<f4")
    if probabilities.size != len(response.labels) * response.classes:
        return "probabilities do not hold labels x classes values"
    if not np.isfinite(probabilities).all():
        return "OK answer with NaN/Inf probabilities"
    return None


#: Checks of successful answers (the status alone does not prove a usable answer).
RESPONSE_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "Map": map_response_problem,
    "MapStream": map_response_problem,
}


def judge(world: World, record: Tally, method: Method, request: Any, raw: bool = False) -> None:
    started = time.perf_counter()
    responses: list[Any] = []
    code, details = invoke(world, method, request, raw, responses)
    record.case(time.perf_counter() - started, code.name)
    example = f"{method.label} {describe(request)}"
    response_check = None if raw else RESPONSE_CHECKS.get(method.name)
    for response in responses if response_check else ():
        problem = response_check(response)  # type: ignore[misc]
        if problem:
            record.fail(f"{method.label} -> {problem}", example, size_of(request))
            break
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size exceeds" in details:
        # the server's error message was too long to travel in the status trailer: the
        # caller gets a transport error instead of the service's answer
        record.fail(
            f"{method.label} -> RESOURCE_EXHAUSTED: error message too large for the status "
            "trailer (the message echoes unbounded input)",
            example,
            size_of(request),
            details[:200],
        )
        return
    if code in ALLOWED:
        return
    incident = world.incidents.lookup(details) if code == grpc.StatusCode.INTERNAL else None
    if code == grpc.StatusCode.INTERNAL and details.startswith("Exception deserializing"):
        # gRPC's own answer to bytes the request type cannot decode: one root cause for
        # every method (the server's handlers never run)
        record.fail(f"INTERNAL: {details} (undecodable request)", example, size_of(request))
        return
    if incident is not None:
        exc_type, location, message = incident
        signature = f"{method.label} -> INTERNAL: {exc_type} at {location}"
        detail = f"{exc_type}: {message}"
    else:
        signature = f"{method.label} -> {code.name}: {normalise(details)}"
        detail = ""
    record.fail(signature, example, size_of(request), detail)


def check_health(world: World, record: Tally, services: list[str] | None = None) -> None:
    """Every service answers SERVING, for the server ("") and its service name."""
    for full_name in services or list(SERVICES):
        stub = health_pb2_grpc.HealthStub(world.channel(full_name))
        for name in ("", full_name):
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                status = f"{err.code().name} {err.details()}"
            if status != "SERVING":
                record.fail(f"health of {full_name} {name!r}: {status}", "after the batch", 0)


def check_canaries(world: World, record: Tally) -> None:
    """Valid requests still succeed: the services are not only alive but working."""
    canaries: list[tuple[Method, Any]] = []
    by_name = {m.label: m for m in METHODS}
    for full_name in SERVICES:
        canaries.append(
            (by_name[f"{full_name.rsplit('.', 1)[-1]}/GetStatus"], common_pb2.StatusRequest())
        )
    canaries += [
        (by_name["PruningOrchestrator/GetAudit"],
         pruning_orchestrator_pb2.GetAuditRequest(audit_id=world.audit_id)),
        (by_name["CarrierTrainer/GetCarrier"],
         carrier_trainer_pb2.GetCarrierRequest(user_id=world.ready_user,
                                               credential=world.ready_credential)),
        (by_name["ResultMapper/Map"],
         result_mapper_pb2.MapRequest(user_id=world.ready_user, credential=world.ready_credential,
                                      pseudo_output=bytes(4 * MAPPER_IN), rows=1)),
    ]  # fmt: skip
    for method, request in canaries:
        code, details = invoke(world, method, request)
        if code != grpc.StatusCode.OK:
            record.fail(
                f"canary {method.label}: {code.name} {normalise(details)}", describe(request), 0
            )


def run_batch(
    world: World, name: str, strategy: st.SearchStrategy[Any], budget: int,
    call: Callable[[Tally, Any], None], services: list[str],
) -> Tally:  # fmt: skip
    record = tally(name)
    counter = {"n": 0}

    @seed(fuzz_seed())
    @fuzz_settings(budget)
    @given(strategy)
    def fuzz(case: Any) -> None:
        call(record, case)
        counter["n"] += 1
        if counter["n"] % HEALTH_EVERY == 0:
            check_health(world, record, services)

    fuzz()
    check_health(world, record)
    check_canaries(world, record)
    return record


# --------------------------------------------------------------------------------------
# Structured fuzzing: one test per method
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=[m.label for m in METHODS])
def test_fuzz_method(world: World, method: Method) -> None:
    run_batch(
        world,
        f"grpc {method.label}",
        requests_for(world, method),
        DEEP_EXAMPLES.get(method.name, STRUCTURED_EXAMPLES),
        lambda record, request: judge(world, record, method, request),
        [method.service],
    ).check()


# --------------------------------------------------------------------------------------
# Raw bytes: one test per service, every method
# --------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


@st.composite
def raw_payloads(draw: st.DrawFn, world: World, method: Method) -> bytes:
    descriptor = method.descriptor.input_type
    numbers = [f.number for f in descriptor.fields] or [1]
    kind = draw(
        st.sampled_from(
            ["random", "mutated", "unknown-field", "bad-utf8", "wrong-wire", "lying-length",
             "deep", "big", "truncated-varint"]
        )
    )  # fmt: skip
    if kind == "random":
        return draw(st.binary(max_size=96))
    if kind == "big":
        return draw(st.sampled_from(BIG_BYTES))
    if kind == "truncated-varint":
        return _tag(draw(st.sampled_from(numbers)), 0) + b"\xff" * draw(st.integers(1, 11))
    base = draw(Generator(overrides_for(world, method)).message(descriptor)).SerializeToString()
    if kind == "mutated":
        data = bytearray(base or b"\x00")
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, max(len(data) - 1, 0)))
            op = draw(st.sampled_from(["flip", "cut", "insert"]))
            if op == "flip" and data:
                data[at % len(data)] ^= 1 << draw(st.integers(0, 7))
            elif op == "cut":
                del data[at:]
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
        return bytes(data)
    if kind == "unknown-field":
        number = draw(st.sampled_from([99, 1000, 536870911]))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        payload = {0: _varint(draw(st.integers(0, 2**64 - 1))), 1: bytes(8),
                   2: _varint(3) + b"abc", 5: bytes(4)}[wire]  # fmt: skip
        return base + _tag(number, wire) + payload
    if kind == "bad-utf8":
        strings = [f.number for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]
        number = draw(st.sampled_from(strings or numbers))
        blob = draw(st.sampled_from([b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"a\x80"]))
        return base + _tag(number, 2) + _varint(len(blob)) + blob
    if kind == "wrong-wire":
        number = draw(st.sampled_from(numbers))
        wire = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
        return base + _tag(number, wire) + draw(st.binary(max_size=9))
    if kind == "lying-length":
        number = draw(st.sampled_from(numbers))
        length = draw(st.sampled_from([1, 100, 2**31 - 1, 2**32, 2**63]))
        return base + _tag(number, 2) + _varint(length) + b"x"
    # deep nesting through the first message-typed field (or an unknown group)
    messages = [f.number for f in descriptor.fields if f.type == FieldDescriptor.TYPE_MESSAGE]
    depth = draw(st.sampled_from([50, 101, 1000]))
    if messages:
        inner = b""
        number = messages[0]
        for _ in range(depth):
            inner = _tag(number, 2) + _varint(len(inner)) + inner
        return inner
    return _tag(77, 3) * depth + _tag(77, 4) * depth


def raw_requests(world: World, service: str) -> st.SearchStrategy[tuple[Method, Any]]:
    methods = [m for m in METHODS if m.service == service]

    def for_method(method: Method) -> st.SearchStrategy[tuple[Method, Any]]:
        payloads = raw_payloads(world, method)
        if method.client_streaming:
            return st.tuples(st.just(method), st.lists(payloads, max_size=3))
        return st.tuples(st.just(method), payloads)

    return st.sampled_from(methods).flatmap(for_method)


@pytest.mark.parametrize("service", list(SERVICES), ids=[s.rsplit(".", 1)[-1] for s in SERVICES])
def test_fuzz_raw_bytes(world: World, service: str) -> None:
    run_batch(
        world,
        f"grpc-raw {service.rsplit('.', 1)[-1]} (all methods)",
        raw_requests(world, service),
        RAW_EXAMPLES,
        lambda record, case: judge(world, record, case[0], case[1], raw=True),
        [service],
    ).check()


# --------------------------------------------------------------------------------------
# Limits and the failures the fuzzing found, as plain regression tests
# --------------------------------------------------------------------------------------


def _method(label: str) -> Method:
    return next(m for m in METHODS if m.label == label)


def test_message_over_the_size_limit_is_refused_and_the_server_stays_healthy(world: World) -> None:
    record = tally("grpc oversize message")
    chunk = pruning_orchestrator_pb2.UploadChunk(data=bytes((64 << 20) + 1024))
    code, _details = invoke(world, _method("PruningOrchestrator/UploadArtifact"), [chunk])
    record.case()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    check_health(world, record)
    check_canaries(world, record)
    record.check()


def test_undecodable_requests_are_invalid_argument(world: World) -> None:
    """A truncated varint cannot be decoded by any request type: the caller sent bad
    input, which is INVALID_ARGUMENT, not the INTERNAL gRPC answers by default."""
    wrong = {}
    for method in METHODS:
        payload: Any = [b"\x08"] if method.client_streaming else b"\x08"
        code, details = invoke(world, method, payload, raw=True)
        if code != grpc.StatusCode.INVALID_ARGUMENT:
            wrong[method.label] = f"{code.name} {details!r}"
    assert not wrong, wrong


def test_score_neurons_refuses_a_trigger_artifact_with_scalar_masks(world: World) -> None:
    import torch
    from safetensors.torch import save

    store = world.stack["neuron-scoring"].runtime.store
    scalar = ref_to_proto(
        store.put_blob(save({"masks": torch.tensor(1.0), "patterns": torch.tensor(1.0)}))
    )
    request = neuron_scoring_pb2.ScoreNeuronsRequest(
        model=_model_spec(world.refs["model_safetensors"]),
        data=world.refs["npz_valid"],
        triggers=scalar,
        target_label=0,
        shapley=False,
    )
    code, details = invoke(world, _method("NeuronScoring/ScoreNeurons"), request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (
        code,
        details,
        world.incidents.lookup(details),
    )


def test_scan_model_answers_for_a_valid_model(world: World) -> None:
    request = leak_detector_pb2.ScanModelRequest(model=_model_spec(world.refs["model_safetensors"]))
    code, details = invoke(world, _method("LeakDetector/ScanModel"), request)
    assert code == grpc.StatusCode.OK, (code, details, world.incidents.lookup(details))


def test_a_declared_input_shape_too_large_is_invalid_argument(world: World) -> None:
    model = _model_spec(world.refs["model_safetensors"])
    model.input.shape[:] = [1, 2**31 - 1, 2**31 - 1]
    request = leak_detector_pb2.ScanModelRequest(model=model)
    code, details = invoke(world, _method("LeakDetector/ScanModel"), request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (
        code,
        details,
        world.incidents.lookup(details),
    )


LONG = "a" * 20_000


@pytest.mark.parametrize(
    ("label", "request_"),
    [
        ("PruningOrchestrator/GetAudit", pruning_orchestrator_pb2.GetAuditRequest(audit_id=LONG)),
        ("CarrierTrainer/GetCarrier", carrier_trainer_pb2.GetCarrierRequest(user_id=LONG)),
        ("ResultMapper/Map", result_mapper_pb2.MapRequest(user_id=LONG, credential="c")),
        ("PruningOrchestrator/DownloadArtifact", common_pb2.ArtifactRef(sha256=LONG)),
    ],
    ids=["GetAudit", "GetCarrier", "Map", "DownloadArtifact"],
)
def test_long_input_still_gets_the_services_own_error(
    world: World, label: str, request_: Message
) -> None:
    """An error message quoting a 20,000-character input exceeds gRPC's 16 KiB trailer
    limit: the caller gets RESOURCE_EXHAUSTED "Stream removed (received metadata size
    exceeds hard limit …)" instead of the service's INVALID_ARGUMENT/NOT_FOUND."""
    code, details = invoke(world, _method(label), request_)
    assert code in ALLOWED - {grpc.StatusCode.OK}
    assert "metadata size exceeds" not in details, (code, details[:200])


def test_map_refuses_nan_and_infinite_pseudo_outputs(world: World) -> None:
    for bad in (math.nan, math.inf, -math.inf):
        values = np.zeros(MAPPER_IN, dtype="<f4")
        values[3] = bad
        request = result_mapper_pb2.MapRequest(
            user_id=world.ready_user, credential=world.ready_credential,
            pseudo_output=values.tobytes(), rows=1,
        )  # fmt: skip
        code, _details = invoke(world, _method("ResultMapper/Map"), request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, bad


@pytest.mark.parametrize(
    "options",
    [
        jobs_pb2.CarrierOptions(gamma=math.nan),
        jobs_pb2.CarrierOptions(gamma=math.inf),
        jobs_pb2.CarrierOptions(hidden=2**31 - 1),
    ],
    ids=["gamma NaN", "gamma Inf", "hidden 2**31-1"],
)
def test_request_carrier_validates_options_before_queueing(
    world: World, options: jobs_pb2.CarrierOptions
) -> None:
    """Options the trainer cannot use must be refused by the RPC, not accepted (OK, a
    generation and a credential) and left to fail in the worker; on a rotation the old
    carrier is already revoked by then."""
    request = carrier_trainer_pb2.RequestCarrierRequest(
        user_id=f"fuzz-options-{uuid.uuid4().hex[:12]}", options=options
    )
    code, details = invoke(world, _method("CarrierTrainer/RequestCarrier"), request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)


def test_map_keeps_no_state_for_refused_user_ids(world: World) -> None:
    """Unknown user ids (here invalid ones, 100 kB each) are refused; nothing about them
    may stay in memory, or any caller can grow the result-mapper without bound."""
    import gc
    import tracemalloc

    method = _method("ResultMapper/Map")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(20):
            user = f"{index:04d}" + "x" * 100_000
            invoke(world, method, result_mapper_pb2.MapRequest(user_id=user, credential="c"))
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 512 << 10, f"{retained} bytes retained after 20 refused Map calls"


def test_map_of_finite_but_huge_pseudo_outputs_is_refused_or_finite(world: World) -> None:
    """[3.4e38, -3.4e38, 0, …] sums to 0 (the finiteness check passes) but overflows in
    the mapper's matmul: the answer is OK with NaN probabilities and label 0."""
    values = np.zeros(MAPPER_IN, dtype="<f4")
    values[0], values[1] = 3.4e38, -3.4e38
    request = result_mapper_pb2.MapRequest(
        user_id=world.ready_user,
        credential=world.ready_credential,
        pseudo_output=values.tobytes(),
        rows=1,
    )
    responses: list[Any] = []
    code, details = invoke(world, _method("ResultMapper/Map"), request, responses=responses)
    if code == grpc.StatusCode.OK:
        assert map_response_problem(responses[0]) is None, np.frombuffer(
            responses[0].probabilities, dtype="<f4"
        )
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
