"""The typed Falaj client: `connect(gateway, cert, key, ca)` and the typed errors."""

from falaj.sdk.client import Falaj, ServiceClient, connect
from falaj.sdk.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FalajError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "Falaj",
    "FailedPrecondition",
    "FalajError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceClient",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "connect",
]
