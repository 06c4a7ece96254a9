"""Serving's security and release events in the gateway's audit log.

A digest mismatch, a cross-region refusal, a promotion and a rollback each become an
audit record (reported through the gateway with serving's own identity). Reporting is
best effort from serving's side: the refusal or release happens either way, and a record
that could not be written is logged as an error for operators.
"""

from __future__ import annotations

from typing import Protocol

from falaj_platform.runtime.audit import AuditReporter, SecurityEvent
from falaj_platform.runtime.errors import FalajError
from falaj_platform.runtime.logs import get_logger
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.serving.deployments import Auditor
from falaj_platform.services.serving.models import SecurityReporter

log = get_logger()

EVENTS = {
    "MODEL_PROMOTED": SecurityEvent.MODEL_PROMOTED,
    "DEPLOYMENT_ROLLED_BACK": SecurityEvent.DEPLOYMENT_ROLLED_BACK,
    "ARTIFACT_DIGEST_MISMATCH": SecurityEvent.ARTIFACT_DIGEST_MISMATCH,
    "CROSS_REGION_ACCESS": SecurityEvent.CROSS_REGION_ACCESS,
}


class ServingAuditor(Auditor, SecurityReporter, Protocol):
    """Release events and load refusals: what serving reports to the audit log."""


class GatewayAuditor:
    """Audit events through the runtime's AuditReporter."""

    def __init__(self, settings: Settings, reporter: AuditReporter | None = None):
        self.reporter = reporter or AuditReporter(settings, attempts=2, timeout=3.0)

    def report(
        self, event: str, *, resource: str, action: str, allowed: bool = True, detail: str = "", attributes: dict[str, str] | None = None
    ) -> None:
        try:
            self.reporter.report(
                EVENTS.get(event, SecurityEvent.OTHER),
                resource=resource,
                action=action,
                allowed=allowed,
                detail=detail,
                attributes=attributes,
            )
        except FalajError as error:
            log.error("security event not recorded in the audit log", event_type=event, resource=resource, error=error.message)

    def digest_mismatch(self, model_version: str, expected: str, actual: str) -> None:
        self.report(
            "ARTIFACT_DIGEST_MISMATCH",
            resource=model_version,
            action="load",
            allowed=False,
            detail=f"artifact hashes to {actual}, expected {expected}; not loaded",
            attributes={"expected_sha256": expected, "actual_sha256": actual},
        )

    def cross_region(self, resource: str, region: str, detail: str) -> None:
        self.report(
            "CROSS_REGION_ACCESS", resource=resource, action="load", allowed=False, detail=detail, attributes={"residency_region": region}
        )
