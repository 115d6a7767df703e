"""The audit API's HTTP/JSON face, called with a real HTTP client (urllib) on a running
pruning-orchestrator with bearer-token authentication on: submit with upload, get, list,
server-sent events until the audit is final, report download, refusals, and an OpenAPI
document whose schemas every answer validates against."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from google.protobuf import json_format

from modelguard.bus.memory import MemoryBus
from modelguard.config import PlatformSettings, PruningOrchestratorSettings
from modelguard.convert import ref_from_proto, spec_to_proto
from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.formats.loader import weights_to_safetensors
from modelguard.nn.architectures import build
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.runtime import ServiceApp
from modelguard.services.launcher import build_service
from modelguard.services.pruning_orchestrator.http_api import HttpApi
from modelguard.services.pruning_orchestrator.service import Orchestrator
from modelguard.spec import InputSpec
from tests.unit.authkit import Tokens, write_tokens

SPEC = InputSpec((1, 28, 28))


@dataclass
class Gateway:
    app: ServiceApp
    tokens: Tokens
    model: bytes
    data: bytes

    @property
    def base(self) -> str:
        http: HttpApi = self.app.components["http"]
        return f"http://127.0.0.1:{http.port}"

    @property
    def orchestrator(self) -> Orchestrator:
        return self.app.components["orchestrator"]  # type: ignore[no-any-return]

    def call(
        self, path: str, token: str | None = "", body: bytes | None = None, media: str = ""
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request; ``token`` "" is acme's, None is none."""
        request = urllib.request.Request(self.base + path, data=body)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token or self.tokens.acme}")
        if media:
            request.add_header("Content-Type", media)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def submit(self, token: str = "", request: dict[str, Any] | None = None) -> dict[str, Any]:
        fields = {
            "model": (self.model, "application/octet-stream", "model.safetensors"),
            "data": (self.data, "application/x-npz", "clean.npz"),
            "request": (json.dumps(request or _request()).encode(), "application/json", ""),
        }
        status, headers, body = self.call("/v1/audits", token, *_multipart(fields))
        assert status == 201, body
        audit: dict[str, Any] = json.loads(body)
        assert headers["Location"] == f"/v1/audits/{audit['auditId']}"
        return audit


def _request(**options: object) -> dict[str, Any]:
    spec = json_format.MessageToDict(spec_to_proto(SPEC))
    return {"model": {"arch": "lenet5", "input": spec}, "options": options}


