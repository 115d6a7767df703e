"""Signatures users verify (issue 19), through a real in-process orchestrator with
authentication on and a signing key of its own: the public key is published by
GetPublicKey (callable without a token) and `modelguard public-key`; `modelguard audit
report` saves each signed file's signature next to it; `modelguard verify` then checks the
downloads offline with only the public key, and refuses a changed byte."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from modelguard.bus.memory import MemoryBus
from modelguard.config import PlatformSettings, PruningOrchestratorSettings
from modelguard.convert import ref_to_proto, spec_to_proto
from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.formats.loader import weights_to_safetensors
from modelguard.nn.architectures import build
from modelguard.proto.modelguard.v1 import (
    common_pb2,
    jobs_pb2,
    pruning_orchestrator_pb2,
    pruning_orchestrator_pb2_grpc,
)
from modelguard.runtime import ServiceApp
from modelguard.services.audit_client import AuditClient
from modelguard.services.cli import main
from modelguard.services.launcher import build_service
from modelguard.services.pruning_orchestrator.service import Orchestrator
from modelguard.signing import Signer, Verifier
from modelguard.spec import InputSpec
from tests.unit.authkit import Tokens, write_tokens

SPEC = InputSpec((1, 28, 28))


@dataclass
class World:
    app: ServiceApp
    tokens: Tokens
    signer: Signer  # the deployment's key; users get only its public half

    @property
    def orchestrator(self) -> Orchestrator:
        return self.app.components["orchestrator"]  # type: ignore[no-any-return]


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    for name in ("MODELGUARD_CLI_TARGET", "MODELGUARD_CLI_PUBLIC_KEY_FILE", "MODELGUARD_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    signer = Signer.generate()
    key_file = tmp_path / "secret" / "signing-key.pem"
    key_file.parent.mkdir()
    key_file.write_bytes(signer.private_key_pem())
    tokens = write_tokens(tmp_path)
    bus = MemoryBus()
    platform = PlatformSettings(
        store_dir=tmp_path / "store",
        auth_tokens_file=str(tokens.file),
        signing_key_file=str(key_file),
    )
    settings = PruningOrchestratorSettings(grpc_port=0, metrics_port=-1, worker=False)
    app = build_service("pruning-orchestrator", platform, settings, bus=bus)
    app.start()
    yield World(app, tokens, signer)
    app.stop(0.5)
    bus.close()


def _finished_audit(world: World) -> str:
    """An audit of acme's, driven to its end by stage events, with a repaired model."""
    orchestrator = world.orchestrator
    store = orchestrator.runtime.store
    model = common_pb2.ModelSpec(
        artifact=ref_to_proto(store.put_blob(weights_to_safetensors(build("lenet5")))),
        arch="lenet5",
        input=spec_to_proto(SPEC),
    )
    data = store.put_blob(dataset_to_npz(Dataset(torch.rand(20, 1, 28, 28), torch.arange(20) % 10)))
    record = orchestrator.submit(model, ref_to_proto(data), jobs_pb2.AuditOptions())
    repaired = store.put_blob(weights_to_safetensors(build("lenet5")), "application/safetensors")
    summaries: dict[str, dict[str, object]] = {
        "leak-detector": {"verdict": "benign"},
        "trigger-reversal": {"verdict": "infected", "flagged": [7]},
        "neuron-scoring": {"layer": "fc1"},
        "repair": {
            "before": {"reversed_asr": 0.99},
            "after": {"reversed_asr": 0.02},
            "repaired_model": {
                "sha256": repaired.sha256,
                "key": repaired.key,
                "size": repaired.size,
                "media_type": repaired.media_type,
            },
        },
    }
    for stage, summary in summaries.items():
        status = common_pb2.StageStatus(
            stage=stage, state=common_pb2.STAGE_STATE_DONE, summary_json=json.dumps(summary)
        )
        orchestrator.apply_event(jobs_pb2.AuditEvent(audit_id=record.audit_id, stage=status))
    assert orchestrator.get(record.audit_id).state == "succeeded"
    return record.audit_id


def test_the_public_key_is_published_without_a_token(world: World) -> None:
    with grpc.insecure_channel(world.app.address) as channel:
        stub = pruning_orchestrator_pb2_grpc.PruningOrchestratorStub(channel)
        key = stub.GetPublicKey(pruning_orchestrator_pb2.GetPublicKeyRequest(), timeout=10)
        # every other call still needs one
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListAudits(pruning_orchestrator_pb2.ListAuditsRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (key.algorithm, key.key_id) == ("ed25519", world.signer.key_id)
    assert not key.development_key
    assert Verifier.from_pem(key.public_key_pem.encode()).key_id == world.signer.key_id


def test_an_audit_carries_the_signatures_of_its_reports_and_repaired_model(
    world: World,
) -> None:
    audit_id = _finished_audit(world)
    with AuditClient(world.app.address, timeout=30, token=world.tokens.admin) as client:
        audit = client.get(audit_id)
        published = client.public_key()
    verifier = Verifier.from_pem(published.pem.encode())
    signed = {
        "report": (audit.report_json, audit.report_html),
        "repaired-model": (audit.repaired_model,),
    }
    assert set(audit.signatures) == {ref.sha256 for refs in signed.values() for ref in refs}
    for kind, refs in signed.items():
        for ref in refs:
            assert verifier.check(ref.sha256, audit.signatures[ref.sha256], kind).kind == kind


def test_downloaded_reports_verify_offline_and_a_changed_byte_is_refused(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit_id = _finished_audit(world)
    out, key = tmp_path / "downloads", tmp_path / "deployment.pub.pem"
    remote = ["--target", world.app.address]
    assert main(["public-key", "--out", str(key), *remote]) == 0
    assert key.read_text() == world.signer.public_key_pem
    token = ["--token", world.tokens.admin]
    assert main([*token, "audit", "report", audit_id, "--out", str(out), *remote]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "repaired-model.safetensors",
        "repaired-model.safetensors.sig",
        "report.html",
        "report.html.sig",
        "report.json",
        "report.json.sig",
    ]
    world.app.stop(0.5)  # offline from here: only the files and the public key
    capsys.readouterr()
    for name in ("report.json", "report.html", "repaired-model.safetensors"):
        assert main(["verify", str(out / name), "--public-key", str(key)]) == 0
        assert f"valid: {out / name} is the " in capsys.readouterr().out
    report = out / "report.json"
    changed = bytearray(report.read_bytes())
    changed[10] ^= 0x20
    report.write_bytes(bytes(changed))
    assert main(["verify", str(report), "--public-key", str(key)]) == 1
    assert "the file changed" in capsys.readouterr().err
