"""The audit API over HTTP/JSON, beside gRPC: the same use cases, the same bearer tokens,
and the JSON shapes of the proto messages (``json_format``), documented by an OpenAPI 3.1
document generated from the proto descriptors (``GET /openapi.json``).

    POST /v1/audits                   multipart: model, data (.npz), request (JSON, optional),
                                      reference (a model file, optional)
    GET  /v1/audits?limit=N           ListAuditsResponse
    GET  /v1/audits/{id}              Audit
    GET  /v1/audits/{id}/events       server-sent events: one Audit per change, until final
    GET  /v1/audits/{id}/report       the signed report (?format=html|json)

A standard-library threaded server: a request holds one thread, as a gRPC call does, and
an event stream is one long request. Errors answer ``{"error": {"code", "message"}}``
with the HTTP status of the gRPC code (the mapping of Google's API design guide).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import logging
import select
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from modelguard.auth import Identity, TokenStore, bearer_token
from modelguard.convert import FORMAT_TO_PROTO, ref_to_proto
from modelguard.errors import (
    InvalidInput,
    ModelGuardError,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from modelguard.formats.registry import get_format
from modelguard.formats.scan import scan_model_bytes
from modelguard.openapi import message_schemas, ref
from modelguard.proto.modelguard.v1 import common_pb2, pruning_orchestrator_pb2
from modelguard.services.pruning_orchestrator.service import Orchestrator, ref_of
from modelguard.services.pruning_orchestrator.servicer import audit_to_proto
from modelguard.status import package_version

log = logging.getLogger(__name__)

AUDITS = "/v1/audits"
OPENAPI = "/openapi.json"
NPZ = "application/x-npz"
REPORT_MEDIA = {"html": "text/html; charset=utf-8", "json": "application/json"}
#: Room for the multipart framing around the uploads.
MULTIPART_SLACK = 1 << 16
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def to_json(message: Message) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True
    )
    return result


# --- the OpenAPI document ----------------------------------------------------------------------
def _json_body(full_name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(full_name)}}}


def openapi_document() -> dict[str, Any]:
    """The HTTP API's OpenAPI 3.1 document; its schemas come from the proto descriptors."""
    messages = pruning_orchestrator_pb2.DESCRIPTOR.message_types_by_name
    audit, listing, submit = (
        messages[n] for n in ("Audit", "ListAuditsResponse", "SubmitAuditRequest")
    )
    schemas = message_schemas((audit, listing, submit))
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "the gRPC status code name"},
                    "message": {"type": "string"},
                },
            }
        },
    }
    error = {"description": "refused", "content": {"application/json": {"schema": ref("Error")}}}
    errors = {str(code): error for code in (400, 401, 404)}
    audit_id = {"name": "audit_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ModelGuard audit API",
            "version": package_version(),
            "description": "The audit API of the pruning-orchestrator over HTTP/JSON. Bodies "
            "are the proto3 JSON form of the modelguard.v1 messages named in each schema.",
        },
        "security": [{"bearer": []}],
        "paths": {
            AUDITS: {
                "post": {
                    "operationId": "SubmitAudit",
                    "summary": "Upload a model and its clean data and submit an audit.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["model", "data"],
                                    "properties": {
                                        "model": {"type": "string", "format": "binary"},
                                        "data": {
                                            "type": "string",
                                            "format": "binary",
                                            "description": "clean samples, an .npz file",
                                        },
                                        "reference": {
                                            "type": "string",
                                            "format": "binary",
                                            "description": "optional: the model the "
                                            "submitted one was fine-tuned from (same classes "
                                            "and input); triggers it shares are set aside as "
                                            "inherited (options.referenceModel)",
                                        },
                                        "request": {
                                            **ref(submit.full_name),
                                            "description": "the rest of the submission "
                                            "(model.arch, model.input, options, "
                                            "idempotencyKey); the artifacts are the uploads",
                                        },
                                    },
                                },
                                "encoding": {"request": {"contentType": "application/json"}},
                            }
                        },
                    },
                    "responses": {
                        "201": _json_body(audit.full_name, "the submitted audit"),
                        **errors,
                    },
                },
                "get": {
                    "operationId": "ListAudits",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0},
                        }
                    ],
                    "responses": {"200": _json_body(listing.full_name, "newest first"), **errors},
                },
            },
            AUDITS + "/{audit_id}": {
                "get": {
                    "operationId": "GetAudit",
                    "parameters": [audit_id],
                    "responses": {"200": _json_body(audit.full_name, "the audit"), **errors},
                }
            },
            AUDITS + "/{audit_id}/events": {
                "get": {
                    "operationId": "WatchAudit",
                    "summary": "Server-sent events: an `audit` event (data: an Audit) at once "
                    "and on every change; the stream ends after the final state.",
                    "parameters": [audit_id],
                    "responses": {
                        "200": {
                            "description": "text/event-stream; each event's data is a "
                            f"{audit.full_name} (#/components/schemas/{audit.full_name})",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **errors,
                    },
                }
            },
            AUDITS + "/{audit_id}/report": {
                "get": {
                    "operationId": "DownloadReport",
                    "parameters": [
                        audit_id,
                        {
                            "name": "format",
                            "in": "query",
                            "schema": {"type": "string", "enum": list(REPORT_MEDIA)},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "the signed report (its signature is in the "
                            "audit's signatures)",
                            "content": {
                                media.split(";")[0]: {"schema": {"type": "string"}}
                                for media in REPORT_MEDIA.values()
                            },
                        },
                        **errors,
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


# --- requests ------------------------------------------------------------------------------------
def _multipart(content_type: str, body: bytes) -> dict[str, tuple[bytes, str]]:
    """Form field name -> (bytes, media type)."""
    if not content_type.startswith("multipart/form-data"):
        raise InvalidInput("POST /v1/audits takes multipart/form-data (model, data, request)")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, tuple[bytes, str]] = {}
    for part in parsed.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = (payload, part.get_content_type())
    return fields


class _Handler(BaseHTTPRequestHandler):
    server: HttpApi
    server_version = "modelguard-http"

    # --- plumbing ---
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def _send(self, status: int, body: bytes, media_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, document: Any, **headers: str) -> None:
        self._send(status, json.dumps(document).encode(), "application/json", **headers)

    def _send_error(self, err: ModelGuardError) -> None:
        headers: dict[str, str] = {}
        if isinstance(err, Unauthenticated):
            headers["WWW_Authenticate"] = "Bearer"
        if isinstance(err, ResourceExhausted) and err.retry_after is not None:
            headers["Retry_After"] = str(max(1, round(err.retry_after)))
        body = {"error": {"code": err.code.name, "message": str(err)}}
        self._send_json(HTTP_STATUS.get(err.code, 500), body, **headers)

    def _caller(self) -> Identity | None:
        tokens = self.server.tokens
        if tokens is None:
            return None
        header = self.headers.get("Authorization")
        return tokens.authenticate(bearer_token([("authorization", header)] if header else []))

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        try:
            if method == "GET" and url.path == OPENAPI:  # public, like the proto files
                self._send_json(200, self.server.document)
                return
            route = self._route(method, parts)
            if route is None:
                raise NotFound(f"no {method} {url.path}: see {OPENAPI}")
            route(self._caller(), parts, query)
        except ModelGuardError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left
        except Exception:
            log.exception("HTTP %s %s failed", method, url.path)
            self._send_json(500, {"error": {"code": "INTERNAL", "message": "internal error"}})

    def _route(
        self, method: str, parts: list[str]
    ) -> Callable[[Identity | None, list[str], dict[str, str]], None] | None:
        if parts[:2] != ["v1", "audits"]:
            return None
        if method == "POST":
            return self._submit if len(parts) == 2 else None
        routes = {2: self._list, 3: self._get}
        if len(parts) == 4:
            return {"events": self._events, "report": self._report}.get(parts[3])
        return routes.get(len(parts))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # --- endpoints ---
    def _submit(self, caller: Identity | None, parts: list[str], query: dict[str, str]) -> None:
        orchestrator = self.server.orchestrator
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise InvalidInput("send the upload with a Content-Length (no chunked encoding)")
        if int(length) > 3 * orchestrator.settings.max_upload_bytes + MULTIPART_SLACK:
            raise ResourceExhausted(
                f"upload exceeds {orchestrator.settings.max_upload_bytes} bytes per file; refused"
            )
        fields = _multipart(self.headers.get("Content-Type", ""), self.rfile.read(int(length)))
        missing = [name for name in ("model", "data") if name not in fields]
        if missing:
            raise InvalidInput(f"the form lacks {' and '.join(missing)} (file fields)")
        request = pruning_orchestrator_pb2.SubmitAuditRequest()
        if "request" in fields:
            try:
                json_format.Parse(fields["request"][0], request)
            except json_format.ParseError as err:
                raise InvalidInput(
                    f"the request field is not a SubmitAuditRequest: {err}"
                ) from None
        model_bytes = fields["model"][0]
        model_format = get_format(scan_model_bytes(model_bytes).kind)  # refuses unsafe files
        reference = fields.get("reference")
        reference_format = (
            None if reference is None else get_format(scan_model_bytes(reference[0]).kind)
        )
        model_ref = orchestrator.upload([(model_bytes, model_format.media_type)], caller)
        data_ref = orchestrator.upload([(fields["data"][0], NPZ)], caller)
        request.model.artifact.CopyFrom(ref_to_proto(model_ref))
        if request.model.format == common_pb2.MODEL_FORMAT_UNSPECIFIED:
            request.model.format = FORMAT_TO_PROTO[model_format.name]
        request.data.CopyFrom(ref_to_proto(data_ref))
        if reference is not None and reference_format is not None:
            reference_ref = orchestrator.upload(
                [(reference[0], reference_format.media_type)], caller
            )
            request.options.reference_model.CopyFrom(ref_to_proto(reference_ref))
        record = orchestrator.submit(
            request.model,
            request.data,
            request.options,
            idempotency_key=request.idempotency_key,
            caller=caller,
        )
        location = f"{AUDITS}/{record.audit_id}"
        self._send_json(201, to_json(audit_to_proto(record)), Location=location)

    def _list(self, caller: Identity | None, parts: list[str], query: dict[str, str]) -> None:
        limit = query.get("limit", "0")
        if not limit.isdigit():
            raise InvalidInput(f"limit must be a whole number; got {limit!r}")
        records = self.server.orchestrator.list(int(limit), caller)
        response = pruning_orchestrator_pb2.ListAuditsResponse(
            audits=[audit_to_proto(r) for r in records]
        )
        self._send_json(200, to_json(response))

    def _get(self, caller: Identity | None, parts: list[str], query: dict[str, str]) -> None:
        record = self.server.orchestrator.get(parts[2], caller)
        self._send_json(200, to_json(audit_to_proto(record)))

    def _events(self, caller: Identity | None, parts: list[str], query: dict[str, str]) -> None:
        records = self.server.orchestrator.watch(parts[2], self._streaming, caller)
        first = next(records)  # an unknown audit is still a plain 404
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # the stream ends with the connection
        self._event(0, first)
        for number, record in enumerate(records, 1):
            self._event(number, record)

    def _event(self, number: int, record: Any) -> None:
        data = json.dumps(to_json(audit_to_proto(record)), separators=(",", ":"))
        self.wfile.write(f"id: {number}\nevent: audit\ndata: {data}\n\n".encode())
        self.wfile.flush()

    def _streaming(self) -> bool:
        """Whether to keep watching: the server runs and the client has not hung up (its
        socket turned readable with nothing to read)."""
        if self.server.stopping.is_set():
            return False
        connection: socket.socket = self.connection
        readable, _, _ = select.select([connection], [], [], 0)
        if not readable:
            return True
        try:
            return connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def _report(self, caller: Identity | None, parts: list[str], query: dict[str, str]) -> None:
        kind = query.get("format", "html")
        if kind not in REPORT_MEDIA:
            raise InvalidInput(f"format must be one of {', '.join(REPORT_MEDIA)}; got {kind!r}")
        orchestrator = self.server.orchestrator
        record = orchestrator.get(parts[2], caller)
        stored = record.report_html if kind == "html" else record.report_json
        if stored is None:
            raise NotFound(
                f"audit {record.audit_id} has no report yet (state {record.state}): it is "
                "written when the audit is final"
            )
        data = orchestrator.download(ref_of(stored), caller)
        disposition = f'attachment; filename="{record.audit_id}-report.{kind}"'
        self._send(200, data, REPORT_MEDIA[kind], Content_Disposition=disposition)


class HttpApi(ThreadingHTTPServer):
    """The HTTP/JSON server of the audit API; ``port`` is the bound one after start."""

    daemon_threads = True  # an open event stream does not hold up the process's exit

    def __init__(
        self, orchestrator: Orchestrator, tokens: TokenStore | None, host: str, port: int
    ) -> None:
        super().__init__((host, port), _Handler, bind_and_activate=False)
        self.orchestrator = orchestrator
        self.tokens = tokens
        self.document = openapi_document()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self.server_bind()
        self.server_activate()
        self._thread = threading.Thread(
            target=self.serve_forever, name="http-api", kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()
        log.info(
            "audit HTTP API on http://%s:%d (OpenAPI at %s)", *self.server_address[:2], OPENAPI
        )

    def stop(self) -> None:
        self.stopping.set()  # open event streams end at their next poll
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
        self.server_close()
