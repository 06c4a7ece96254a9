"""Typed errors: one class per gRPC status code a caller can act on.

Servers raise them (the platform runtime maps them to a `google.rpc.Status` with an
`ErrorInfo`); the SDK client raises them from a failed call, with the reason and
metadata of the ErrorInfo, so callers catch `NotFound` rather than inspect codes.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class FalajError(Exception):
    """Base of every typed Falaj error."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None, request_id: str = ""):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" + (f" [{self.reason}]" if self.reason != self.default_reason else "")


class InvalidArgument(FalajError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(FalajError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(FalajError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(FalajError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(FalajError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(FalajError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(FalajError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Aborted(FalajError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Unavailable(FalajError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(FalajError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unimplemented(FalajError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Internal(FalajError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[FalajError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Aborted,
        Unavailable,
        DeadlineExceeded,
        Unimplemented,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> FalajError:
    """The typed error for a failed call, with the ErrorInfo reason when the server sent one."""
    call: grpc.Call = error
    code = call.code()
    cls = _BY_CODE.get(code, FalajError)
    reason, metadata = None, {}
    status = rpc_status.from_call(call)
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
                break
    request_id = next((v for k, v in (call.trailing_metadata() or ()) if k == "x-request-id"), "")
    typed = cls(call.details() or code.name, reason=reason, metadata=metadata, request_id=str(request_id))
    if cls is FalajError:
        typed.code = code
    return typed
