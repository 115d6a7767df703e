"""Process logging: plain text for people, or one JSON object per line for a log pipeline.

The JSON lines carry ``time``, ``level``, ``logger``, ``message`` and ``service``, plus the
fields of the job in hand (``audit_id``, ``stage``, ``tenant``, ``attempt``) when the
record is logged while a stage runs it: `job_context` binds them in a context variable,
so whatever the stage's code (or the library code it calls) logs on that thread carries
them without being passed anything.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The job fields a record may carry; set by `job_context`.
JOB_FIELDS = ("audit_id", "stage", "tenant", "attempt")

_job: contextvars.ContextVar[Mapping[str, str | int]] = contextvars.ContextVar(
    "modelguard_log_job", default=MappingProxyType({})
)


@contextmanager
def job_context(**fields: str | int | None) -> Iterator[None]:
    """Bind job fields (see `JOB_FIELDS`) to what is logged inside the block, on top of
    those already bound; a ``None`` or empty value leaves a field out."""
    unknown = set(fields) - set(JOB_FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}; known: {JOB_FIELDS}")
    bound = {**_job.get(), **{k: v for k, v in fields.items() if v not in (None, "")}}
    token = _job.set(bound)
    try:
        yield
    finally:
        _job.reset(token)


def current_job() -> Mapping[str, str | int]:
    """The job fields bound here (empty outside a stage)."""
    return _job.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (exceptions included, as a string)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
            **_job.get(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(
    level: str,
    log_format: LogFormat = "text",
    service: str = "modelguard",
    stream: TextIO | None = None,
) -> None:
    """Set up the root logger of a service process (replacing its handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