def _multipart(fields: dict[str, tuple[bytes, str, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, (data, media, filename) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += (
            (
                f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                f"Content-Type: {media}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _finish(orchestrator: Orchestrator, audit_id: str) -> None:
    """Play the stages' part (no workers run here): each reports done."""
    for stage in ("leak-detector", "trigger-reversal", "neuron-scoring"):
        status = common_pb2.StageStatus(stage=stage, state=common_pb2.STAGE_STATE_DONE)
        orchestrator.apply_event(jobs_pb2.AuditEvent(audit_id=audit_id, stage=status))


@pytest.fixture()
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    tokens = write_tokens(tmp_path)
    bus = MemoryBus()
    platform = PlatformSettings(store_dir=tmp_path / "store", auth_tokens_file=str(tokens.file))
    settings = PruningOrchestratorSettings(
        grpc_port=0, metrics_port=-1, http_port=0, worker=False, watch_poll_seconds=0.05
    )
    app = build_service("pruning-orchestrator", platform, settings, bus=bus)
    app.start()
    data = Dataset(torch.rand(20, 1, 28, 28), torch.arange(20) % 10)
    yield Gateway(app, tokens, weights_to_safetensors(build("lenet5")), dataset_to_npz(data))
    app.stop(0.5)
    bus.close()


def _validator(gateway: Gateway, name: str) -> jsonschema.Draft202012Validator:
    status, _, body = gateway.call("/openapi.json", token=None)
    assert status == 200
    document = json.loads(body)
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(root)


def test_submit_get_and_list_answer_the_proto_shapes(gateway: Gateway) -> None:
    audit = gateway.submit(request=_request(skipRepair=True))
    assert audit["state"] == "JOB_STATE_QUEUED"
    assert audit["model"]["format"] == "MODEL_FORMAT_SAFETENSORS"
    assert gateway.orchestrator.get(audit["auditId"]).tenant == "acme"
    status, _, body = gateway.call(f"/v1/audits/{audit['auditId']}")
    assert status == 200
    fetched = json.loads(body)
    assert fetched["auditId"] == audit["auditId"]
    assert {s["stage"]: s["state"] for s in fetched["stages"]}["repair"] == "STAGE_STATE_SKIPPED"
    _validator(gateway, "modelguard.v1.Audit").validate(fetched)
    status, _, body = gateway.call("/v1/audits?limit=5")
    listing = json.loads(body)
    assert status == 200 and [a["auditId"] for a in listing["audits"]] == [audit["auditId"]]
    _validator(gateway, "modelguard.v1.ListAuditsResponse").validate(listing)
    # another tenant sees nothing of it; an admin sees it
    assert json.loads(gateway.call("/v1/audits", gateway.tokens.globex)[2])["audits"] == []
    assert gateway.call(f"/v1/audits/{audit['auditId']}", gateway.tokens.globex)[0] == 404
    assert gateway.call(f"/v1/audits/{audit['auditId']}", gateway.tokens.admin)[0] == 200


def test_a_reference_model_is_scanned_uploaded_and_named_in_the_options(
    gateway: Gateway,
) -> None:
    fields = {
        "model": (gateway.model, "application/octet-stream", "model.safetensors"),
        "data": (gateway.data, "application/x-npz", "clean.npz"),
        "request": (json.dumps(_request(skipRepair=True)).encode(), "application/json", ""),
        "reference": (pickle.dumps(os.system), "application/octet-stream", "base.pkl"),
    }
    status, _, answer = gateway.call("/v1/audits", "", *_multipart(fields))
    assert status == 400 and b"pickle" in answer.lower()
    reference = weights_to_safetensors(build("lenet5"))
    fields["reference"] = (reference, "application/octet-stream", "base.safetensors")
    status, _, body = gateway.call("/v1/audits", "", *_multipart(fields))
    assert status == 201, body
    record = gateway.orchestrator.get(json.loads(body)["auditId"])
    sent = gateway.orchestrator.request_message(record).options.reference_model
    assert sent.sha256 == hashlib.sha256(reference).hexdigest()
    assert gateway.orchestrator.runtime.store.get_blob(ref_from_proto(sent)) == reference


def test_events_stream_until_final_then_the_report_downloads(gateway: Gateway) -> None:
    audit_id = gateway.submit(request=_request(skipRepair=True))["auditId"]
    status, _, body = gateway.call(f"/v1/audits/{audit_id}/report")
    assert status == 404 and b"no report yet" in body
    request = urllib.request.Request(f"{gateway.base}/v1/audits/{audit_id}/events")
    request.add_header("Authorization", f"Bearer {gateway.tokens.acme}")
    states: list[str] = []
    with urllib.request.urlopen(request, timeout=30) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        driver = threading.Thread(target=_finish, args=(gateway.orchestrator, audit_id))
        for raw in stream:  # until the server ends the stream
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                assert line == "event: audit"
            if line.startswith("data: "):
                states.append(json.loads(line[6:])["state"])
                if len(states) == 1:
                    driver.start()  # changes begin once the first event is in
    driver.join()
    assert states[0] == "JOB_STATE_QUEUED" and states[-1] == "JOB_STATE_SUCCEEDED"
    status, headers, html = gateway.call(f"/v1/audits/{audit_id}/report")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Content-Disposition"] == f'attachment; filename="{audit_id}-report.html"'
    assert b"<html" in html.lower()
    status, headers, report = gateway.call(f"/v1/audits/{audit_id}/report?format=json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(report)["verdicts"]["neuron-scoring"] == "done"
    assert gateway.call(f"/v1/audits/{audit_id}/report", gateway.tokens.globex)[0] == 404


def test_refusals_are_json_errors_with_http_statuses(gateway: Gateway) -> None:
    status, headers, body = gateway.call("/v1/audits", token=None)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "UNAUTHENTICATED"
    assert gateway.call("/v1/audits", token="mg1.abc.def")[0] == 401
    status, _, body = gateway.call("/v1/audits/20990101-000000-deadbeef")
    assert status == 404 and json.loads(body)["error"]["code"] == "NOT_FOUND"
    assert gateway.call("/v1/audits/20990101-000000-deadbeef/events")[0] == 404
    assert gateway.call("/v1/nothing")[0] == 404
    body, media = _multipart({"model": (gateway.model, "application/octet-stream", "m")})
    status, _, answer = gateway.call("/v1/audits", "", body, media)
    assert status == 400 and b"lacks data" in answer
    fields = {
        "model": (b"not a model", "application/octet-stream", "m"),
        "data": (gateway.data, "application/x-npz", "d"),
    }
    assert gateway.call("/v1/audits", "", *_multipart(fields))[0] == 400
    fields["model"] = (gateway.model, "application/octet-stream", "m")
    fields["request"] = (b'{"model": {"nonsense": 1}}', "application/json", "")
    status, _, answer = gateway.call("/v1/audits", "", *_multipart(fields))
    assert status == 400 and b"SubmitAuditRequest" in answer
    assert gateway.call("/v1/audits?limit=many")[0] == 400


def test_the_openapi_document_is_public_and_covers_the_api(gateway: Gateway) -> None:
    status, headers, body = gateway.call("/openapi.json", token=None)
    assert status == 200 and headers["Content-Type"] == "application/json"
    document = json.loads(body)
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/v1/audits",
        "/v1/audits/{audit_id}",
        "/v1/audits/{audit_id}/events",
        "/v1/audits/{audit_id}/report",
    }
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    assert operations == {"SubmitAudit", "ListAudits", "GetAudit", "WatchAudit", "DownloadReport"}
    jsonschema.Draft202012Validator.check_schema(document["components"]["schemas"]["Error"])


def test_the_plain_http_face_is_refused_beside_a_tls_grpc_api(tmp_path: Path) -> None:
    from modelguard.errors import InvalidInput
    from tests.unit.authkit import make_certs

    certs = make_certs(tmp_path)
    platform = PlatformSettings(
        store_dir=tmp_path / "store",
        tls_cert_file=str(certs.server_cert),
        tls_key_file=str(certs.server_key),
    )
    settings = PruningOrchestratorSettings(grpc_port=0, metrics_port=-1, http_port=0, worker=False)
    bus = MemoryBus()
    with pytest.raises(InvalidInput, match="HTTP_PORT=-1"):
        build_service("pruning-orchestrator", platform, settings, bus=bus)
    bus.close()
