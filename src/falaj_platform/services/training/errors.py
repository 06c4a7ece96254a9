"""Errors of the training domain beyond the shared typed errors.

`ArtifactIntegrityError` answers DATA_LOSS: a stored artifact whose authentication tags
or SHA-256 digest do not match what was recorded is never loaded or served.
`JobFailed` (defined with the job plan, so workers need no gRPC) stops a training job
with a `FailureReason` a person can act on.
"""

from __future__ import annotations

import grpc

from falaj_platform.runtime.errors import FalajError
from falaj_platform.services.training.plan import JobFailed

__all__ = ["ArtifactIntegrityError", "JobFailed"]


class ArtifactIntegrityError(FalajError):
    """The stored artifact is not the one registered (tampered, truncated or wrong key)."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "ARTIFACT_DIGEST_MISMATCH"
