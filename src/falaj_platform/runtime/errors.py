"""Typed domain errors, shared with the SDK so servers and clients speak one vocabulary.

Domain code raises these; the error interceptor turns them into a `google.rpc.Status`
with one `ErrorInfo` (machine-readable reason); the SDK client raises the same classes.
"""

from __future__ import annotations

from falaj.sdk.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FalajError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "FailedPrecondition",
    "FalajError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StartupError",
    "Unauthenticated",
    "Unavailable",
]


class StartupError(Exception):
    """A process cannot start; the message is the one line the operator sees."""
