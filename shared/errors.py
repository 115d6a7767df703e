"""One error hierarchy for the whole project.

Each class carries the gRPC status code it maps to; the server's error interceptor
(`modelguard.grpc_server`) converts them once, and the CLI prints ``str(error)``.
Messages say what was wrong and what the user can do about it.
"""

from __future__ import annotations

import grpc


class ModelGuardError(Exception):
    """Base class: a failure with a user-facing message and a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: Errors a retry cannot fix (bad input): jobs fail at once instead of retrying.
    permanent: bool = False
    #: A dependency is down (broker, object store): the job waits for it, retrying with
    #: backoff without using up its attempts, instead of failing during an outage.
    transient: bool = False


class InvalidInput(ModelGuardError):
    """The request, model or dataset is malformed or inconsistent."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    permanent = True


class UnsafeArtifact(InvalidInput):
    """A file that could execute code when loaded (pickle) or is otherwise refused."""


class IntegrityError(ModelGuardError):
    """Stored bytes do not match their digest or signature: never used."""

    code = grpc.StatusCode.DATA_LOSS
    permanent = True


class NotFound(ModelGuardError):
    code = grpc.StatusCode.NOT_FOUND
    permanent = True


class AlreadyExists(ModelGuardError):
    code = grpc.StatusCode.ALREADY_EXISTS
    permanent = True


class Unauthenticated(ModelGuardError):
    code = grpc.StatusCode.UNAUTHENTICATED
    permanent = True


class PermissionDenied(ModelGuardError):
    code = grpc.StatusCode.PERMISSION_DENIED
    permanent = True


class ResourceExhausted(ModelGuardError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    permanent = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds after which the same call may succeed (sent as ``retry-after`` trailing
        #: metadata); None when waiting will not help (e.g. an upload that is too big).
        self.retry_after = retry_after


class DeadlineExceeded(ModelGuardError):
    """A job ran past its time limit: it fails with this reason and is not retried (a
    retry would run as long again)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    permanent = True


class Unavailable(ModelGuardError):
    """A dependency (broker, object store) cannot be reached; retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE
    permanent = False
    transient = True


def is_transient(err: BaseException) -> bool:
    """True for an outage of a dependency (see `ModelGuardError.transient`)."""
    return isinstance(err, ModelGuardError) and err.transient
