"""Tenant isolation of the orchestrator's API, through a real in-process server with
authentication on: a tenant sees only its own audits and artifacts (another tenant's
answer NOT_FOUND, like missing ones), an admin sees all, idempotency keys are per tenant,
and uploads are bounded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelguard.bus.memory import MemoryBus
from modelguard.config import PlatformSettings, PruningOrchestratorSettings
from modelguard.convert import spec_to_proto
from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.errors import NotFound, ResourceExhausted, Unauthenticated
from modelguard.formats.loader import weights_to_safetensors
from modelguard.nn.architectures import build
from modelguard.proto.modelguard.v1 import (
    common_pb2,
    jobs_pb2,
    pruning_orchestrator_pb2,
)
from modelguard.runtime import ServiceApp
from modelguard.services.audit_client import AuditClient
from modelguard.services.launcher import build_service
from modelguard.services.pruning_orchestrator.service import Orchestrator
from modelguard.spec import InputSpec
from tests.unit.authkit import Tokens, write_tokens

SPEC = InputSpec((1, 28, 28))
MAX_UPLOAD = 2 << 20


@dataclass
class World:
    app: ServiceApp
    tokens: Tokens
    model: Path
    data: Path

    @property
    def orchestrator(self) -> Orchestrator:
        return self.app.components["orchestrator"]  # type: ignore[no-any-return]

    def client(self, token: str) -> AuditClient:
        return AuditClient(self.app.address, timeout=30, token=token)

    def submit(self, token: str, key: str = "") -> pruning_orchestrator_pb2.Audit:
        with self.client(token) as client:
            return client.submit(self.model, self.data, SPEC, arch="lenet5", idempotency_key=key)


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    tokens = write_tokens(tmp_path)
    model, data = tmp_path / "model.safetensors", tmp_path / "clean.npz"
    model.write_bytes(weights_to_safetensors(build("lenet5")))
    data.write_bytes(dataset_to_npz(Dataset(torch.rand(20, 1, 28, 28), torch.arange(20) % 10)))
    bus = MemoryBus()
    platform = PlatformSettings(store_dir=tmp_path / "store", auth_tokens_file=str(tokens.file))
    settings = PruningOrchestratorSettings(
        grpc_port=0, metrics_port=-1, worker=False, max_upload_bytes=MAX_UPLOAD
    )
    app = build_service("pruning-orchestrator", platform, settings, bus=bus)
    app.start()
    yield World(app, tokens, model, data)
    app.stop(0.5)
    bus.close()


def test_audits_are_visible_only_to_their_tenant_and_to_admins(world: World) -> None:
    audit = world.submit(world.tokens.acme)
    assert world.orchestrator.get(audit.audit_id).tenant == "acme"
    with world.client(world.tokens.acme) as acme:
        assert acme.get(audit.audit_id).audit_id == audit.audit_id
        assert [a.audit_id for a in acme.list()] == [audit.audit_id]
        first = next(iter(acme.watch(audit.audit_id)))
        assert first.audit_id == audit.audit_id
    with world.client(world.tokens.globex) as globex:
        with pytest.raises(NotFound, match="no audit") as other:
            globex.get(audit.audit_id)
        with pytest.raises(NotFound) as missing:
            globex.get("20990101-000000-deadbeef")
        # the same answer as for an audit that does not exist: ids do not leak
        assert str(other.value).replace(audit.audit_id, "X") == str(missing.value).replace(
            "20990101-000000-deadbeef", "X"
        )
        with pytest.raises(NotFound):
            next(iter(globex.watch(audit.audit_id)))
        assert globex.list() == []
    with world.client(world.tokens.admin) as admin:
        assert admin.get(audit.audit_id).audit_id == audit.audit_id
        assert [a.audit_id for a in admin.list()] == [audit.audit_id]


def test_a_tenant_uses_only_artifacts_it_uploaded_or_its_audits_produced(world: World) -> None:
    audit = world.submit(world.tokens.acme)
    model_ref = audit.model.artifact
    with world.client(world.tokens.acme) as acme:
        assert acme.download(model_ref) == world.model.read_bytes()
    with world.client(world.tokens.globex) as globex:
        with pytest.raises(NotFound, match="upload it first"):
            globex.download(model_ref)
        # nor may it submit an audit of another tenant's uploads, even knowing the digests
        request = pruning_orchestrator_pb2.SubmitAuditRequest(
            model=audit.model,
            data=world.orchestrator.request_message(world.orchestrator.get(audit.audit_id)).data,
        )
        with pytest.raises(NotFound, match="upload it first"):
            globex._call(globex.stub.SubmitAudit, request)
        # nor name another tenant's upload as the reference model of its own audit
        reference = world.model.with_name("reference.safetensors")
        reference.write_bytes(weights_to_safetensors(build("lenet5")))
        with world.client(world.tokens.acme) as acme:
            acme_reference = acme.upload(reference.read_bytes(), "application/octet-stream")
        own = pruning_orchestrator_pb2.SubmitAuditRequest(
            model=common_pb2.ModelSpec(
                artifact=globex.upload(world.model.read_bytes(), "application/octet-stream"),
                arch="lenet5",
                input=spec_to_proto(SPEC),
            ),
            data=globex.upload(world.data.read_bytes(), "application/x-npz"),
            options=jobs_pb2.AuditOptions(reference_model=acme_reference),
        )
        with pytest.raises(NotFound, match="reference model artifact"):
            globex._call(globex.stub.SubmitAudit, own)

    # a stage's output (here the leak-detector's summary) becomes the audit tenant's
    store = world.orchestrator.runtime.store
    output = store.put_blob(b'{"verdict": "clean"}', "application/json")
    image = store.put_blob(b"\x89PNG fake", "image/png")
    status = common_pb2.StageStatus(
        stage="leak-detector",
        state=common_pb2.STAGE_STATE_DONE,
        result=common_pb2.ArtifactRef(sha256=output.sha256, key=output.key, size=output.size),
        summary_json=json.dumps(
            {"images": {"trigger": {"sha256": image.sha256, "key": image.key, "size": image.size}}}
        ),
    )
    world.orchestrator.apply_event(jobs_pb2.AuditEvent(audit_id=audit.audit_id, stage=status))
    refs = [status.result, common_pb2.ArtifactRef(sha256=image.sha256, key=image.key)]
    with world.client(world.tokens.acme) as acme:
        assert [acme.download(r) for r in refs] == [b'{"verdict": "clean"}', b"\x89PNG fake"]
    with world.client(world.tokens.globex) as globex:
        for ref in refs:
            with pytest.raises(NotFound):
                globex.download(ref)
    with world.client(world.tokens.admin) as admin:
        assert admin.download(refs[0]) == b'{"verdict": "clean"}'


def test_idempotency_keys_are_scoped_per_tenant(world: World) -> None:
    acme_audit = world.submit(world.tokens.acme, key="nightly-1")
    assert world.submit(world.tokens.acme, key="nightly-1").audit_id == acme_audit.audit_id
    # globex uploads the same bytes (they become its own too) and reuses the key
    globex_audit = world.submit(world.tokens.globex, key="nightly-1")
    assert globex_audit.audit_id != acme_audit.audit_id
    assert world.orchestrator.get(globex_audit.audit_id).tenant == "globex"


def test_every_audit_method_needs_a_token(world: World) -> None:
    with world.client("") as anonymous:
        for call in (
            lambda: anonymous.list(),
            lambda: anonymous.get("20990101-000000-deadbeef"),
            lambda: anonymous.upload(b"bytes", "application/octet-stream"),
            lambda: anonymous.download(common_pb2.ArtifactRef(sha256="0" * 64)),
            lambda: next(iter(anonymous.watch("20990101-000000-deadbeef"))),
        ):
            with pytest.raises(Unauthenticated, match="no token"):
                call()


def test_an_upload_over_the_limit_is_refused_and_the_service_stays_healthy(world: World) -> None:
    with world.client(world.tokens.acme) as acme:
        with pytest.raises(ResourceExhausted, match=f"upload exceeds {MAX_UPLOAD} bytes"):
            acme.upload(b"\0" * (MAX_UPLOAD + 1), "application/octet-stream")
        assert acme.upload(b"small", "application/octet-stream").size == 5
    with grpc.insecure_channel(world.app.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
